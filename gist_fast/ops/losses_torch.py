"""The fused loss ops' contract (gist_fast::pair_loss / pair_loss_bwd) in plain PyTorch: the ops' default
implementation (any device without a kernel of its own: CPU without gist_fast._C, CUDA without triton, others).

fp32 math on the logits' rows with the gradients written out (the op's body runs below autograd, so autograd
cannot derive them there), as the C++ and Triton kernels compute them; the math is gist_fast.reference's,
restated per row.
"""
import torch
import torch.nn.functional as F
from torch import Tensor


def check_labels(target: Tensor, classes: int, ignore_index: int) -> None:
    """Labels in [0, classes) or ignore_index; asynchronous on CUDA (the Triton and C++ kernels check their own)."""
    in_range = ((target >= 0) & (target < classes)) | (target == ignore_index)
    torch._assert_async(in_range.all(),
                        f"target labels must lie in [0, {classes}) or equal ignore_index={ignore_index}")


def _kl_terms(log_p: Tensor, log_q: Tensor):
    """KL(p||q) per row and p (log p - log q - KL(p||q)), the T-scaled gradient of KL(p||q) in p's logits;
    0 log 0 = 0 where a logit is -inf."""
    masked = log_p == float("-inf")
    p = log_p.exp()
    kl = torch.where(masked, 0.0, p * (log_p - log_q)).sum(-1, keepdim=True)
    return kl[:, 0], torch.where(masked, 0.0, p * (log_p - log_q - kl))


def rows_and_grads(a, b, target, mode, w_b, w_kl, temperature, ignore_index):
    """Per-row losses (B,) and their gradients in a and b (B, C), at least fp32; 0 in rows whose target is
    ignore_index."""
    dtype = torch.promote_types(a.dtype, torch.float32)
    a, b = a.to(dtype), b.to(dtype)
    valid = (target != ignore_index)[:, None]
    safe = target.masked_fill(~valid[:, 0], 0)[:, None]
    onehot = F.one_hot(safe[:, 0], a.shape[1]).to(dtype)
    log_sa, log_sb = F.log_softmax(a, -1), F.log_softmax(b, -1)
    ce_a, ce_b = -log_sa.gather(1, safe)[:, 0], -log_sb.gather(1, safe)[:, 0]
    d_a, d_b = log_sa.exp() - onehot, log_sb.exp() - onehot  # d CE / d logits
    if mode == "mse":
        gap = a - b
        rows, g_a, g_b = ce_a + ce_b + gap.pow(2).mean(-1), d_a + 2 * gap / a.shape[1], d_b - 2 * gap / a.shape[1]
    else:
        log_p, log_q = F.log_softmax(a / temperature, -1), F.log_softmax(b / temperature, -1)
        kl_qp, t_q = _kl_terms(log_q, log_p)
        p_minus_q = (log_p.exp() - log_q.exp()) / temperature
        if mode == "gist":
            kl_pq, t_p = _kl_terms(log_p, log_q)
            rows = ce_a + w_b * ce_b + w_kl * (kl_pq + kl_qp)
            g_a = d_a + w_kl * (t_p / temperature + p_minus_q)
            g_b = w_b * d_b + w_kl * (t_q / temperature - p_minus_q)
        else:  # "kl": KL(q||p), q the teacher (b)
            rows, g_a, g_b = ce_a + ce_b + kl_qp, d_a + p_minus_q, d_b + t_q / temperature
    return (torch.where(valid[:, 0], rows, 0.0), torch.where(valid, g_a, 0.0), torch.where(valid, g_b, 0.0))


def pair_loss(a, b, target, mode, w_b, w_kl, temperature, ignore_index, reduction, compute_grad):
    """(loss, d row / d a, d row / d b, rows not ignored), as gist_fast::pair_loss states them."""
    check_labels(target, a.shape[1], ignore_index)
    rows, grad_a, grad_b = rows_and_grads(a, b, target, mode, w_b, w_kl, temperature, ignore_index)
    if compute_grad:
        grad_a, grad_b = grad_a.to(a.dtype), grad_b.to(b.dtype)
    else:
        grad_a, grad_b = a.new_empty((0,)), b.new_empty((0,))
    rows = rows.float()
    n_valid = (target != ignore_index).sum().float()
    loss = rows if reduction == "none" else rows.sum() / n_valid if reduction == "mean" else rows.sum()
    return loss, grad_a, grad_b, n_valid


def pair_loss_bwd(upstream, grad_a, grad_b, n_valid, reduction):
    """The per-row gradients times the upstream gradient (over n_valid for "mean"), fp32 products stored in the
    gradients' dtype."""
    if grad_a.numel() == 0:
        return torch.empty_like(grad_a), torch.empty_like(grad_b)
    scale = upstream.float() / n_valid if reduction == "mean" else upstream.float()
    scale = scale.expand(grad_a.shape[:1])[:, None]
    return (grad_a.float() * scale).to(grad_a.dtype), (grad_b.float() * scale).to(grad_b.dtype)
