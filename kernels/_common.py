"""Shared @triton.jit helpers (exact GELU, online softmax statistics, the weight-gradient flush) and launcher
helpers (dot operand dtype, the row-major check, the SM count)."""
import os

import torch
import triton
import triton.language as tl

_SQRT1_2 = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1 / sqrt(2 pi)


_DOT_16 = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def dot_config(weight_dtype: torch.dtype, autocast_dtype=None):
    """(operand dtype, input precision) of an op's dots: 16-bit where eager PyTorch runs the linears in
    16 bits (under autocast, or with 16-bit weights), accumulating in fp32; otherwise fp32 operands through 3
    tf32 passes (~fp32 accuracy; the precision argument only matters for fp32 operands)."""
    dtype = autocast_dtype if autocast_dtype is not None else weight_dtype
    return (_DOT_16[dtype], "tf32") if dtype in _DOT_16 else (tl.float32, "tf32x3")


def check_rows(width: int, **tensors) -> None:
    """The kernels index every tensor as dense row-major rows of `width` elements; a view with other strides
    (a transpose, a slice) would be read wrongly, so it is refused here rather than trusted."""
    for name, t in tensors.items():
        if t is not None and (t.dim() > 2 or tuple(t.shape[-1:]) != (width,) or not t.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous (rows, {width}) or ({width},) tensor, got shape "
                             f"{tuple(t.shape)} with strides {t.stride()}")


# The interpreter multiplies bf16 dot operands as raw bits and truncates fp32 -> bf16. There the operands are
# rounded to nearest even by hand and multiplied in fp32: the same products, since a tensor core multiplies
# 16-bit operands exactly into fp32.
_INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def dot_operand(t, DOT_DTYPE: tl.constexpr):
    """t rounded to the dot operand dtype."""
    if _INTERPRET:
        if DOT_DTYPE == tl.bfloat16:
            bits = t.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            return bits.to(tl.float32, bitcast=True)
        else:
            return t.to(DOT_DTYPE).to(tl.float32)
    else:
        return t.to(DOT_DTYPE)


@triton.jit
def row_tile(d0, cols0, D, row_mask, row_off):
    """Columns d0 + cols0 of a (BLOCK_M, D) row tile: (cols, col_mask, mask, offsets)."""
    cols = d0 + cols0
    col_mask = cols < D
    return cols, col_mask, row_mask[:, None] & col_mask[None, :], row_off + cols[None, :]


@triton.jit
def gelu(h):
    """Exact GELU: h * Phi(h) = 0.5 h (1 + erf(h / sqrt 2))."""
    return 0.5 * h * (1.0 + tl.erf(h * _SQRT1_2))


@triton.jit
def gelu_grad(h):
    """d GELU / dh = Phi(h) + h phi(h)."""
    return 0.5 * (1.0 + tl.erf(h * _SQRT1_2)) + h * tl.exp(-0.5 * h * h) * _INV_SQRT_2PI


@triton.jit
def safe_max(m):
    """A running max usable as a shift: -inf (an all -inf prefix) becomes 0 so exp(-inf - m) = 0, never NaN."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def online_stats(z, other, m, s1, st, cross, inv_t):
    """Fold one chunk z (BLOCK_C,) fp32 into the running max m, s1 = sum exp(z - m), st = sum exp((z - m)/T)
    and cross = sum exp((z - m)/T) (z - other); 0 log 0 = 0: a -inf z adds nothing to cross."""
    m_new = tl.maximum(m, tl.max(z, axis=0))
    shift = safe_max(m_new)
    alpha1 = tl.exp(m - shift)  # 0 while the prefix was all -inf (then s1 = st = cross = 0)
    alphat = tl.exp((m - shift) * inv_t)
    e1 = tl.exp(z - shift)
    et = tl.exp((z - shift) * inv_t)
    gap = tl.where(z == float("-inf"), 0.0, et * (z - other))
    return (m_new, s1 * alpha1 + tl.sum(e1, axis=0), st * alphat + tl.sum(et, axis=0),
            cross * alphat + tl.sum(gap, axis=0))


def multiprocessors(device: torch.device) -> int:
    """SMs of a CUDA device: the size of one wave of a persistent grid; 2 elsewhere (the interpreter), so a
    test's program walks several tiles."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2


@triton.jit
def flush_partial(ptrs, values, mask, ATOMIC: tl.constexpr):
    """A program's weight-gradient partial, summed in registers over its tiles, written once: added into the
    shared fp32 slot with relaxed atomics, or stored into the program's own slot (the launcher sums the slots in
    a fixed order)."""
    if ATOMIC:
        tl.atomic_add(ptrs, values, mask=mask, sem="relaxed")
    else:
        tl.store(ptrs, values, mask=mask)
