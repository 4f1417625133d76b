"""Fused one-pass losses: gist_fast::gist_loss_fwd (GIST) and gist_fast::distill_loss_fwd (iDAT).

The forward op reads each row of both logit sets once (online softmax in chunks for large C) and
returns the per-row losses (fp32) with their gradients d row / d logits; the backward only scales
those by the upstream per-row gradient (gist_fast::scale_rows). The reduction ("mean" over the rows
whose target is not ignore_index, "sum" or "none") is plain tensor math: no host synchronisation.
Backends: Triton (kernels/gist_loss.py, kernels/distill_loss.py) on CUDA, C++ (csrc/losses.cpp) on CPU.
"""
from typing import Tuple

import torch
from torch import Tensor

from gist_fast import reference
from gist_fast.ops import _backend

DISTILL_KINDS = ("kl", "mse")
REDUCTIONS = ("mean", "sum", "none")


def _kernels(t: Tensor):
    if _backend.select(t) == "triton":
        from gist_fast.kernels import distill_loss, gist_loss

        return gist_loss.gist_loss_fwd, distill_loss.distill_loss_fwd, gist_loss.scale_rows
    ops = torch.ops.gist_fast
    return ops.gist_loss_fwd_cpu, ops.distill_loss_fwd_cpu, ops.scale_rows_cpu


@torch.library.custom_op("gist_fast::gist_loss_fwd", mutates_args=())
def gist_loss_fwd(
    logits: Tensor, gist_logits: Tensor, target: Tensor, gist_weight: float, kl_weight: float,
    temperature: float, ignore_index: int, compute_grad: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """logits, gist_logits: (B, C); target: (B,) int64. Returns rows (B,) fp32 and, when compute_grad,
    d rows[b] / d logits[b] and d rows[b] / d gist_logits[b] in the logits' dtype (else empty)."""
    return _kernels(logits)[0](logits, gist_logits, target, gist_weight, kl_weight, temperature, ignore_index, compute_grad)


@torch.library.custom_op("gist_fast::distill_loss_fwd", mutates_args=())
def distill_loss_fwd(
    student: Tensor, teacher: Tensor, target: Tensor, kind: int, temperature: float, ignore_index: int,
    compute_grad: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """kind 0: CE(s) + CE(t) + KL(σ_T(t)||σ_T(s)); kind 1: CE(s) + CE(t) + mean_c (s - t)^2. Outputs as
    gist_loss_fwd."""
    return _kernels(student)[1](student, teacher, target, kind, temperature, ignore_index, compute_grad)


@torch.library.custom_op("gist_fast::scale_rows", mutates_args=())
def scale_rows(grad: Tensor, row_scale: Tensor) -> Tensor:
    """grad (B, C) * row_scale (B,)[:, None], fp32 math, in grad's dtype."""
    return _kernels(grad)[2](grad, row_scale)


def _fake_pair_loss(a, b, target, *args):
    compute_grad = args[-1]
    grads = [t.new_empty(t.shape if compute_grad else (0,)) for t in (a, b)]
    return (a.new_empty(a.shape[:1], dtype=torch.float32), *grads)


gist_loss_fwd.register_fake(_fake_pair_loss)
distill_loss_fwd.register_fake(_fake_pair_loss)
scale_rows.register_fake(lambda grad, row_scale: grad.new_empty(grad.shape))


def _save_row_grads(ctx, inputs, output):
    ctx.save_for_backward(*output[1:])


def _scale_row_grads(ctx, grad_rows, _grad_a, _grad_b):
    grad_a, grad_b = ctx.saved_tensors
    grad_rows = grad_rows.float().contiguous()
    return (scale_rows(grad_a, grad_rows), scale_rows(grad_b, grad_rows)) + (None,) * 6


gist_loss_fwd.register_autograd(lambda ctx, *g: _scale_row_grads(ctx, *g), setup_context=_save_row_grads)
distill_loss_fwd.register_autograd(lambda ctx, *g: _scale_row_grads(ctx, *g)[:7], setup_context=_save_row_grads)


def check_logits(a: Tensor, b: Tensor, target: Tensor, ignore_index: int, names: Tuple[str, str]) -> None:
    """Shapes and label range, with a clear message; the label check is asynchronous on CUDA."""
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(f"{names[0]} and {names[1]} must both be (batch, classes), got {tuple(a.shape)} and {tuple(b.shape)}")
    if target.shape != a.shape[:1] or target.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"target must be integer class indices of shape ({a.shape[0]},), got {target.dtype} {tuple(target.shape)}")
    if not a.is_floating_point() or a.dtype != b.dtype:
        raise ValueError(f"{names[0]} and {names[1]} must share one floating dtype, got {a.dtype} and {b.dtype}")
    in_range = ((target >= 0) & (target < a.shape[1])) | (target == ignore_index)
    torch._assert_async(in_range.all(), f"target labels must lie in [0, {a.shape[1]}) or equal ignore_index={ignore_index}")


def check_options(temperature: float, reduction: str) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _reduce(rows: Tensor, target: Tensor, ignore_index: int, reduction: str) -> Tensor:
    if reduction == "none":
        return rows
    total = rows.sum()
    return total if reduction == "sum" else total / (target != ignore_index).sum()


def gist_loss(
    logits: Tensor, gist_logits: Tensor, target: Tensor, gist_weight: float = 0.5, kl_weight: float = 0.75,
    temperature: float = 3.0, ignore_index: int = -100, reduction: str = "mean", fused: bool = True,
) -> Tensor:
    """CE(z_cls) + gist_weight CE(z_gist) + kl_weight (KL(σ_T(z_cls)||σ_T(z_gist)) + KL(σ_T(z_gist)||σ_T(z_cls))).

    fused=False (or no backend for the device) runs gist_fast.reference after the same checks."""
    check_options(temperature, reduction)
    check_logits(logits, gist_logits, target, ignore_index, ("logits", "gist_logits"))
    if not fused or not _backend.available(logits):
        return reference.gist_loss(logits, gist_logits, target, gist_weight, kl_weight, temperature, ignore_index, reduction)
    needs_grad = torch.is_grad_enabled() and (logits.requires_grad or gist_logits.requires_grad)
    rows = gist_loss_fwd(logits.contiguous(), gist_logits.contiguous(), target.long().contiguous(), float(gist_weight),
                         float(kl_weight), float(temperature), int(ignore_index), needs_grad)[0]
    return _reduce(rows, target, ignore_index, reduction)


def distill_loss(
    student: Tensor, teacher: Tensor, target: Tensor, kind: str = "kl", temperature: float = 5.0,
    ignore_index: int = -100, reduction: str = "mean", fused: bool = True,
) -> Tensor:
    """iDAT: CE(z_S) + CE(z_T) + D(z_S, z_T), D sending gradients into both models."""
    check_options(temperature, reduction)
    if kind not in DISTILL_KINDS:
        raise ValueError(f"distill kind must be one of {DISTILL_KINDS}, got {kind!r}")
    check_logits(student, teacher, target, ignore_index, ("student", "teacher"))
    if not fused or not _backend.available(student):
        return reference.distill_loss(student, teacher, target, kind, temperature, ignore_index, reduction)
    needs_grad = torch.is_grad_enabled() and (student.requires_grad or teacher.requires_grad)
    rows = distill_loss_fwd(student.contiguous(), teacher.contiguous(), target.long().contiguous(),
                            DISTILL_KINDS.index(kind), float(temperature), int(ignore_index), needs_grad)[0]
    return _reduce(rows, target, ignore_index, reduction)
