"""Fused one-pass losses: gist_fast::pair_loss (GIST, and iDAT with a KL or MSE term) and its backward.

The forward reads each row of both logit sets (online softmax in chunks for large C), returns the reduced loss
("mean" over the rows whose target is not ignore_index, "sum", or the per-row losses for "none") with the
per-row gradients d row / d logits and the count of rows not ignored; the backward scales those gradients by the
upstream gradient. Each op is declared once, here (schema, fake, one autograd formula); the dispatcher picks the
implementation by the tensors' device: CUDA → one Triton launch each way (kernels/losses.py, registered below:
the label check, the count and the reduction inside, no host sync); CPU → the C++ kernels of csrc/losses.cpp
(gist_fast._C); any other device, or CPU without the extension → the decorated body, the same contract in plain
torch (losses_torch.py).
"""
from typing import Tuple

import torch
from torch import Tensor

from gist_fast import reference
from gist_fast.ops import losses_torch
from gist_fast.ops._backend import FUSED_DTYPES, HAS_TRITON

MODES = ("gist", "kl", "mse")  # GIST; iDAT with KL(teacher || student); iDAT with the squared logit gap
DISTILL_KINDS = MODES[1:]
REDUCTIONS = ("none", "mean", "sum")


@torch.library.custom_op("gist_fast::pair_loss", mutates_args=())
def pair_loss(
    a: Tensor, b: Tensor, target: Tensor, mode: str, w_b: float, w_kl: float, temperature: float,
    ignore_index: int, reduction: str, compute_grad: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """a, b: (B, C) logits of one dtype; target (B,) int64; mode in MODES. Returns the loss (() fp32, or (B,) fp32
    rows for reduction "none"), d row / d a and d row / d b per row (a's dtype; empty unless compute_grad) and the
    number of rows not ignored (() fp32). GIST: CE(a) + w_b CE(b) + w_kl (KL(σ_T(a)||σ_T(b)) + KL(σ_T(b)||σ_T(a)));
    "kl": CE(a) + CE(b) + KL(σ_T(b)||σ_T(a)); "mse": CE(a) + CE(b) + mean_c (a - b)^2."""
    return losses_torch.pair_loss(a, b, target, mode, w_b, w_kl, temperature, ignore_index, reduction, compute_grad)


@pair_loss.register_fake
def _(a, b, target, mode, w_b, w_kl, temperature, ignore_index, reduction, compute_grad):
    loss = a.new_empty(a.shape[:1] if reduction == "none" else (), dtype=torch.float32)
    grads = [t.new_empty(t.shape if compute_grad else (0,)) for t in (a, b)]
    return loss, *grads, a.new_empty((), dtype=torch.float32)


@torch.library.custom_op("gist_fast::pair_loss_bwd", mutates_args=())
def pair_loss_bwd(upstream: Tensor, grad_a: Tensor, grad_b: Tensor, n_valid: Tensor,
                  reduction: str) -> Tuple[Tensor, Tensor]:
    """The gradients of pair_loss's inputs a and b: the per-row gradients times the upstream gradient of the
    loss (divided by n_valid for "mean")."""
    return losses_torch.pair_loss_bwd(upstream, grad_a, grad_b, n_valid, reduction)


pair_loss_bwd.register_fake(
    lambda upstream, grad_a, grad_b, n_valid, reduction: (torch.empty_like(grad_a), torch.empty_like(grad_b)))


def _setup_context(ctx, inputs, output):
    ctx.reduction = inputs[8]
    ctx.save_for_backward(*output[1:])


def _backward(ctx, upstream, _grad_a, _grad_b, _n_valid):
    grad_a, grad_b, n_valid = ctx.saved_tensors
    # every row ignored: the mean is NaN but its gradient is zero (as torch's cross-entropy), not 0 * inf
    return (*pair_loss_bwd(upstream, grad_a, grad_b, n_valid.clamp(min=1), ctx.reduction),) + (None,) * 8


pair_loss.register_autograd(_backward, setup_context=_setup_context)


def pair_loss_triton(a, b, target, mode, w_b, w_kl, temperature, ignore_index, reduction, compute_grad):
    """pair_loss on CUDA: one Triton launch."""
    from gist_fast.kernels import losses as kernels  # here, not at the top: `import gist_fast` needs no triton

    return kernels.pair_loss_fwd(a, b, target, mode, w_b, w_kl, temperature, ignore_index, reduction, compute_grad)


def pair_loss_bwd_triton(upstream, grad_a, grad_b, n_valid, reduction):
    """pair_loss_bwd on CUDA: one Triton launch."""
    from gist_fast.kernels import losses as kernels

    return kernels.pair_loss_bwd(upstream, grad_a, grad_b, n_valid, reduction)


if HAS_TRITON:  # without triton, CUDA tensors run the plain-torch body
    pair_loss.register_kernel("cuda")(pair_loss_triton)
    pair_loss_bwd.register_kernel("cuda")(pair_loss_bwd_triton)


def check_logits(a: Tensor, b: Tensor, target: Tensor, names: Tuple[str, str]) -> None:
    """Shapes and dtypes, with a clear message."""
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(f"{names[0]} and {names[1]} must both be (batch, classes), "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}")
    if target.shape != a.shape[:1] or target.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"target must be integer class indices of shape ({a.shape[0]},), "
                         f"got {target.dtype} {tuple(target.shape)}")
    if not a.is_floating_point() or a.dtype != b.dtype:
        raise ValueError(f"{names[0]} and {names[1]} must share one floating dtype, got {a.dtype} and {b.dtype}")


def check_options(temperature: float, reduction: str) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _loss(mode: str, a: Tensor, b: Tensor, target: Tensor, w_b: float, w_kl: float, temperature: float,
          ignore_index: int, reduction: str, fused: bool, reference_loss) -> Tensor:
    """The fused op, or reference_loss() where it is off or the dtype is one the op does not compute in."""
    if not fused or a.dtype not in FUSED_DTYPES:
        losses_torch.check_labels(target, a.shape[1], ignore_index)
        return reference_loss()
    needs_grad = torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)
    return pair_loss(a.contiguous(), b.contiguous(), target.long().contiguous(), mode, float(w_b), float(w_kl),
                     float(temperature), int(ignore_index), reduction, needs_grad)[0]


def gist_loss(
    logits: Tensor, gist_logits: Tensor, target: Tensor, gist_weight: float = 0.5, kl_weight: float = 0.75,
    temperature: float = 3.0, ignore_index: int = -100, reduction: str = "mean", fused: bool = True,
) -> Tensor:
    """CE(z_cls) + gist_weight CE(z_gist) + kl_weight (KL(σ_T(z_cls)||σ_T(z_gist)) + KL(σ_T(z_gist)||σ_T(z_cls))).

    fused=False (or a dtype the op does not compute in, e.g. float64) runs gist_fast.reference after the same checks."""
    check_options(temperature, reduction)
    check_logits(logits, gist_logits, target, ("logits", "gist_logits"))
    return _loss("gist", logits, gist_logits, target,
                 gist_weight, kl_weight, temperature, ignore_index, reduction, fused,
                 lambda: reference.gist_loss(logits, gist_logits, target, gist_weight, kl_weight, temperature,
                                             ignore_index, reduction))


def distill_loss(
    student: Tensor, teacher: Tensor, target: Tensor, kind: str = "kl", temperature: float = 5.0,
    ignore_index: int = -100, reduction: str = "mean", fused: bool = True,
) -> Tensor:
    """iDAT: CE(z_S) + CE(z_T) + D(z_S, z_T), D sending gradients into both models."""
    check_options(temperature, reduction)
    if kind not in DISTILL_KINDS:
        raise ValueError(f"distill kind must be one of {DISTILL_KINDS}, got {kind!r}")
    check_logits(student, teacher, target, ("student", "teacher"))
    return _loss(kind, student, teacher, target, 1.0, 0.0, temperature, ignore_index, reduction, fused,
                 lambda: reference.distill_loss(student, teacher, target, kind, temperature, ignore_index, reduction))
