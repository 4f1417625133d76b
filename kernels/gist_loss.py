"""GIST loss: one row-wise kernel for the per-row loss and its gradients, and the row-scaling backward."""
import torch
import triton
import triton.language as tl

from gist_fast.kernels._common import block_size, num_warps, online_stats, safe_max

_MAX_BLOCK_C = 4096


@triton.jit
def _gist_loss_fwd_kernel(
    logits_ptr,  # (B, C) z_c, class-token logits, contiguous, any float dtype
    gist_ptr,  # (B, C) z_g, gist-token logits, same dtype
    target_ptr,  # (B,) int64 labels, ignore_index marks rows to skip
    rows_ptr,  # (B,) fp32 out: per-row loss (0 on ignored rows)
    grad_c_ptr,  # (B, C) out, logits dtype: d rows[b] / d z_c[b] (only when COMPUTE_GRAD)
    grad_g_ptr,  # (B, C) out, logits dtype: d rows[b] / d z_g[b] (only when COMPUTE_GRAD)
    C,  # number of classes
    gist_weight,  # float: weight of CE(z_g)
    kl_weight,  # float: weight of the two KL terms
    inv_t,  # float: 1 / temperature
    ignore_index,  # int: label of ignored rows
    COMPUTE_GRAD: tl.constexpr,  # write grad_c / grad_g
    BLOCK_C: tl.constexpr,  # classes per chunk (power of two)
):
    """rows = CE(z_c) + w_g CE(z_g) + w_kl (KL(p_c||p_g) + KL(p_g||p_c)), p = softmax(z / T); pass 1: online stats,
    pass 2: d/dz_c = softmax(z_c) - 1_y + w_kl/T [p_c (log p_c - log p_g - KL_cg) + p_c - p_g], d/dz_g alike."""
    row = tl.program_id(0).to(tl.int64)
    base = row * C
    tgt = tl.load(target_ptr + row)
    valid = tgt != ignore_index
    tgt = tl.where(valid, tgt, 0)
    cols0 = tl.arange(0, BLOCK_C)
    ninf = float("-inf")
    m_c = tl.full((), ninf, tl.float32)
    m_g = tl.full((), ninf, tl.float32)
    s1_c = tl.zeros((), tl.float32)
    st_c = tl.zeros((), tl.float32)
    x_c = tl.zeros((), tl.float32)
    s1_g = tl.zeros((), tl.float32)
    st_g = tl.zeros((), tl.float32)
    x_g = tl.zeros((), tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + cols0
        mask = cols < C
        z_c = tl.load(logits_ptr + base + cols, mask=mask, other=ninf).to(tl.float32)
        z_g = tl.load(gist_ptr + base + cols, mask=mask, other=ninf).to(tl.float32)
        m_c, s1_c, st_c, x_c = online_stats(z_c, z_g, m_c, s1_c, st_c, x_c, inv_t)
        m_g, s1_g, st_g, x_g = online_stats(z_g, z_c, m_g, s1_g, st_g, x_g, inv_t)
    shift_c, shift_g = safe_max(m_c), safe_max(m_g)
    lse_c = shift_c + tl.log(s1_c)
    lse_g = shift_g + tl.log(s1_g)
    log_st_c, log_st_g = tl.log(st_c), tl.log(st_g)  # lse(z / T) = shift / T + log st
    mu_c = x_c * inv_t / st_c  # E_{p_c}[(z_c - z_g) / T]
    mu_g = x_g * inv_t / st_g  # E_{p_g}[(z_g - z_c) / T]
    gap = (shift_g * inv_t + log_st_g) - (shift_c * inv_t + log_st_c)  # lse(z_g / T) - lse(z_c / T)
    kl_cg = mu_c + gap  # KL(p_c||p_g)
    kl_gc = mu_g - gap
    zt_c = tl.load(logits_ptr + base + tgt, mask=valid, other=0.0).to(tl.float32)
    zt_g = tl.load(gist_ptr + base + tgt, mask=valid, other=0.0).to(tl.float32)
    loss = (lse_c - zt_c) + gist_weight * (lse_g - zt_g) + kl_weight * (kl_cg + kl_gc)
    tl.store(rows_ptr + row, tl.where(valid, loss, 0.0))
    if COMPUTE_GRAD:
        kw_t = kl_weight * inv_t
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + cols0
            mask = cols < C
            z_c = tl.load(logits_ptr + base + cols, mask=mask, other=ninf).to(tl.float32)
            z_g = tl.load(gist_ptr + base + cols, mask=mask, other=ninf).to(tl.float32)
            onehot = tl.where(cols == tgt, 1.0, 0.0)
            lp_c = (z_c - shift_c) * inv_t - log_st_c  # log p_c
            lp_g = (z_g - shift_g) * inv_t - log_st_g
            p_c, p_g = tl.exp(lp_c), tl.exp(lp_g)
            # log p_c - log p_g - KL_cg = (z_c - z_g) / T - mu_c: the lse terms cancel exactly; 0 log 0 = 0
            kl_c = tl.where(z_c == ninf, 0.0, p_c * ((z_c - z_g) * inv_t - mu_c))
            kl_g = tl.where(z_g == ninf, 0.0, p_g * ((z_g - z_c) * inv_t - mu_g))
            d_c = tl.exp(z_c - lse_c) - onehot + kw_t * (kl_c + (p_c - p_g))
            d_g = gist_weight * (tl.exp(z_g - lse_g) - onehot) + kw_t * (kl_g + (p_g - p_c))
            d_c = tl.where(valid, d_c, 0.0)
            d_g = tl.where(valid, d_g, 0.0)
            tl.store(grad_c_ptr + base + cols, d_c.to(grad_c_ptr.dtype.element_ty), mask=mask)
            tl.store(grad_g_ptr + base + cols, d_g.to(grad_g_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scale_rows_kernel(
    grad_ptr,  # (B, C) per-row gradients, any float dtype
    scale_ptr,  # (B,) fp32 upstream gradient of each row's loss
    out_ptr,  # (B, C) out, grad's dtype
    C,  # columns per row
    BLOCK_C: tl.constexpr,  # columns per program (power of two)
):
    """out[b, c] = grad[b, c] * scale[b], computed in fp32;
    grid (B, cdiv(C, BLOCK_C)): one chunk of one row per program."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = cols < C
    s = tl.load(scale_ptr + row)
    g = tl.load(grad_ptr + row * C + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * C + cols, (g * s).to(out_ptr.dtype.element_ty), mask=mask)


def gist_loss_fwd(logits, gist_logits, target, gist_weight, kl_weight, temperature, ignore_index, compute_grad):
    """Per-row GIST loss (B,) fp32 and, if compute_grad, its gradients w.r.t. both logit sets (else empty)."""
    B, C = logits.shape
    rows = torch.empty(B, dtype=torch.float32, device=logits.device)
    grad_c = torch.empty_like(logits) if compute_grad else logits.new_empty((0,))
    grad_g = torch.empty_like(gist_logits) if compute_grad else gist_logits.new_empty((0,))
    if B == 0:
        return rows, grad_c, grad_g
    block = block_size(C, hi=_MAX_BLOCK_C)
    _gist_loss_fwd_kernel[(B,)](
        logits, gist_logits, target, rows, grad_c if compute_grad else rows, grad_g if compute_grad else rows,
        C, float(gist_weight), float(kl_weight), 1.0 / float(temperature), int(ignore_index),
        COMPUTE_GRAD=bool(compute_grad), BLOCK_C=block, num_warps=num_warps(block),
    )
    return rows, grad_c, grad_g


def scale_rows(grad, row_scale):
    """grad (B, C) * row_scale (B,) fp32 [:, None], fp32 math, grad's dtype: the loss ops' backward."""
    out = torch.empty_like(grad)
    if grad.numel() == 0:
        return out
    B, C = grad.shape
    block = block_size(C, hi=_MAX_BLOCK_C)
    _scale_rows_kernel[(B, triton.cdiv(C, block))](grad, row_scale, out, C, BLOCK_C=block, num_warps=num_warps(block))
    return out
