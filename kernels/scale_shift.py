"""Fused SSF scale and shift (+ exact GELU): forward and backward kernels and their launchers.

The forward is one elementwise pass over (BLOCK_M, BLOCK_D) tiles. The backward runs a persistent grid: each
program owns one column block and walks every P-th row tile of it, summing the scale and shift gradients in fp32
registers, and writes them once (relaxed atomics into one slot, or its own slot summed in a fixed order).
"""
import torch
import triton
import triton.language as tl

from gist_fast.kernels._common import check_rows, flush_partial, gelu_grad, multiprocessors
from gist_fast.kernels._common import gelu as exact_gelu  # `gelu` is the launchers' flag


@triton.jit(do_not_specialize=["M"])
def _scale_shift_fwd_kernel(
    x_ptr,  # (M, D) input, row-major, any float dtype
    scale_ptr,  # (D,) scale γ
    shift_ptr,  # (D,) shift β
    out_ptr,  # (M, D) out: x γ + β, GELU'd with GELU, x's dtype
    M,  # rows
    D,  # channels
    GELU: tl.constexpr,  # apply the exact GELU to x γ + β
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_D: tl.constexpr,  # columns per program
):
    """out = x γ + β (then GELU) over the last dimension, fp32 math;
    program (i, j) owns rows i BLOCK_M .. and columns j BLOCK_D .. ."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    mask = (rows < M)[:, None] & col_mask[None, :]
    offs = rows[:, None] * D + cols[None, :]
    gamma = tl.load(scale_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    beta = tl.load(shift_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = x * gamma[None, :] + beta[None, :]
    if GELU:
        y = exact_gelu(y)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M"])
def _scale_shift_bwd_kernel(
    gout_ptr,  # (M, D) upstream gradient of out
    x_ptr,  # (M, D) forward input
    scale_ptr,  # (D,) scale γ
    shift_ptr,  # (D,) shift β (GELU: the pre-activation is recomputed)
    gx_ptr,  # (M, D) out: grad of x, x's dtype
    gscale_ptr,  # (P, D) fp32 out: per-program partial grad of γ (P = 1, zeroed, with ATOMIC)
    gshift_ptr,  # (P, D) fp32 out: per-program partial grad of β, as gscale_ptr
    M,  # rows
    D,  # channels
    GELU: tl.constexpr,  # the forward applied the exact GELU
    ATOMIC: tl.constexpr,  # add the partials into slot 0 with relaxed fp32 atomics, else store into slot pid
    BLOCK_M: tl.constexpr,  # rows per tile
    BLOCK_D: tl.constexpr,  # columns per program
):
    """gy = g GELU'(x γ + β) (gy = g without GELU); grad x = gy γ; grad γ = Σ_rows gy x; grad β = Σ_rows gy.
    Program (p, j) walks row tiles p, p + P, ... of column block j."""
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    gamma = tl.load(scale_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    beta = tl.load(shift_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    acc_scale = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)  # reduced over rows once, after the loop
    acc_shift = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for tile in range(pid, tl.cdiv(M, BLOCK_M), tl.num_programs(0)):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (rows < M)[:, None] & col_mask[None, :]
        offs = rows[:, None] * D + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        gy = tl.load(gout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if GELU:
            gy = gy * gelu_grad(x * gamma[None, :] + beta[None, :])  # masked entries: g = 0, so gy = 0
        tl.store(gx_ptr + offs, (gy * gamma[None, :]).to(gx_ptr.dtype.element_ty), mask=mask)
        acc_scale += gy * x
        acc_shift += gy
    slot = 0 if ATOMIC else pid
    flush_partial(gscale_ptr + slot * D + cols, tl.sum(acc_scale, axis=0), col_mask, ATOMIC)
    flush_partial(gshift_ptr + slot * D + cols, tl.sum(acc_shift, axis=0), col_mask, ATOMIC)


# direction -> (largest BLOCK_D, elements per tile, num_warps, num_stages); BLOCK_M = elements / BLOCK_D. Held to
# an H100's shared memory and to zero register spills by tests/test_sm90_gate.py.
_TILES = {"fwd": (256, 4096, 4, 1), "bwd": (256, 2048, 4, 2)}
_WAVES = 4  # backward programs per SM (its 80 to 160 registers a thread let three or four share one)


def _plan(direction: str, D: int, block_m=None, block_d=None):
    """(BLOCK_M, BLOCK_D, num_warps, num_stages) of the "fwd" or "bwd" kernel for D channels; block_m / block_d
    override (tests)."""
    widest, elements, warps, stages = _TILES[direction]
    bd = block_d or min(widest, max(16, triton.next_power_of_2(D)))
    return block_m or max(1, elements // bd), bd, warps, stages


def scale_shift_fwd(x, scale, shift, gelu, *, block_m=None, block_d=None):
    """Launcher for gist_fast::scale_shift: x (M, D), scale and shift (D,); returns out (M, D) in x's dtype."""
    M, D = x.shape
    check_rows(D, x=x, scale=scale, shift=shift)
    out = torch.empty_like(x)
    if M == 0 or D == 0:
        return out
    bm, bd, warps, stages = _plan("fwd", D, block_m, block_d)
    _scale_shift_fwd_kernel[(triton.cdiv(M, bm), triton.cdiv(D, bd))](
        x, scale, shift, out, M, D, GELU=bool(gelu), BLOCK_M=bm, BLOCK_D=bd, num_warps=warps, num_stages=stages,
    )
    return out


def scale_shift_bwd(grad_out, x, scale, shift, gelu, *, block_m=None, block_d=None, atomic=None):
    """Launcher for gist_fast::scale_shift_bwd: grad_x (x's dtype), grad_scale, grad_shift (their parameters'
    dtypes). The column sums are reduced with relaxed fp32 atomics or, under
    torch.use_deterministic_algorithms(True) (or atomic=False), through one fp32 slot per program summed in a
    fixed order."""
    M, D = x.shape
    check_rows(D, grad_out=grad_out, x=x, scale=scale, shift=shift)
    bm, bd, warps, stages = _plan("bwd", D, block_m, block_d)
    col_blocks = triton.cdiv(D, bd)
    grid = max(1, min(triton.cdiv(M, bm), triton.cdiv(_WAVES * multiprocessors(x.device), max(1, col_blocks))))
    atomic = not torch.are_deterministic_algorithms_enabled() if atomic is None else atomic
    parts = [torch.zeros((1 if atomic else grid, D), dtype=torch.float32, device=x.device) for _ in range(2)]
    grad_x = torch.empty_like(x)
    if M > 0 and D > 0:
        _scale_shift_bwd_kernel[(grid, col_blocks)](
            grad_out, x, scale, shift, grad_x, *parts, M, D,
            GELU=bool(gelu), ATOMIC=atomic, BLOCK_M=bm, BLOCK_D=bd, num_warps=warps, num_stages=stages,
        )
    g_scale, g_shift = (p[0] if atomic else p.sum(0) for p in parts)  # two tensors: op outputs may not alias
    return grad_x, g_scale.to(scale.dtype), g_shift.to(shift.dtype)
