"""Fused SSF scale and shift (+ GELU) op: gist_fast::scale_shift / scale_shift_bwd.

    out = x ⊙ γ + β over the last dimension, then the exact GELU (SSF after fc1, before the MLP's activation)

Each op is declared once, here: its schema (custom_op), fake implementation and one autograd formula for every
device (it saves x, not the pre-activation, which the backward recomputes). The dispatcher picks the
implementation by the tensors' device: CUDA → the Triton launchers (kernels/scale_shift.py, registered below);
every other device, the CPU included (the op has no C++ kernel) → the decorated body, the same contract in plain
torch (scale_shift_torch.py).
"""
from typing import Tuple

import torch
from torch import Tensor

from gist_fast import reference
from gist_fast.ops import scale_shift_torch
from gist_fast.ops._backend import FUSED_DTYPES, HAS_TRITON


@torch.library.custom_op("gist_fast::scale_shift", mutates_args=())
def scale_shift_op(x: Tensor, scale: Tensor, shift: Tensor, gelu: bool) -> Tensor:
    """x (M, D), scale and shift (D,), any float dtypes (SSF's parameters stay fp32 under autocast). Returns
    x γ + β (GELU'd when gelu) in x's dtype, computed in fp32."""
    return scale_shift_torch.scale_shift(x, scale, shift, gelu)


scale_shift_op.register_fake(lambda x, scale, shift, gelu: torch.empty_like(x))


@torch.library.custom_op("gist_fast::scale_shift_bwd", mutates_args=())
def scale_shift_bwd(
    grad_out: Tensor, x: Tensor, scale: Tensor, shift: Tensor, gelu: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns grad_x (x's dtype), grad_scale and grad_shift (the sums over the rows, in scale's and shift's
    dtypes)."""
    return scale_shift_torch.scale_shift_bwd(grad_out, x, scale, shift, gelu)


scale_shift_bwd.register_fake(lambda grad_out, x, scale, shift, gelu: (
    torch.empty_like(x), torch.empty_like(scale), torch.empty_like(shift)))


def _setup_context(ctx, inputs, output):
    x, scale, shift, gelu = inputs
    ctx.gelu = gelu
    ctx.save_for_backward(x, scale, shift)


def _backward(ctx, grad_out):
    x, scale, shift = ctx.saved_tensors
    return (*scale_shift_bwd(grad_out.contiguous(), x, scale, shift, ctx.gelu), None)


scale_shift_op.register_autograd(_backward, setup_context=_setup_context)


def scale_shift_triton(x, scale, shift, gelu):
    """scale_shift on CUDA: one Triton launch."""
    from gist_fast.kernels import scale_shift as kernels  # here, not at the top: `import gist_fast` needs no triton

    return kernels.scale_shift_fwd(x, scale, shift, gelu)


def scale_shift_bwd_triton(grad_out, x, scale, shift, gelu):
    """scale_shift_bwd on CUDA: one Triton launch (and the sum of the per-program partials when deterministic)."""
    from gist_fast.kernels import scale_shift as kernels

    return kernels.scale_shift_bwd(grad_out, x, scale, shift, gelu)


if HAS_TRITON:  # without triton, CUDA tensors run the plain-torch body
    scale_shift_op.register_kernel("cuda")(scale_shift_triton)
    scale_shift_bwd.register_kernel("cuda")(scale_shift_bwd_triton)


def scale_shift(x: Tensor, scale: Tensor, shift: Tensor, gelu: bool = False) -> Tensor:
    """SSF: x ⊙ scale + shift over the last dimension, then the exact GELU when gelu; any leading shape.

    The output has x's dtype, as the reference's (fp32 scale and shift on a 16-bit x, as under autocast, give a
    16-bit output); computed in fp32.
    Dtypes other than fp32 / bf16 / fp16 (float64: a user's check) run gist_fast.reference."""
    if x.dim() == 0:
        raise ValueError("x must have a channel (last) dimension for scale and shift, got a 0-d tensor")
    dim = x.shape[-1]
    if scale.shape != (dim,) or shift.shape != (dim,):
        raise ValueError(f"scale and shift must be 1-D of x's last dimension ({dim},) for x "
                         f"{tuple(x.shape)}, got {tuple(scale.shape)} and {tuple(shift.shape)}")
    if any(t.dtype not in FUSED_DTYPES for t in (x, scale, shift)):  # the op computes in fp32 at most
        return reference.scale_shift(x, scale, shift, gelu)
    return scale_shift_op(x.reshape(-1, dim).contiguous(), scale.contiguous(), shift.contiguous(),
                          bool(gelu)).view(x.shape)
