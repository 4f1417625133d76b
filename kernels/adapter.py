"""Fused adapter + residual (+ LayerNorm): forward and backward kernels and their launchers.

A program owns BLOCK_M rows and walks D in BLOCK_D chunks, so no row has to fit in registers; the
rank-r bottleneck (BLOCK_M, BLOCK_R) stays in registers between the passes. Re-reads of a chunk in a
later pass hit L2 (the program's rows were just read); HBM sees each input once and each output once.
"""
import torch
import triton
import triton.language as tl

from gist_fast.kernels._common import check_rows, dot_config, dot_operand, gelu, gelu_grad, row_tile

# The largest rank the kernels take; above it ops run the plain-torch backend. Set from the sm_90a gate
# (tests/sm90_gate.py): every rank up to it fits an H100's shared memory in every dtype.
MAX_RANK = 256


@triton.jit(do_not_specialize=["M", "R"])
def _adapter_fwd_kernel(
    x_ptr,  # (M, D) adapter input, row-major, any float dtype
    base_ptr,  # (M, D) residual base: x itself unless a separate base was given
    branch_ptr,  # (M, D) extra residual term, e.g. the attention output (HAS_BRANCH), else unused
    wd_ptr,  # (R, D) down-projection weight
    bd_ptr,  # (R,) down-projection bias
    wu_ptr,  # (D, R) up-projection weight
    bu_ptr,  # (D,) up-projection bias
    out_ptr,  # (M, D) out: residual + adapter, in the promoted dtype
    normed_ptr,  # (M, D) out: LayerNorm(out), out's dtype (HAS_NORM)
    nw_ptr,  # (D,) LayerNorm weight (HAS_NORM)
    nb_ptr,  # (D,) LayerNorm bias (HAS_NORM)
    mean_ptr,  # (M,) fp32 out: row mean of out (HAS_NORM)
    rstd_ptr,  # (M,) fp32 out: 1 / sqrt(var + eps) of out (HAS_NORM)
    M,  # rows
    D,  # model width
    R,  # adapter rank (<= BLOCK_R)
    scale,  # float: adapter output scale
    eps,  # float: LayerNorm epsilon
    HAS_BRANCH: tl.constexpr,  # add branch
    HAS_NORM: tl.constexpr,  # also write LayerNorm(out), mean, rstd
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_D: tl.constexpr,  # columns per chunk
    BLOCK_R: tl.constexpr,  # rank padded to a power of two >= 16
    DOT_DTYPE: tl.constexpr,  # dtype of the dot operands (bf16 / fp16 under autocast or a 16-bit model, else fp32)
    DOT_PRECISION: tl.constexpr,  # tl.dot input precision for fp32 operands
):
    """out = (base or x) + branch + scale (GELU(x W_d^T + b_d) W_u^T + b_u), fp32 math;
    normed = (out - mean) rstd w + b with mean and variance combined chunk by chunk (Chan et al.)."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    row_off = rows[:, None] * D
    ranks = tl.arange(0, BLOCK_R)
    rank_mask = ranks < R
    cols0 = tl.arange(0, BLOCK_D)
    # pass 1: h = x W_d^T over D chunks
    h = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + cols0
        col_mask = cols < D
        x = tl.load(x_ptr + row_off + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        wd_t = tl.load(wd_ptr + ranks[None, :] * D + cols[:, None],
                       mask=rank_mask[None, :] & col_mask[:, None], other=0.0)
        h = tl.dot(dot_operand(x, DOT_DTYPE), dot_operand(wd_t, DOT_DTYPE), h, input_precision=DOT_PRECISION)
    bd = tl.load(bd_ptr + ranks, mask=rank_mask, other=0.0).to(tl.float32)
    a = dot_operand(gelu(h + bd[None, :]), DOT_DTYPE)  # padded ranks: GELU(0) = 0
    # pass 2: out = residual + scale (a W_u^T + b_u), LayerNorm statistics on the stored (rounded) out
    mean = tl.zeros((BLOCK_M,), tl.float32)
    m2 = tl.zeros((BLOCK_M,), tl.float32)
    n_a = tl.zeros((), tl.float32)  # columns folded into mean / m2 so far
    for d0 in range(0, D, BLOCK_D):
        cols, col_mask, mask, offs = row_tile(d0, cols0, D, row_mask, row_off)
        wu_t = tl.load(wu_ptr + cols[None, :] * R + ranks[:, None],
                       mask=rank_mask[:, None] & col_mask[None, :], other=0.0)
        y = tl.dot(a, dot_operand(wu_t, DOT_DTYPE), input_precision=DOT_PRECISION)
        bu = tl.load(bu_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        res = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_BRANCH:
            res += tl.load(branch_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        out = (res + scale * (y + bu[None, :])).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + offs, out, mask=mask)
        if HAS_NORM:
            n_b = tl.sum(col_mask.to(tl.float32), axis=0)
            o = tl.where(col_mask[None, :], out.to(tl.float32), 0.0)
            mean_b = tl.sum(o, axis=1) / n_b
            dev = tl.where(col_mask[None, :], o - mean_b[:, None], 0.0)
            delta = mean_b - mean
            n = n_a + n_b
            mean += delta * (n_b / n)
            m2 += tl.sum(dev * dev, axis=1) + delta * delta * (n_a * n_b / n)
            n_a = n
    if HAS_NORM:
        rstd = 1.0 / tl.sqrt(m2 / D + eps)
        tl.store(mean_ptr + rows, mean, mask=row_mask)
        tl.store(rstd_ptr + rows, rstd, mask=row_mask)
        tl.debug_barrier()  # pass 3 reads out back, possibly in another thread's layout
        for d0 in range(0, D, BLOCK_D):
            cols, col_mask, mask, offs = row_tile(d0, cols0, D, row_mask, row_off)
            o = tl.load(out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(nw_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
            b = tl.load(nb_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
            normed = (o - mean[:, None]) * rstd[:, None] * w[None, :] + b[None, :]
            tl.store(normed_ptr + offs, normed.to(normed_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _add_partial(ptrs, values, mask, ATOMIC: tl.constexpr):
    """values added into a weight-gradient slot: the shared one with relaxed atomics, or this program's own
    (no atomics, a fixed order)."""
    if ATOMIC:
        tl.atomic_add(ptrs, values, mask=mask, sem="relaxed")
    else:
        tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + values, mask=mask)


@triton.jit(do_not_specialize=["M", "R"])
def _adapter_bwd_kernel(
    gout_ptr,  # (M, D) upstream gradient of out
    gnormed_ptr,  # (M, D) upstream gradient of normed (HAS_NORM)
    x_ptr,  # (M, D) adapter input
    wd_ptr,  # (R, D) down-projection weight
    bd_ptr,  # (R,) down-projection bias
    wu_ptr,  # (D, R) up-projection weight
    out_ptr,  # (M, D) forward out (HAS_NORM)
    nw_ptr,  # (D,) LayerNorm weight (HAS_NORM)
    mean_ptr,  # (M,) fp32 LayerNorm mean of out (HAS_NORM)
    rstd_ptr,  # (M,) fp32 LayerNorm rstd of out (HAS_NORM)
    gx_ptr,  # (M, D) out: grad of x, x's dtype
    gres_ptr,  # (M, D) out: g, the total gradient reaching out, gout's dtype (HAS_NORM)
    gwd_ptr,  # (P, R, D) fp32, zeroed: per-program partial grad of W_d (P = 1 and relaxed atomic adds with ATOMIC)
    gbd_ptr,  # (P, R) fp32 out: partial grad of b_d
    gwu_ptr,  # (P, D, R) fp32 out: partial grad of W_u
    gbu_ptr,  # (P, D) fp32 out: partial grad of b_u
    gnw_ptr,  # (P, D) fp32 out: partial grad of the LayerNorm weight (HAS_NORM)
    gnb_ptr,  # (P, D) fp32 out: partial grad of the LayerNorm bias (HAS_NORM)
    M,  # rows
    D,  # model width
    R,  # adapter rank (<= BLOCK_R)
    scale,  # float: adapter output scale
    HAS_NORM: tl.constexpr,  # a LayerNorm was fused: g = gout + LayerNorm backward of gnormed
    X_IS_BASE: tl.constexpr,  # the residual was x: grad_x also gets g
    ATOMIC: tl.constexpr,  # one row tile per program, weight gradients added into slot 0 with relaxed fp32 atomics;
    # else a persistent grid of P programs, each summing its row tiles' weight gradients into its own slot
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_D: tl.constexpr,  # columns per chunk
    BLOCK_R: tl.constexpr,  # rank padded to a power of two >= 16
    DOT_DTYPE: tl.constexpr,  # dtype of the dot operands, as in the forward
    DOT_PRECISION: tl.constexpr,  # tl.dot input precision for fp32 operands
):
    """g = gout + rstd (w gn - mean(xhat w gn) xhat - mean(w gn)); h = x W_d^T + b_d; gh = scale (g W_u) GELU'(h);
    grad_x = gh W_d (+ g); dW_u = scale g^T GELU(h); db_u = scale sum g; dW_d = gh^T x; db_d = sum gh."""
    pid = tl.program_id(0).to(tl.int64)
    ranks = tl.arange(0, BLOCK_R)
    rank_mask = ranks < R
    cols0 = tl.arange(0, BLOCK_D)
    slot = 0 if ATOMIC else pid  # this program's partial-gradient slot
    for tile in range(pid, tl.cdiv(M, BLOCK_M), tl.num_programs(0)):  # one tile per program with ATOMIC
        if not ATOMIC:
            tl.debug_barrier()  # the previous tile's slot updates land before this tile reads them back
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        row_off = rows[:, None] * D
        # pass A: h = x W_d^T, and the LayerNorm backward row sums c1 = sum(xhat w gn), c2 = sum(w gn)
        h = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
        c1 = tl.zeros((BLOCK_M,), tl.float32)
        c2 = tl.zeros((BLOCK_M,), tl.float32)
        if HAS_NORM:
            mean = tl.load(mean_ptr + rows, mask=row_mask, other=0.0)
            rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
        for d0 in range(0, D, BLOCK_D):
            cols, col_mask, mask, offs = row_tile(d0, cols0, D, row_mask, row_off)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0)
            wd_t = tl.load(wd_ptr + ranks[None, :] * D + cols[:, None],
                           mask=rank_mask[None, :] & col_mask[:, None], other=0.0)
            h = tl.dot(dot_operand(x, DOT_DTYPE), dot_operand(wd_t, DOT_DTYPE), h, input_precision=DOT_PRECISION)
            if HAS_NORM:
                o = tl.load(out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                gn = tl.load(gnormed_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(nw_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
                xhat = (o - mean[:, None]) * rstd[:, None]
                wgn = w[None, :] * gn
                c1 += tl.sum(xhat * wgn, axis=1)
                c2 += tl.sum(wgn, axis=1)
        c1 = c1 / D
        c2 = c2 / D
        bd = tl.load(bd_ptr + ranks, mask=rank_mask, other=0.0).to(tl.float32)
        h += bd[None, :]
        a = dot_operand(gelu(h), DOT_DTYPE)
        # pass B: g, ga = g W_u, and the partial gradients of W_u, b_u and the LayerNorm affine
        ga = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols, col_mask, mask, offs = row_tile(d0, cols0, D, row_mask, row_off)
            g = tl.load(gout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_NORM:
                o = tl.load(out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                gn = tl.load(gnormed_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(nw_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
                xhat = (o - mean[:, None]) * rstd[:, None]
                g += rstd[:, None] * (w[None, :] * gn - (xhat * c1[:, None] + c2[:, None]))
                g = tl.where(mask, g, 0.0)
                tl.store(gres_ptr + offs, g.to(gres_ptr.dtype.element_ty), mask=mask)
                gnw = tl.sum(gn * xhat, axis=0)
                gnb = tl.sum(gn, axis=0)
                _add_partial(gnw_ptr + slot * D + cols, gnw, col_mask, ATOMIC)
                _add_partial(gnb_ptr + slot * D + cols, gnb, col_mask, ATOMIC)
            wu = tl.load(wu_ptr + cols[:, None] * R + ranks[None, :],
                         mask=col_mask[:, None] & rank_mask[None, :], other=0.0)
            g_dot = dot_operand(g, DOT_DTYPE)
            ga = tl.dot(g_dot, dot_operand(wu, DOT_DTYPE), ga, input_precision=DOT_PRECISION)
            gwu = scale * tl.dot(tl.trans(g_dot), a, input_precision=DOT_PRECISION)  # (BLOCK_D, BLOCK_R)
            gbu = scale * tl.sum(g, axis=0)
            gwu_offs = slot * D * R + cols[:, None] * R + ranks[None, :]
            gwu_mask = col_mask[:, None] & rank_mask[None, :]
            _add_partial(gwu_ptr + gwu_offs, gwu, gwu_mask, ATOMIC)
            _add_partial(gbu_ptr + slot * D + cols, gbu, col_mask, ATOMIC)
        gh = scale * ga * gelu_grad(h)  # rows past M have g = 0, hence gh = 0
        gbd = tl.sum(gh, axis=0)
        gh = dot_operand(gh, DOT_DTYPE)
        _add_partial(gbd_ptr + slot * R + ranks, gbd, rank_mask, ATOMIC)
        if HAS_NORM and X_IS_BASE:
            tl.debug_barrier()  # pass C reads g back from gres
        # pass C: grad_x = gh W_d (+ g) and the partial gradient of W_d
        for d0 in range(0, D, BLOCK_D):
            cols, col_mask, mask, offs = row_tile(d0, cols0, D, row_mask, row_off)
            wd = tl.load(wd_ptr + ranks[:, None] * D + cols[None, :],
                         mask=rank_mask[:, None] & col_mask[None, :], other=0.0)
            gx = tl.dot(gh, dot_operand(wd, DOT_DTYPE), input_precision=DOT_PRECISION)
            if X_IS_BASE:
                if HAS_NORM:
                    gx += tl.load(gres_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                else:
                    gx += tl.load(gout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(gx_ptr + offs, gx.to(gx_ptr.dtype.element_ty), mask=mask)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0)
            gwd = tl.dot(tl.trans(gh), dot_operand(x, DOT_DTYPE), input_precision=DOT_PRECISION)  # (BLOCK_R, BLOCK_D)
            gwd_offs = slot * R * D + ranks[:, None] * D + cols[None, :]
            gwd_mask = rank_mask[:, None] & col_mask[None, :]
            _add_partial(gwd_ptr + gwd_offs, gwd, gwd_mask, ATOMIC)


# BLOCK_R -> (BLOCK_M, BLOCK_D, num_warps, num_stages) per pass (the backward holds more tiles: narrower chunks)
# and dot-operand width; every entry is held to an H100's shared memory and (16-bit, rank <= 64) to zero
# register spills by tests/test_sm90_gate.py.
_TILES = {
    ("fwd", 16): {16: (64, 128, 8, 2), 32: (64, 64, 8, 2), 64: (64, 64, 8, 2),
                  128: (64, 32, 8, 2), 256: (32, 32, 4, 2)},
    ("bwd", 16): {16: (64, 64, 8, 2), 32: (64, 32, 8, 2), 64: (64, 32, 8, 2),
                  128: (64, 32, 8, 2), 256: (32, 32, 4, 2)},
    ("fwd", 32): {16: (32, 64, 4, 1), 32: (32, 64, 4, 1), 64: (32, 32, 4, 1),
                  128: (32, 32, 4, 1), 256: (16, 32, 4, 1)},
    ("bwd", 32): {16: (32, 64, 4, 1), 32: (32, 64, 4, 1), 64: (32, 32, 4, 1),
                  128: (32, 32, 4, 1), 256: (16, 32, 4, 1)},
}


def _persistent_programs(device: torch.device) -> int:
    """Programs of the deterministic backward: one per SM, so its fp32 partials stay one wave's worth."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2


def _plan(direction: str, R: int, dot_dtype, block_m=None, block_d=None):
    """(BLOCK_M, BLOCK_D, BLOCK_R, num_warps, num_stages) of the "fwd" or "bwd" kernel for rank R; block_m /
    block_d override (tests)."""
    block_r = max(16, triton.next_power_of_2(R))
    bm, bd, warps, stages = _TILES[direction, dot_dtype.primitive_bitwidth][block_r]
    return block_m or bm, block_d or bd, block_r, warps, stages


def adapter_fwd(x, w_down, b_down, w_up, b_up, scale, base, branch, norm_weight, norm_bias, eps, dot_dtype=None,
                *, block_m=None, block_d=None):
    """Launcher for gist_fast::adapter_fwd: returns out, normed, mean, rstd (the last three empty without a norm).
    dot_dtype: the autocast dtype the adapter's linears run in (None: the weights' dtype decides)."""
    M, D = x.shape
    R = w_down.shape[0]
    check_rows(D, x=x, base=base, branch=branch, w_down=w_down, b_up=b_up, norm_weight=norm_weight, norm_bias=norm_bias)
    check_rows(R, w_up=w_up, b_down=b_down)
    dtype = x.dtype
    for t in (base, branch):
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    out = torch.empty((M, D), dtype=dtype, device=x.device)
    has_norm = norm_weight is not None
    if has_norm:
        normed = torch.empty_like(out)
        mean = torch.empty(M, dtype=torch.float32, device=x.device)
        rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    else:
        normed = out.new_empty((0,))
        mean, rstd = x.new_empty((0,), dtype=torch.float32), x.new_empty((0,), dtype=torch.float32)
    if M == 0:
        return out, normed, mean, rstd
    dot, precision = dot_config(w_down.dtype, dot_dtype)
    bm, bd, br, warps, stages = _plan("fwd", R, dot, block_m, block_d)
    _adapter_fwd_kernel[(triton.cdiv(M, bm),)](
        x, base if base is not None else x, branch if branch is not None else x,
        w_down, b_down, w_up, b_up, out,
        normed if has_norm else out, norm_weight if has_norm else b_up, norm_bias if has_norm else b_up,
        mean if has_norm else out, rstd if has_norm else out,
        M, D, R, float(scale), float(eps),
        HAS_BRANCH=branch is not None, HAS_NORM=has_norm,
        BLOCK_M=bm, BLOCK_D=bd, BLOCK_R=br, DOT_DTYPE=dot, DOT_PRECISION=precision,
        num_warps=warps, num_stages=stages,
    )
    return out, normed, mean, rstd


def adapter_bwd(grad_out, grad_normed, x, w_down, b_down, w_up, scale, out, norm_weight, mean, rstd, x_is_base,
                dot_dtype=None, *, block_m=None, block_d=None, atomic=None):
    """Launcher for gist_fast::adapter_bwd: grad_x, grad_residual, the four adapter weight gradients and the two
    LayerNorm affine gradients. Weight gradients are reduced with relaxed fp32 atomics or, under
    torch.use_deterministic_algorithms(True) (or atomic=False), by one program per SM, each summing its row
    tiles into its own fp32 slot, and the slots summed in a fixed order."""
    M, D = x.shape
    R = w_down.shape[0]
    has_norm = norm_weight is not None
    check_rows(D, grad_out=grad_out, grad_normed=grad_normed, x=x, out=out, w_down=w_down, norm_weight=norm_weight)
    check_rows(R, w_up=w_up, b_down=b_down)
    dev = x.device
    dot, precision = dot_config(w_down.dtype, dot_dtype)
    bm, bd, br, warps, stages = _plan("bwd", R, dot, block_m, block_d)
    tiles = triton.cdiv(M, bm)
    atomic = not torch.are_deterministic_algorithms_enabled() if atomic is None else atomic
    grid = tiles if atomic else max(1, min(tiles, _persistent_programs(dev)))
    # fp32 weight gradients, zeroed in one launch: one slot shared through atomics, or one per program
    shapes = [(R, D), (R,), (D, R), (D,)] + ([(D,), (D,)] if has_norm else [])
    parts = [torch.empty((1 if atomic else grid, *shape), dtype=torch.float32, device=dev) for shape in shapes]
    torch._foreach_zero_(parts)
    gwd, gbd, gwu, gbu, *gn = parts
    grad_x = torch.empty_like(x)
    grad_res = torch.empty_like(grad_out) if has_norm else grad_out.new_empty((0,))
    if M > 0:
        _adapter_bwd_kernel[(grid,)](
            grad_out, grad_normed if has_norm else grad_out, x, w_down, b_down, w_up,
            out if has_norm else x, norm_weight if has_norm else b_down,
            mean if has_norm else gbd, rstd if has_norm else gbd,
            grad_x, grad_res if has_norm else grad_x,
            gwd, gbd, gwu, gbu, gn[0] if has_norm else gbu, gn[1] if has_norm else gbu,
            M, D, R, float(scale),
            HAS_NORM=has_norm, X_IS_BASE=bool(x_is_base), ATOMIC=atomic,
            BLOCK_M=bm, BLOCK_D=bd, BLOCK_R=br, DOT_DTYPE=dot, DOT_PRECISION=precision,
            num_warps=warps, num_stages=stages,
        )
    g_wd, g_bd, g_wu, g_bu, *g_norm = (p[0] if atomic else p.sum(0) for p in parts)
    if not has_norm:
        g_norm = [g_bd.new_empty((0,)), g_bd.new_empty((0,))]  # two tensors: op outputs may not alias
    return (grad_x, grad_res, g_wd.to(w_down.dtype), g_bd.to(b_down.dtype), g_wu.to(w_up.dtype), g_bu.to(w_up.dtype),
            *g_norm)
