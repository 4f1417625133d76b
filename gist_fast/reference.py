"""Plain-PyTorch definitions of every gist_fast op.

These are the oracle for the tests and benchmarks and the fallback when no fused backend applies.
They are written for clarity, in the input dtype, exactly as METHODS.md states the math.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def adapter(x: Tensor, w_down: Tensor, b_down: Tensor, w_up: Tensor, b_up: Tensor, scale: float,
            base: Optional[Tensor] = None, branch: Optional[Tensor] = None) -> Tensor:
    """out = base + branch + scale * (W_up GELU(W_down x + b_down) + b_up); base defaults to x."""
    out = F.linear(F.gelu(F.linear(x, w_down, b_down)), w_up, b_up) * scale
    out = out + (x if base is None else base)
    return out if branch is None else out + branch


def adapter_norm(x: Tensor, w_down: Tensor, b_down: Tensor, w_up: Tensor, b_up: Tensor, scale: float,
                 norm_weight: Tensor, norm_bias: Tensor, eps: float = 1e-6,
                 base: Optional[Tensor] = None, branch: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """The adapter above, plus LayerNorm(out) for the sub-layer that follows (a block's norm2)."""
    out = adapter(x, w_down, b_down, w_up, b_up, scale, base, branch)
    return out, F.layer_norm(out, out.shape[-1:], norm_weight, norm_bias, eps)


def _reduce(rows: Tensor, valid: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / valid.sum()  # 0/0 = nan when every row is ignored, as torch's mean CE


def _kl_rows(p_logits: Tensor, q_logits: Tensor, temperature: float) -> Tensor:
    """Per-row KL(softmax(p/T) || softmax(q/T))."""
    log_p = F.log_softmax(p_logits / temperature, dim=-1)
    log_q = F.log_softmax(q_logits / temperature, dim=-1)
    gap = torch.where(log_p == float("-inf"), 0.0, log_p - log_q)  # 0 log 0 = 0 for a -inf logit; NaN stays NaN
    return (log_p.exp() * gap).sum(-1)


def gist_loss(
    logits: Tensor,
    gist_logits: Tensor,
    target: Tensor,
    gist_weight: float = 0.5,
    kl_weight: float = 0.75,
    temperature: float = 3.0,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """CE(z_cls) + w_g CE(z_gist) + w_kl (KL(σ_T(z_cls)||σ_T(z_gist)) + KL(σ_T(z_gist)||σ_T(z_cls))).

    Rows whose target is ignore_index drop out of every term; "mean" divides by the remaining rows
    (with none ignored this is CE's mean plus KL's batch mean, as in the authors' code).
    """
    valid = target != ignore_index
    safe = target.masked_fill(~valid, 0)
    ce = F.cross_entropy(logits, safe, reduction="none")
    ce_gist = F.cross_entropy(gist_logits, safe, reduction="none")
    kl = _kl_rows(logits, gist_logits, temperature) + _kl_rows(gist_logits, logits, temperature)
    rows = ce + gist_weight * ce_gist + kl_weight * kl
    return _reduce(rows.masked_fill(~valid, 0), valid, reduction)


def distill_loss(
    student: Tensor,
    teacher: Tensor,
    target: Tensor,
    kind: str = "kl",
    temperature: float = 5.0,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """iDAT: CE(z_S) + CE(z_T) + D, D = KL(σ_T(z_T)||σ_T(z_S)) ("kl") or mean squared logit gap ("mse").

    Nothing is detached: D sends gradients into both the student and the teacher.
    """
    valid = target != ignore_index
    safe = target.masked_fill(~valid, 0)
    rows = F.cross_entropy(student, safe, reduction="none") + F.cross_entropy(teacher, safe, reduction="none")
    if kind == "kl":
        rows = rows + _kl_rows(teacher, student, temperature)
    elif kind == "mse":
        gap = torch.where(valid[:, None], student - teacher, 0.0)  # ignored rows send no (NaN) gradient
        rows = rows + gap.pow(2).mean(-1)  # row mean; the batch mean completes the mean over all logits
    else:
        raise ValueError(f"distill kind must be 'kl' or 'mse', got {kind!r}")
    return _reduce(rows.masked_fill(~valid, 0), valid, reduction)


def channel_linear(x: Tensor, channels: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Two-stage, stage 2: x[..., I] <- x[..., I] + W x[..., I] + b on the selected channels I."""
    picked = x.index_select(-1, channels)
    return x.index_add(-1, channels, F.linear(picked, weight, bias))


def scale_shift(x: Tensor, scale: Tensor, shift: Tensor, gelu: bool = False) -> Tensor:
    """SSF (METHODS §6): x ⊙ γ + β over the last dimension, then the exact GELU when `gelu` (SSF after fc1
    rides with the MLP's activation); computed in the promoted dtype, returned in x's (an SSF keeps the
    activation's dtype: bf16 under autocast)."""
    y = torch.addcmul(shift, x, scale)
    return (F.gelu(y) if gelu else y).to(x.dtype)


def lora_qv(qkv: Tensor, down_q: Tensor, up_q: Tensor, down_v: Tensor, up_v: Tensor, alpha: float,
            num_heads: int) -> Tensor:
    """Per-head LoRA on q and v (METHODS §6): qkv (..., 3D) is the qkv Linear's output (bias included), split as
    (3, heads, d_h); q_h <- q_h + α up_q(down_q q_h), v_h likewise, k unchanged; down (r, d_h), up (d_h, r)."""
    q, k, v = qkv.unflatten(-1, (3, num_heads, -1)).unbind(-3)
    dt = qkv.dtype  # the factors follow the activation (fp32 factors on a bf16 qkv under autocast)
    q = q + alpha * F.linear(F.linear(q, down_q.to(dt)), up_q.to(dt))
    v = v + alpha * F.linear(F.linear(v, down_v.to(dt)), up_v.to(dt))
    return torch.stack((q, k, v), dim=-3).flatten(-3)
