"""GIST and iDAT losses, one launch each way: the per-row cross-entropies and temperature-KL (or MSE) terms of two
logit sets, their gradients and the batch reduction in the forward kernel; the upstream scaling in the backward.

The forward reads each row of both logit sets twice (online softmax statistics, then the gradients), writes the
per-row loss and gradients, and the last program to finish (a completion ticket) sums the row losses in a fixed
order, counts the rows that are not ignored and writes the reduced loss: no host sync, no second kernel, the
same result on every run, and capturable in a CUDA graph. The ticket is a fresh zeroed int32 per call (a 4-byte
fill): a counter cached across calls would be shared by graphs replayed on other streams, or handed to another
tensor by a CUDA-graph memory pool, and one missed count would leave every later loss unwritten.
"""
import torch
import triton
import triton.language as tl

from gist_fast.kernels._common import check_rows, online_stats, safe_max

MODES = ("gist", "kl", "mse")  # GIST; iDAT with KL(p_teacher || p_student); iDAT with the mean squared logit gap
REDUCTIONS = ("none", "mean", "sum")
_BLOCK_C = (128, 1024, 4096)  # ViT heads (C <= 1000) in one chunk; 4096-wide chunks beyond
_BLOCK_B = 256  # rows the last program reduces per step


@triton.jit(do_not_specialize=["B", "ignore_index", "reduction"])
def _pair_loss_fwd_kernel(
    a_ptr,  # (B, C) z_a: class-token logits (GIST) or student logits (iDAT), row-major, any float dtype
    b_ptr,  # (B, C) z_b: gist-token logits (GIST) or teacher logits (iDAT), a's dtype
    target_ptr,  # (B,) int64 labels; ignore_index marks rows to skip
    rows_ptr,  # (B,) fp32 out: per-row loss (0 on ignored rows)
    grad_a_ptr,  # (B, C) out, a's dtype: d rows[b] / d z_a[b] (COMPUTE_GRAD)
    grad_b_ptr,  # (B, C) out, b's dtype: d rows[b] / d z_b[b] (COMPUTE_GRAD)
    loss_ptr,  # () fp32 out: the mean (reduction 1) or sum of rows
    n_valid_ptr,  # () fp32 out: rows whose target is not ignore_index
    ticket_ptr,  # () int32: programs finished so far, 0 on entry
    B,  # rows
    C,  # classes
    w_b,  # float: weight of CE(z_b) (GIST)
    w_kl,  # float: weight of each KL term (GIST)
    inv_t,  # float: 1 / temperature
    ignore_index,  # int: label of ignored rows
    reduction,  # int: 0 none, 1 mean, 2 sum
    MODE: tl.constexpr,  # 0 GIST, 1 iDAT-KL, 2 iDAT-MSE
    COMPUTE_GRAD: tl.constexpr,  # write grad_a / grad_b
    BLOCK_C: tl.constexpr,  # classes per chunk (power of two)
    BLOCK_B: tl.constexpr,  # rows per step of the final reduction
):
    """rows = CE(z_a) + c_b CE(z_b) + k_ab KL(p_a||p_b) + k_ba KL(p_b||p_a) (p = softmax(z / T)), or, MODE 2,
    CE(z_a) + CE(z_b) + mean_c (z_a - z_b)^2; GIST: c_b = w_b, k_ab = k_ba = w_kl;
    iDAT-KL: c_b = 1, k_ab = 0, k_ba = 1."""
    row = tl.program_id(0).to(tl.int64)
    base = row * C
    tgt = tl.load(target_ptr + row)
    valid = tgt != ignore_index
    tl.device_assert(~valid | ((tgt >= 0) & (tgt < C)),
                     "gist_fast loss: target label outside [0, classes) and not ignore_index")
    tgt = tl.where(valid, tgt, 0)
    if MODE == 0:
        c_b, k_ab, k_ba = w_b, w_kl, w_kl
    else:
        c_b, k_ab, k_ba = 1.0, 0.0, 1.0
    cols0 = tl.arange(0, BLOCK_C)
    ninf = float("-inf")
    m_a = tl.full((), ninf, tl.float32)
    m_b = tl.full((), ninf, tl.float32)
    s1_a = tl.zeros((), tl.float32)
    st_a = tl.zeros((), tl.float32)
    x_a = tl.zeros((), tl.float32)
    s1_b = tl.zeros((), tl.float32)
    st_b = tl.zeros((), tl.float32)
    x_b = tl.zeros((), tl.float32)
    sq = tl.zeros((), tl.float32)
    # pass 1: online max, sum exp(z - m), sum exp((z - m) / T) and the cross term of both rows
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + cols0
        mask = cols < C
        z_a = tl.load(a_ptr + base + cols, mask=mask, other=ninf).to(tl.float32)
        z_b = tl.load(b_ptr + base + cols, mask=mask, other=ninf).to(tl.float32)
        m_a, s1_a, st_a, x_a = online_stats(z_a, z_b, m_a, s1_a, st_a, x_a, inv_t)
        m_b, s1_b, st_b, x_b = online_stats(z_b, z_a, m_b, s1_b, st_b, x_b, inv_t)
        if MODE == 2:
            diff = z_a - z_b
            sq += tl.sum(tl.where(mask, diff * diff, 0.0), axis=0)
    shift_a, shift_b = safe_max(m_a), safe_max(m_b)
    lse_a = shift_a + tl.log(s1_a)
    lse_b = shift_b + tl.log(s1_b)
    log_st_a, log_st_b = tl.log(st_a), tl.log(st_b)  # lse(z / T) = shift / T + log st
    mu_a = x_a * inv_t / st_a  # E_{p_a}[(z_a - z_b) / T]
    mu_b = x_b * inv_t / st_b  # E_{p_b}[(z_b - z_a) / T]
    gap = (shift_b * inv_t + log_st_b) - (shift_a * inv_t + log_st_a)  # lse(z_b / T) - lse(z_a / T)
    if MODE == 2:
        div = sq / C
    else:
        div = k_ab * (mu_a + gap) + k_ba * (mu_b - gap)  # KL(p_a||p_b) = mu_a + gap, KL(p_b||p_a) = mu_b - gap
    zt_a = tl.load(a_ptr + base + tgt, mask=valid, other=0.0).to(tl.float32)
    zt_b = tl.load(b_ptr + base + tgt, mask=valid, other=0.0).to(tl.float32)
    loss = (lse_a - zt_a) + c_b * (lse_b - zt_b) + div
    tl.store(rows_ptr + row, tl.where(valid, loss, 0.0))
    # pass 2: the gradients of this row's loss
    if COMPUTE_GRAD:
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + cols0
            mask = cols < C
            z_a = tl.load(a_ptr + base + cols, mask=mask, other=ninf).to(tl.float32)
            z_b = tl.load(b_ptr + base + cols, mask=mask, other=ninf).to(tl.float32)
            onehot = tl.where(cols == tgt, 1.0, 0.0)
            d_a = tl.exp(z_a - lse_a) - onehot
            d_b = c_b * (tl.exp(z_b - lse_b) - onehot)
            if MODE == 2:
                d_gap = (z_a - z_b) * (2.0 / C)
                d_a += d_gap
                d_b -= d_gap
            else:
                p_a = tl.exp((z_a - shift_a) * inv_t - log_st_a)
                p_b = tl.exp((z_b - shift_b) * inv_t - log_st_b)
                # d KL(p_a||p_b) / d z_a = p_a ((z_a - z_b) / T - mu_a) / T (the lse terms cancel; 0 log 0 = 0),
                # d KL(p_a||p_b) / d z_b = (p_b - p_a) / T, and the same with a and b swapped
                own_a = tl.where(z_a == ninf, 0.0, p_a * ((z_a - z_b) * inv_t - mu_a))
                own_b = tl.where(z_b == ninf, 0.0, p_b * ((z_b - z_a) * inv_t - mu_b))
                d_a += inv_t * (k_ab * own_a + k_ba * (p_a - p_b))
                d_b += inv_t * (k_ba * own_b + k_ab * (p_b - p_a))
            tl.store(grad_a_ptr + base + cols, tl.where(valid, d_a, 0.0).to(grad_a_ptr.dtype.element_ty), mask=mask)
            tl.store(grad_b_ptr + base + cols, tl.where(valid, d_b, 0.0).to(grad_b_ptr.dtype.element_ty), mask=mask)
    # the batch reduction (and the count of rows kept, which the backward of "mean" needs), by the last program
    tl.debug_barrier()  # every thread's row-loss store happens before the release below
    ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
    if ticket == B - 1:
        total = tl.zeros((), tl.float32)
        count = tl.zeros((), tl.float32)
        for b0 in range(0, B, BLOCK_B):
            offs = b0 + tl.arange(0, BLOCK_B)
            in_batch = offs < B
            total += tl.sum(tl.load(rows_ptr + offs, mask=in_batch, other=0.0), axis=0)
            labels = tl.load(target_ptr + offs, mask=in_batch, other=ignore_index)
            count += tl.sum((labels != ignore_index).to(tl.float32), axis=0)
        tl.store(loss_ptr, tl.where(reduction == 1, total / count, total))  # 0 / 0 = NaN, as torch's mean CE
        tl.store(n_valid_ptr, count)


@triton.jit(do_not_specialize=["upstream_stride", "reduction"])
def _pair_loss_bwd_kernel(
    grad_a_ptr,  # (B, C) per-row gradients of z_a from the forward, any float dtype
    grad_b_ptr,  # (B, C) per-row gradients of z_b, grad_a's dtype
    upstream_ptr,  # () or (B,) fp32: gradient of the reduced loss, or of each row (reduction 0)
    upstream_stride,  # elements between two rows' upstream gradients (reduction 0; 0 when expanded)
    n_valid_ptr,  # () fp32: rows that were not ignored (reduction 1)
    out_a_ptr,  # (B, C) out, grad_a's dtype
    out_b_ptr,  # (B, C) out
    C,  # classes
    reduction,  # int: 0 none, 1 mean, 2 sum
    BLOCK_C: tl.constexpr,  # columns per program
):
    """out = grad * s for both logit sets, s = upstream[b] (none), upstream / n_valid (mean) or upstream (sum),
    fp32 math; grid (B, cdiv(C, BLOCK_C))."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = cols < C
    if reduction == 0:
        s = tl.load(upstream_ptr + row * upstream_stride).to(tl.float32)
    else:
        s = tl.load(upstream_ptr).to(tl.float32)
        if reduction == 1:
            s = s / tl.load(n_valid_ptr)
    offs = row * C + cols
    g_a = tl.load(grad_a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g_b = tl.load(grad_b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_a_ptr + offs, (g_a * s).to(out_a_ptr.dtype.element_ty), mask=mask)
    tl.store(out_b_ptr + offs, (g_b * s).to(out_b_ptr.dtype.element_ty), mask=mask)


def _block_c(C: int) -> int:
    return next((b for b in _BLOCK_C if C <= b), _BLOCK_C[-1])


def pair_loss_fwd(a, b, target, mode, w_b, w_kl, temperature, ignore_index, reduction, compute_grad):
    """Launcher for gist_fast::pair_loss. Returns the loss (() fp32, or the (B,) fp32 rows for "none"), the
    per-row gradients of a and b (a's dtype; empty without compute_grad) and the count of rows not ignored."""
    B, C = a.shape
    check_rows(C, a=a, b=b)
    check_rows(B, target=target)
    red = REDUCTIONS.index(reduction)
    dev = a.device
    rows = torch.empty(B, dtype=torch.float32, device=dev)
    loss = torch.empty((), dtype=torch.float32, device=dev)
    n_valid = torch.empty((), dtype=torch.float32, device=dev)
    grad_a = torch.empty_like(a) if compute_grad else a.new_empty((0,))
    grad_b = torch.empty_like(b) if compute_grad else b.new_empty((0,))
    if B == 0:  # nothing to launch: the mean of no rows is NaN, as torch's
        return (rows if red == 0 else loss.fill_(float("nan") if red == 1 else 0.0)), grad_a, grad_b, n_valid.zero_()
    block = _block_c(C)
    _pair_loss_fwd_kernel[(B,)](
        a, b, target, rows, grad_a if compute_grad else rows, grad_b if compute_grad else rows, loss, n_valid,
        torch.zeros((), dtype=torch.int32, device=dev), B, C, float(w_b), float(w_kl), 1.0 / float(temperature),
        int(ignore_index), red,
        MODE=MODES.index(mode), COMPUTE_GRAD=bool(compute_grad), BLOCK_C=block, BLOCK_B=_BLOCK_B,
        num_warps=4 if block <= 1024 else 8,
        debug=True, sanitize_overflow=False,  # keep the label check (device_assert), without integer-overflow checks
    )
    return (rows if red == 0 else loss), grad_a, grad_b, n_valid


def pair_loss_bwd(upstream, grad_a, grad_b, n_valid, reduction):
    """Launcher for gist_fast::pair_loss_bwd: the gradients of a and b given the loss's upstream gradient."""
    out_a, out_b = torch.empty_like(grad_a), torch.empty_like(grad_b)
    if grad_a.numel() == 0:
        return out_a, out_b
    B, C = grad_a.shape
    check_rows(C, grad_a=grad_a, grad_b=grad_b)
    red = REDUCTIONS.index(reduction)
    block = _block_c(C)
    _pair_loss_bwd_kernel[(B, triton.cdiv(C, block))](
        grad_a, grad_b, upstream, upstream.stride(0) if red == 0 else 0, n_valid, out_a, out_b, C, red,
        BLOCK_C=block, num_warps=4 if block <= 1024 else 8,
    )
    return out_a, out_b
