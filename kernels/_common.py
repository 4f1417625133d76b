"""Shared @triton.jit helpers (exact GELU, online softmax statistics) and the one block-size helper."""
import torch
import triton
import triton.language as tl

_SQRT1_2 = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1 / sqrt(2 pi)


def block_size(n: int, lo: int = 16, hi: int = 1024) -> int:
    """The power of two that covers n, clamped to [lo, hi]; every tiled dimension goes through here."""
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def num_warps(tile_elements: int) -> int:
    """Warps for a program whose largest tile has tile_elements elements."""
    return 4 if tile_elements <= 1024 else 8 if tile_elements <= 8192 else 16


def dot_precision(*dtypes: torch.dtype) -> str:
    """tf32 only when every tensor feeding the dots is 16-bit (exact in tf32); any fp32 one (the fp32
    master weights under autocast, an fp32 output) keeps ~fp32 accuracy with 3 tf32 passes."""
    return "tf32" if all(d in (torch.float16, torch.bfloat16) for d in dtypes) else "tf32x3"


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
    return m_new, s1 * alpha1 + tl.sum(e1, axis=0), st * alphat + tl.sum(et, axis=0), cross * alphat + tl.sum(gap, axis=0)
