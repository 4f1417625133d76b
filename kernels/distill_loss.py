"""iDAT distillation loss: one row-wise kernel for the per-row loss and its gradients (student and teacher)."""
import torch
import triton
import triton.language as tl

from gist_fast.kernels._common import block_size, num_warps, online_stats, safe_max

_MAX_BLOCK_C = 4096


@triton.jit
def _distill_loss_fwd_kernel(
    student_ptr,  # (B, C) z_s, student logits, contiguous, any float dtype
    teacher_ptr,  # (B, C) z_t, teacher logits, same dtype
    target_ptr,  # (B,) int64 labels, ignore_index marks rows to skip
    rows_ptr,  # (B,) fp32 out: per-row loss (0 on ignored rows)
    grad_s_ptr,  # (B, C) out, logits dtype: d rows[b] / d z_s[b] (only when COMPUTE_GRAD)
    grad_t_ptr,  # (B, C) out, logits dtype: d rows[b] / d z_t[b] (only when COMPUTE_GRAD)
    C,  # number of classes
    inv_t,  # float: 1 / temperature (KIND 0)
    ignore_index,  # int: label of ignored rows
    KIND: tl.constexpr,  # 0: D = KL(p_t||p_s), p = softmax(z / T); 1: D = mean_c (z_s - z_t)^2
    COMPUTE_GRAD: tl.constexpr,  # write grad_s / grad_t
    BLOCK_C: tl.constexpr,  # classes per chunk (power of two)
):
    """rows = CE(z_s) + CE(z_t) + D; pass 1: online stats, pass 2: d/dz_s = softmax(z_s) - 1_y + (p_s - p_t)/T
    and d/dz_t = softmax(z_t) - 1_y + p_t (log p_t - log p_s - KL)/T (KIND 0), or the CEs' plus/minus 2 (z_s - z_t)/C (KIND 1)."""
    row = tl.program_id(0).to(tl.int64)
    base = row * C
    tgt = tl.load(target_ptr + row)
    valid = tgt != ignore_index
    tgt = tl.where(valid, tgt, 0)
    cols0 = tl.arange(0, BLOCK_C)
    ninf = float("-inf")
    m_s = tl.full((), ninf, tl.float32)
    m_t = tl.full((), ninf, tl.float32)
    s1_s = tl.zeros((), tl.float32)
    st_s = tl.zeros((), tl.float32)
    x_s = tl.zeros((), tl.float32)
    s1_t = tl.zeros((), tl.float32)
    st_t = tl.zeros((), tl.float32)
    x_t = tl.zeros((), tl.float32)
    sq = tl.zeros((), tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + cols0
        mask = cols < C
        z_s = tl.load(student_ptr + base + cols, mask=mask, other=ninf).to(tl.float32)
        z_t = tl.load(teacher_ptr + base + cols, mask=mask, other=ninf).to(tl.float32)
        m_s, s1_s, st_s, x_s = online_stats(z_s, z_t, m_s, s1_s, st_s, x_s, inv_t)
        m_t, s1_t, st_t, x_t = online_stats(z_t, z_s, m_t, s1_t, st_t, x_t, inv_t)
        if KIND == 1:
            diff = z_s - z_t
            sq += tl.sum(tl.where(mask, diff * diff, 0.0), axis=0)
    shift_s, shift_t = safe_max(m_s), safe_max(m_t)
    lse_s = shift_s + tl.log(s1_s)
    lse_t = shift_t + tl.log(s1_t)
    log_st_s, log_st_t = tl.log(st_s), tl.log(st_t)  # lse(z / T) = shift / T + log st
    if KIND == 0:
        mu_t = x_t * inv_t / st_t  # E_{p_t}[(z_t - z_s) / T]
        div = mu_t - (shift_t * inv_t + log_st_t) + (shift_s * inv_t + log_st_s)  # KL(p_t||p_s)
    else:
        div = sq / C
    zt_s = tl.load(student_ptr + base + tgt, mask=valid, other=0.0).to(tl.float32)
    zt_t = tl.load(teacher_ptr + base + tgt, mask=valid, other=0.0).to(tl.float32)
    loss = (lse_s - zt_s) + (lse_t - zt_t) + div
    tl.store(rows_ptr + row, tl.where(valid, loss, 0.0))
    if COMPUTE_GRAD:
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + cols0
            mask = cols < C
            z_s = tl.load(student_ptr + base + cols, mask=mask, other=ninf).to(tl.float32)
            z_t = tl.load(teacher_ptr + base + cols, mask=mask, other=ninf).to(tl.float32)
            onehot = tl.where(cols == tgt, 1.0, 0.0)
            d_s = tl.exp(z_s - lse_s) - onehot
            d_t = tl.exp(z_t - lse_t) - onehot
            if KIND == 0:
                lp_s = (z_s - shift_s) * inv_t - log_st_s  # log p_s
                lp_t = (z_t - shift_t) * inv_t - log_st_t
                p_s, p_t = tl.exp(lp_s), tl.exp(lp_t)
                d_s += inv_t * (p_s - p_t)
                # log p_t - log p_s - KL = (z_t - z_s) / T - mu_t: the lse terms cancel exactly; 0 log 0 = 0
                d_t += inv_t * tl.where(z_t == ninf, 0.0, p_t * ((z_t - z_s) * inv_t - mu_t))
            else:
                gap = (z_s - z_t) * (2.0 / C)
                d_s += gap
                d_t -= gap
            d_s = tl.where(valid, d_s, 0.0)
            d_t = tl.where(valid, d_t, 0.0)
            tl.store(grad_s_ptr + base + cols, d_s.to(grad_s_ptr.dtype.element_ty), mask=mask)
            tl.store(grad_t_ptr + base + cols, d_t.to(grad_t_ptr.dtype.element_ty), mask=mask)


def distill_loss_fwd(student, teacher, target, kind, temperature, ignore_index, compute_grad):
    """Per-row iDAT loss (B,) fp32 and, if compute_grad, its gradients w.r.t. student and teacher (else empty)."""
    B, C = student.shape
    rows = torch.empty(B, dtype=torch.float32, device=student.device)
    grad_s = torch.empty_like(student) if compute_grad else student.new_empty((0,))
    grad_t = torch.empty_like(teacher) if compute_grad else teacher.new_empty((0,))
    if B == 0:
        return rows, grad_s, grad_t
    if kind not in (0, 1):
        raise ValueError(f"distill kind must be 0 (kl) or 1 (mse), got {kind}")
    block = block_size(C, hi=_MAX_BLOCK_C)
    _distill_loss_fwd_kernel[(B,)](
        student, teacher, target, rows, grad_s if compute_grad else rows, grad_t if compute_grad else rows,
        C, 1.0 / float(temperature), int(ignore_index),
        KIND=int(kind), COMPUTE_GRAD=bool(compute_grad), BLOCK_C=block, num_warps=num_warps(block),
    )
    return rows, grad_s, grad_t
