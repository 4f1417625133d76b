"""Fused one-pass losses: gist_fast::pair_loss (GIST, and iDAT with a KL or MSE term) and its backward.

The forward reads each row of both logit sets (online softmax in chunks for large C), returns the reduced loss
("mean" over the rows whose target is not ignore_index, "sum", or the per-row losses for "none") with the
per-row gradients d row / d logits and the count of rows not ignored; the backward scales those gradients by the
upstream gradient. On CUDA each is one Triton launch (kernels/losses.py) with the label check, the count and the
reduction inside, and no host sync; on CPU the C++ rows (csrc/losses.cpp) are reduced with plain tensor math.
"""
from typing import Tuple

import torch
from torch import Tensor

from gist_fast import reference
from gist_fast.ops import _backend

MODES = ("gist", "kl", "mse")  # GIST; iDAT with KL(teacher || student); iDAT with the squared logit gap
DISTILL_KINDS = MODES[1:]
REDUCTIONS = ("none", "mean", "sum")


def _cpu_pair_loss(a, b, target, mode, w_b, w_kl, temperature, ignore_index, reduction, compute_grad):
    ops = torch.ops.gist_fast
    if mode == "gist":
        rows, grad_a, grad_b = ops.gist_loss_fwd_cpu(a, b, target, w_b, w_kl, temperature, ignore_index, compute_grad)
    else:
        rows, grad_a, grad_b = ops.distill_loss_fwd_cpu(a, b, target, DISTILL_KINDS.index(mode), temperature,
                                                        ignore_index, compute_grad)
    n_valid = (target != ignore_index).sum().float()
    loss = rows if reduction == "none" else rows.sum() / n_valid if reduction == "mean" else rows.sum()
    return loss, grad_a, grad_b, n_valid


def _cpu_pair_loss_bwd(upstream, grad_a, grad_b, n_valid, reduction):
    scale = upstream.float() / n_valid if reduction == "mean" else upstream.float()
    scale = scale.expand(grad_a.shape[:1]).contiguous()
    return torch.ops.gist_fast.scale_rows_cpu(grad_a, scale), torch.ops.gist_fast.scale_rows_cpu(grad_b, scale)


def _impl(t: Tensor):
    if _backend.select(t) == "triton":
        from gist_fast.kernels import losses

        return losses.pair_loss_fwd, losses.pair_loss_bwd
    return _cpu_pair_loss, _cpu_pair_loss_bwd


@torch.library.custom_op("gist_fast::pair_loss", mutates_args=())
def pair_loss(
    a: Tensor, b: Tensor, target: Tensor, mode: str, w_b: float, w_kl: float, temperature: float,
    ignore_index: int, reduction: str, compute_grad: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """a, b: (B, C) logits of one dtype; target (B,) int64; mode in MODES. Returns the loss (() fp32, or (B,) fp32
    rows for reduction "none"), d row / d a and d row / d b per row (a's dtype; empty unless compute_grad) and the
    number of rows not ignored (() fp32). GIST: CE(a) + w_b CE(b) + w_kl (KL(σ_T(a)||σ_T(b)) + KL(σ_T(b)||σ_T(a)));
    "kl": CE(a) + CE(b) + KL(σ_T(b)||σ_T(a)); "mse": CE(a) + CE(b) + mean_c (a - b)^2."""
    return _impl(a)[0](a, b, target, mode, w_b, w_kl, temperature, ignore_index, reduction, compute_grad)


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
    return _impl(grad_a)[1](upstream, grad_a, grad_b, n_valid, reduction)


pair_loss_bwd.register_fake(
    lambda upstream, grad_a, grad_b, n_valid, reduction: (torch.empty_like(grad_a), torch.empty_like(grad_b)))


def _setup_context(ctx, inputs, output):
    ctx.reduction = inputs[8]
    ctx.save_for_backward(*output[1:])


def _backward(ctx, upstream, _grad_a, _grad_b, _n_valid):
    grad_a, grad_b, n_valid = ctx.saved_tensors
    return (*pair_loss_bwd(upstream, grad_a, grad_b, n_valid, ctx.reduction),) + (None,) * 8


pair_loss.register_autograd(_backward, setup_context=_setup_context)


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


def check_labels(target: Tensor, classes: int, ignore_index: int) -> None:
    """Labels in [0, classes) or ignore_index; asynchronous on CUDA (the Triton kernel checks its own)."""
    in_range = ((target >= 0) & (target < classes)) | (target == ignore_index)
    torch._assert_async(in_range.all(),
                        f"target labels must lie in [0, {classes}) or equal ignore_index={ignore_index}")


def check_options(temperature: float, reduction: str) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _loss(mode: str, a: Tensor, b: Tensor, target: Tensor, w_b: float, w_kl: float, temperature: float,
          ignore_index: int, reduction: str, fused: bool, reference_loss) -> Tensor:
    """The fused op, or reference_loss() where it is off or no backend serves the device."""
    backend = _backend.select(a) if fused else "reference"
    if backend != "triton":
        check_labels(target, a.shape[1], ignore_index)
    if backend == "reference":
        return reference_loss()
    needs_grad = torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)
    return pair_loss(a.contiguous(), b.contiguous(), target.long().contiguous(), mode, float(w_b), float(w_kl),
                     float(temperature), int(ignore_index), reduction, needs_grad)[0]


def gist_loss(
    logits: Tensor, gist_logits: Tensor, target: Tensor, gist_weight: float = 0.5, kl_weight: float = 0.75,
    temperature: float = 3.0, ignore_index: int = -100, reduction: str = "mean", fused: bool = True,
) -> Tensor:
    """CE(z_cls) + gist_weight CE(z_gist) + kl_weight (KL(σ_T(z_cls)||σ_T(z_gist)) + KL(σ_T(z_gist)||σ_T(z_cls))).

    fused=False (or no backend for the device) runs gist_fast.reference after the same checks."""
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
