"""Per-head LoRA on q and v of a fused qkv tensor: forward and backward kernels and their launchers.

qkv (M, 3D) is read as (row, part, head, d_h). A program owns BLOCK_N (row, head) pairs of one part (grid axis 1:
0 q, 1 k, 2 v), each pair a d_h-wide vector, so q and v are tiles of a (M·H, d_h) matrix and the rank-r
bottleneck (BLOCK_N, BLOCK_R) stays in registers between two dots; k is copied. Every element of qkv is read once
and written once each way. The backward runs a persistent grid whose programs sum their weight gradients over
their tiles in fp32 registers and write them once (relaxed atomics into one slot, or their own slots summed in a
fixed order).
"""
import torch
import triton
import triton.language as tl

from gist_fast.kernels._common import check_rows, dot_config, dot_operand, flush_partial, multiprocessors

# The largest rank and head dimension the kernels take (the factors and the bottleneck live in registers); above
# them the ops run the plain-torch backend. The sm_90a gate compiles every BLOCK_R and BLOCK_DH up to them, with
# the head dimensions of the common ViTs (d_h is a compile-time constant: one kernel per model's d_h).
MAX_RANK = 64
MAX_HEAD_DIM = 128


@triton.jit
def _pairs(tile, N, H, D, part, DH: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DH: tl.constexpr):
    """Offsets into qkv (M, 3D) of pairs tile BLOCK_N .. of `part` and their mask: pair i = m H + h starts at
    m 3D + part D + h DH = i DH + m 2D + part D."""
    pairs = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_DH)
    start = pairs * DH + (pairs // H) * (2 * D) + part * D
    return start[:, None] + cols[None, :], (pairs < N)[:, None] & (cols < DH)[None, :]


@triton.jit
def _factors(down_ptr, up_ptr, R, DH: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DH: tl.constexpr,
             DOT_DTYPE: tl.constexpr):
    """down (R, DH) and up (DH, R), each as itself and transposed, zero-padded to BLOCK_R and BLOCK_DH and
    rounded to the dot operand dtype: (down, down^T, up, up^T)."""
    ranks = tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_DH)
    mask_rd = (ranks < R)[:, None] & (cols < DH)[None, :]
    mask_dr = (cols < DH)[:, None] & (ranks < R)[None, :]
    down = tl.load(down_ptr + ranks[:, None] * DH + cols[None, :], mask=mask_rd, other=0.0)
    down_t = tl.load(down_ptr + ranks[None, :] * DH + cols[:, None], mask=mask_dr, other=0.0)
    up = tl.load(up_ptr + cols[:, None] * R + ranks[None, :], mask=mask_dr, other=0.0)
    up_t = tl.load(up_ptr + cols[None, :] * R + ranks[:, None], mask=mask_rd, other=0.0)
    return (dot_operand(down, DOT_DTYPE), dot_operand(down_t, DOT_DTYPE), dot_operand(up, DOT_DTYPE),
            dot_operand(up_t, DOT_DTYPE))


@triton.jit(do_not_specialize=["N", "R_Q", "R_V"])
def _lora_qv_fwd_kernel(
    qkv_ptr,  # (M, 3D) the qkv Linear's output, row-major: [q | k | v], each (H, DH) per row
    dq_ptr,  # (R_Q, DH) down_q
    uq_ptr,  # (DH, R_Q) up_q
    dv_ptr,  # (R_V, DH) down_v
    uv_ptr,  # (DH, R_V) up_v
    out_ptr,  # (M, 3D) out: qkv's layout and dtype
    N,  # (row, head) pairs: M H
    H,  # heads
    D,  # model width H DH
    R_Q,  # rank of the q factors (<= BLOCK_R)
    R_V,  # rank of the v factors (<= BLOCK_R)
    alpha,  # float: LoRA scale α
    DH: tl.constexpr,  # head dimension (a model constant: its masks and alignment known at compile time)
    BLOCK_N: tl.constexpr,  # (row, head) pairs per program
    BLOCK_DH: tl.constexpr,  # head dimension padded to a power of two >= 16
    BLOCK_R: tl.constexpr,  # rank padded to a power of two >= 16
    DOT_DTYPE: tl.constexpr,  # dtype of the dot operands: a 16-bit qkv's (the factors follow it) or autocast's
    DOT_PRECISION: tl.constexpr,  # tl.dot input precision for fp32 operands
):
    """Program (t, part) on pairs t BLOCK_N .. of q (part 0) or v (part 2): y = x + α (x down^T) up^T, fp32
    accumulation, the (BLOCK_N, BLOCK_R) bottleneck in registers; of k (part 1): y = x."""
    tile = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    offs, mask = _pairs(tile, N, H, D, part, DH, BLOCK_N, BLOCK_DH)
    x = tl.load(qkv_ptr + offs, mask=mask, other=0.0)
    if part == 1:
        tl.store(out_ptr + offs, x, mask=mask)
    else:
        if part == 0:
            down_ptr, up_ptr, R = dq_ptr, uq_ptr, R_Q
        else:
            down_ptr, up_ptr, R = dv_ptr, uv_ptr, R_V
        _, down_t, _, up_t = _factors(down_ptr, up_ptr, R, DH, BLOCK_R, BLOCK_DH, DOT_DTYPE)
        h = tl.dot(dot_operand(x, DOT_DTYPE), down_t, input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_R)
        y = tl.dot(dot_operand(h, DOT_DTYPE), up_t, input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_DH)
        tl.store(out_ptr + offs, (x.to(tl.float32) + alpha * y).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["N", "R_Q", "R_V"])
def _lora_qv_bwd_kernel(
    gout_ptr,  # (M, 3D) upstream gradient, qkv's layout
    qkv_ptr,  # (M, 3D) forward input
    dq_ptr,  # (R_Q, DH) down_q
    uq_ptr,  # (DH, R_Q) up_q
    dv_ptr,  # (R_V, DH) down_v
    uv_ptr,  # (DH, R_V) up_v
    gqkv_ptr,  # (M, 3D) out: grad of qkv, qkv's dtype
    gdq_ptr,  # (P, R_Q, DH) fp32 out: per-program partial grad of down_q (P = 1, zeroed, with ATOMIC)
    guq_ptr,  # (P, DH, R_Q) fp32 out: partial grad of up_q, as gdq_ptr
    gdv_ptr,  # (P, R_V, DH) fp32 out: partial grad of down_v
    guv_ptr,  # (P, DH, R_V) fp32 out: partial grad of up_v
    N,  # (row, head) pairs: M H
    H,  # heads
    D,  # model width H DH
    R_Q,  # rank of the q factors (<= BLOCK_R)
    R_V,  # rank of the v factors (<= BLOCK_R)
    alpha,  # float: LoRA scale α
    DH: tl.constexpr,  # head dimension, as in the forward
    ATOMIC: tl.constexpr,  # add the partials into slot 0 with relaxed fp32 atomics, else store into slot pid
    BLOCK_N: tl.constexpr,  # (row, head) pairs per tile
    BLOCK_DH: tl.constexpr,  # head dimension padded to a power of two >= 16
    BLOCK_R: tl.constexpr,  # rank padded to a power of two >= 16
    DOT_DTYPE: tl.constexpr,  # dtype of the dot operands, as in the forward
    DOT_PRECISION: tl.constexpr,  # tl.dot input precision for fp32 operands
):
    """q and v: gh = g up; grad x = g + α gh down; grad up = α Σ g^T (x down^T); grad down = α Σ gh^T x;
    k: grad x = g. Program (p, part) walks tiles p, p + P, ... of its part."""
    pid = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    n_tiles = tl.cdiv(N, BLOCK_N)
    if part == 1:
        for tile in range(pid, n_tiles, tl.num_programs(0)):
            offs, mask = _pairs(tile, N, H, D, part, DH, BLOCK_N, BLOCK_DH)
            tl.store(gqkv_ptr + offs, tl.load(gout_ptr + offs, mask=mask, other=0.0), mask=mask)
    else:
        if part == 0:
            down_ptr, up_ptr, gdown_ptr, gup_ptr, R = dq_ptr, uq_ptr, gdq_ptr, guq_ptr, R_Q
        else:
            down_ptr, up_ptr, gdown_ptr, gup_ptr, R = dv_ptr, uv_ptr, gdv_ptr, guv_ptr, R_V
        down, down_t, up, _ = _factors(down_ptr, up_ptr, R, DH, BLOCK_R, BLOCK_DH, DOT_DTYPE)
        acc_down = tl.zeros((BLOCK_R, BLOCK_DH), tl.float32)
        acc_up = tl.zeros((BLOCK_DH, BLOCK_R), tl.float32)
        for tile in range(pid, n_tiles, tl.num_programs(0)):
            offs, mask = _pairs(tile, N, H, D, part, DH, BLOCK_N, BLOCK_DH)
            x = dot_operand(tl.load(qkv_ptr + offs, mask=mask, other=0.0), DOT_DTYPE)
            g = tl.load(gout_ptr + offs, mask=mask, other=0.0)
            g_dot = dot_operand(g, DOT_DTYPE)
            h = dot_operand(tl.dot(x, down_t, input_precision=DOT_PRECISION), DOT_DTYPE)  # (BLOCK_N, BLOCK_R)
            gh = dot_operand(tl.dot(g_dot, up, input_precision=DOT_PRECISION), DOT_DTYPE)  # (BLOCK_N, BLOCK_R)
            gx = g.to(tl.float32) + alpha * tl.dot(gh, down, input_precision=DOT_PRECISION)
            tl.store(gqkv_ptr + offs, gx.to(gqkv_ptr.dtype.element_ty), mask=mask)
            acc_up = tl.dot(tl.trans(g_dot), h, acc_up, input_precision=DOT_PRECISION)  # padded pairs: g = 0
            acc_down = tl.dot(tl.trans(gh), x, acc_down, input_precision=DOT_PRECISION)
        ranks = tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_DH)
        mask_rd = (ranks < R)[:, None] & (cols < DH)[None, :]
        mask_dr = (cols < DH)[:, None] & (ranks < R)[None, :]
        slot = 0 if ATOMIC else pid
        flush_partial(gdown_ptr + slot * R * DH + ranks[:, None] * DH + cols[None, :], alpha * acc_down, mask_rd,
                      ATOMIC)
        flush_partial(gup_ptr + slot * DH * R + cols[:, None] * R + ranks[None, :], alpha * acc_up, mask_dr, ATOMIC)


# (direction, dot operand bits) -> {BLOCK_R x BLOCK_DH: (BLOCK_N, num_warps, num_stages)}: the factors and the
# backward's fp32 weight-gradient accumulators grow with BLOCK_R x BLOCK_DH, so the pairs per tile shrink or the
# warps grow with it. Every entry is held to an H100's shared memory and (16-bit) to zero register spills by
# tests/test_sm90_gate.py.
_TILES = {
    ("fwd", 16): {256: (128, 4, 1), 512: (128, 4, 1), 1024: (64, 4, 1), 2048: (64, 4, 1), 4096: (64, 4, 1),
                  8192: (64, 8, 1)},
    ("bwd", 16): {256: (64, 4, 2), 512: (64, 4, 2), 1024: (64, 4, 2), 2048: (64, 8, 2), 4096: (64, 8, 2),
                  8192: (32, 8, 2)},
    ("fwd", 32): {256: (64, 4, 1), 512: (64, 4, 1), 1024: (64, 4, 1), 2048: (32, 4, 1), 4096: (32, 8, 1),
                  8192: (32, 8, 1)},
    ("bwd", 32): {256: (32, 4, 2), 512: (32, 4, 2), 1024: (32, 8, 2), 2048: (16, 8, 2), 4096: (16, 8, 2),
                  8192: (16, 8, 1)},
}


def _plan(direction: str, R: int, DH: int, dot_dtype, block_n=None):
    """(BLOCK_N, BLOCK_DH, BLOCK_R, num_warps, num_stages) of the "fwd" or "bwd" kernel; block_n overrides
    (tests)."""
    block_dh, block_r = max(16, triton.next_power_of_2(DH)), max(16, triton.next_power_of_2(R))
    bn, warps, stages = _TILES[direction, dot_dtype.primitive_bitwidth][block_r * block_dh]
    return block_n or bn, block_dh, block_r, warps, stages


def _check(qkv, down_q, up_q, down_v, up_v, num_heads, **more):
    """Shapes and row-major layout the kernels index by; (M, D, DH, R_Q, R_V)."""
    M, width = qkv.shape
    D, DH = width // 3, width // (3 * num_heads)
    R_Q, R_V = down_q.shape[0], down_v.shape[0]
    check_rows(width, qkv=qkv, **more)
    check_rows(DH, down_q=down_q, down_v=down_v)
    check_rows(R_Q, up_q=up_q)
    check_rows(R_V, up_v=up_v)
    if down_q.dtype != down_v.dtype or up_q.dtype != down_q.dtype or up_v.dtype != down_q.dtype:
        raise ValueError(f"the four factors must share one dtype, got {down_q.dtype}, {up_q.dtype}, {down_v.dtype}, "
                         f"{up_v.dtype}")
    return M, D, DH, R_Q, R_V


def lora_qv_fwd(qkv, down_q, up_q, down_v, up_v, alpha, num_heads, dot_dtype=None, *, block_n=None):
    """Launcher for gist_fast::lora_qv: qkv (M, 3D) with num_heads heads; returns (M, 3D) in qkv's dtype.
    dot_dtype: the autocast dtype the LoRA linears run in (None: qkv's dtype, which the factors follow, as in
    gist_fast.reference)."""
    M, D, DH, R_Q, R_V = _check(qkv, down_q, up_q, down_v, up_v, num_heads)
    out = torch.empty_like(qkv)
    N = M * num_heads
    if N == 0 or DH == 0:
        return out
    dot, precision = dot_config(qkv.dtype, dot_dtype)
    bn, bdh, br, warps, stages = _plan("fwd", max(R_Q, R_V), DH, dot, block_n)
    _lora_qv_fwd_kernel[(triton.cdiv(N, bn), 3)](
        qkv, down_q, up_q, down_v, up_v, out, N, num_heads, D, R_Q, R_V, float(alpha), DH=DH,
        BLOCK_N=bn, BLOCK_DH=bdh, BLOCK_R=br, DOT_DTYPE=dot, DOT_PRECISION=precision,
        num_warps=warps, num_stages=stages,
    )
    return out


def lora_qv_bwd(grad_out, qkv, down_q, up_q, down_v, up_v, alpha, num_heads, dot_dtype=None, *, block_n=None,
                atomic=None):
    """Launcher for gist_fast::lora_qv_bwd: grad_qkv (qkv's dtype) and the gradients of down_q, up_q, down_v,
    up_v (their dtypes). Weight gradients are reduced with relaxed fp32 atomics or, under
    torch.use_deterministic_algorithms(True) (or atomic=False), through one fp32 slot per program summed in a
    fixed order."""
    M, D, DH, R_Q, R_V = _check(qkv, down_q, up_q, down_v, up_v, num_heads, grad_out=grad_out)
    N = M * num_heads
    dot, precision = dot_config(qkv.dtype, dot_dtype)
    bn, bdh, br, warps, stages = _plan("bwd", max(R_Q, R_V), DH, dot, block_n)
    grid = max(1, min(triton.cdiv(N, bn), multiprocessors(qkv.device)))  # per part: one program per SM
    atomic = not torch.are_deterministic_algorithms_enabled() if atomic is None else atomic
    slots = 1 if atomic else grid
    parts = [torch.zeros((slots, *t.shape), dtype=torch.float32, device=qkv.device)
             for t in (down_q, up_q, down_v, up_v)]
    grad_qkv = torch.empty_like(qkv)
    if N > 0 and DH > 0:
        _lora_qv_bwd_kernel[(grid, 3)](
            grad_out, qkv, down_q, up_q, down_v, up_v, grad_qkv, *parts, N, num_heads, D, R_Q, R_V, float(alpha), DH=DH,
            ATOMIC=atomic, BLOCK_N=bn, BLOCK_DH=bdh, BLOCK_R=br, DOT_DTYPE=dot, DOT_PRECISION=precision,
            num_warps=warps, num_stages=stages,
        )
    grads = [p[0] if atomic else p.sum(0) for p in parts]
    return (grad_qkv, *(g.to(t.dtype) for g, t in zip(grads, (down_q, up_q, down_v, up_v))))
