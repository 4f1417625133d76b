"""Fused adapter + residual (+ LayerNorm) op: gist_fast::adapter_fwd / adapter_bwd.

    out    = base + branch + scale * (W_up GELU(W_down x + b_down) + b_up)      (base defaults to x)
    normed = LayerNorm(out)                                                    (optional, for norm2)

Each op is declared once, here: its schema (custom_op), fake implementation and one autograd formula for every
device (the backward recomputes the rank-r bottleneck instead of saving it). The dispatcher picks the
implementation by the tensors' device: CUDA → the Triton launchers (kernels/adapter.py, registered below);
CPU → the C++ kernels of csrc/adapter.cpp (gist_fast._C registers them); any other device, or CPU without
the extension → the decorated body, the same contract in plain torch (adapter_torch.py).
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from gist_fast import reference
from gist_fast.ops import adapter_torch
from gist_fast.ops._backend import FUSED_DTYPES, HAS_TRITON

_EMPTY = (0,)


@torch.library.custom_op("gist_fast::adapter_fwd", mutates_args=())
def adapter_fwd(
    x: Tensor, w_down: Tensor, b_down: Tensor, w_up: Tensor, b_up: Tensor, scale: float,
    base: Optional[Tensor], branch: Optional[Tensor],
    norm_weight: Optional[Tensor], norm_bias: Optional[Tensor], eps: float, dot_dtype: Optional[torch.dtype] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """x, base, branch: (M, D). Returns out (M, D), normed (M, D), mean and rstd (M,) fp32; the last
    three are empty when no norm is fused. dot_dtype: the autocast dtype the two linears run in, as eager
    autocast runs nn.Linear (None: the weights' dtype), on CUDA; the op computes in fp32 otherwise (on CPU always:
    the C++ kernels accept and ignore it, running bf16 GEMMs for bf16 inputs only)."""
    return adapter_torch.adapter_fwd(x, w_down, b_down, w_up, b_up, scale, base, branch, norm_weight, norm_bias, eps,
                                     dot_dtype)


@adapter_fwd.register_fake
def _(x, w_down, b_down, w_up, b_up, scale, base, branch, norm_weight, norm_bias, eps, dot_dtype=None):
    dtype = _out_dtype(x, base, branch)
    out = x.new_empty(x.shape, dtype=dtype)
    if norm_weight is None:
        return (out, x.new_empty(_EMPTY, dtype=dtype), x.new_empty(_EMPTY, dtype=torch.float32),
                x.new_empty(_EMPTY, dtype=torch.float32))
    stats = x.new_empty(x.shape[:1], dtype=torch.float32)
    return out, x.new_empty(x.shape, dtype=dtype), stats, stats.new_empty(stats.shape)


@torch.library.custom_op("gist_fast::adapter_bwd", mutates_args=())
def adapter_bwd(
    grad_out: Tensor, grad_normed: Optional[Tensor], x: Tensor, w_down: Tensor, b_down: Tensor,
    w_up: Tensor, scale: float, out: Optional[Tensor], norm_weight: Optional[Tensor],
    mean: Optional[Tensor], rstd: Optional[Tensor], x_is_base: bool, dot_dtype: Optional[torch.dtype] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns grad_x (x's dtype; includes the residual gradient when x_is_base), grad_residual (the
    total gradient reaching out, only when a norm is fused, else empty), the four adapter weight
    gradients (in the dtypes of w_down, b_down, w_up, w_up) and grad_norm_weight, grad_norm_bias (fp32 or empty)."""
    return adapter_torch.adapter_bwd(grad_out, grad_normed, x, w_down, b_down, w_up, scale, out, norm_weight, mean,
                                     rstd, x_is_base, dot_dtype)


@adapter_bwd.register_fake
def _(grad_out, grad_normed, x, w_down, b_down, w_up, scale, out, norm_weight, mean, rstd, x_is_base, dot_dtype=None):
    fused_norm = norm_weight is not None
    residual = grad_out.new_empty(grad_out.shape if fused_norm else _EMPTY)
    norm_grad = x.new_empty(norm_weight.shape if fused_norm else _EMPTY, dtype=torch.float32)
    return (
        x.new_empty(x.shape), residual, w_down.new_empty(w_down.shape), b_down.new_empty(b_down.shape),
        w_up.new_empty(w_up.shape), w_up.new_empty(w_up.shape[:1]),
        norm_grad, norm_grad.new_empty(norm_grad.shape),
    )


def _setup_context(ctx, inputs, output):
    x, w_down, b_down, w_up, b_up, scale, base, branch, norm_weight, norm_bias, eps, dot_dtype = inputs
    out, _, mean, rstd = output
    fused_norm = norm_weight is not None
    ctx.dot_dtype = dot_dtype
    ctx.scale, ctx.has_base, ctx.has_branch, ctx.fused_norm = scale, base is not None, branch is not None, fused_norm
    ctx.dtypes = (base.dtype if base is not None else None, branch.dtype if branch is not None else None, b_up.dtype)
    ctx.save_for_backward(x, w_down, b_down, w_up, *((out, norm_weight, mean, rstd) if fused_norm else ()))


def _backward(ctx, grad_out, grad_normed, _grad_mean, _grad_rstd):
    x, w_down, b_down, w_up, *norm = ctx.saved_tensors
    out, norm_weight, mean, rstd = norm if ctx.fused_norm else (None,) * 4
    grad_x, grad_residual, g_wd, g_bd, g_wu, g_bu, g_nw, g_nb = adapter_bwd(
        grad_out.contiguous(), grad_normed.contiguous() if ctx.fused_norm else None, x, w_down, b_down, w_up,
        ctx.scale, out, norm_weight, mean, rstd, not ctx.has_base, ctx.dot_dtype,
    )
    residual = grad_residual if ctx.fused_norm else grad_out
    base_dtype, branch_dtype, b_up_dtype = ctx.dtypes
    return (
        grad_x, g_wd, g_bd, g_wu, g_bu.to(b_up_dtype), None,
        residual.to(base_dtype) if ctx.has_base else None,
        residual.to(branch_dtype) if ctx.has_branch else None,
        g_nw.to(norm_weight.dtype) if ctx.fused_norm else None,
        g_nb.to(norm_weight.dtype) if ctx.fused_norm else None,
        None, None,
    )


adapter_fwd.register_autograd(_backward, setup_context=_setup_context)


def adapter_fwd_triton(x, w_down, b_down, w_up, b_up, scale, base, branch, norm_weight, norm_bias, eps, dot_dtype=None):
    """adapter_fwd on CUDA: the Triton launcher, or the plain-torch contract above the kernels' largest rank."""
    from gist_fast.kernels import adapter as kernels  # here, not at the top: `import gist_fast` needs no triton

    impl = kernels.adapter_fwd if w_down.shape[0] <= kernels.MAX_RANK else adapter_torch.adapter_fwd
    return impl(x, w_down, b_down, w_up, b_up, scale, base, branch, norm_weight, norm_bias, eps, dot_dtype)


def adapter_bwd_triton(grad_out, grad_normed, x, w_down, b_down, w_up, scale, out, norm_weight, mean, rstd, x_is_base,
                       dot_dtype=None):
    """adapter_bwd on CUDA, as adapter_fwd_triton."""
    from gist_fast.kernels import adapter as kernels

    impl = kernels.adapter_bwd if w_down.shape[0] <= kernels.MAX_RANK else adapter_torch.adapter_bwd
    return impl(grad_out, grad_normed, x, w_down, b_down, w_up, scale, out, norm_weight, mean, rstd, x_is_base,
                dot_dtype)


if HAS_TRITON:  # without triton, CUDA tensors run the plain-torch body
    adapter_fwd.register_kernel("cuda")(adapter_fwd_triton)
    adapter_bwd.register_kernel("cuda")(adapter_bwd_triton)


def autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
    """The dtype autocast would run a linear in on x's device (the ops' dots follow it), or None outside autocast."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None


def _out_dtype(x: Tensor, *others: Optional[Tensor]) -> torch.dtype:
    dtype = x.dtype
    for t in others:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _check(x: Tensor, w_down: Tensor, b_down: Tensor, w_up: Tensor, b_up: Tensor, *residuals: Optional[Tensor]) -> None:
    dim, rank = x.shape[-1], w_down.shape[0]
    if w_down.shape != (rank, dim) or w_up.shape != (dim, rank) or b_down.shape != (rank,) or b_up.shape != (dim,):
        raise ValueError(
            f"adapter weights must be w_down (r, D), b_down (r,), w_up (D, r), b_up (D,) for x (..., D={dim}); "
            f"got {tuple(w_down.shape)}, {tuple(b_down.shape)}, {tuple(w_up.shape)}, {tuple(b_up.shape)}"
        )
    for name, t in zip(("base", "branch"), residuals):
        if t is not None and t.shape != x.shape:
            raise ValueError(f"{name} must have x's shape {tuple(x.shape)}, got {tuple(t.shape)}")


def adapter(
    x: Tensor, w_down: Tensor, b_down: Tensor, w_up: Tensor, b_up: Tensor, scale: float = 1.0,
    base: Optional[Tensor] = None, branch: Optional[Tensor] = None,
) -> Tensor:
    """base + branch + scale * (W_up GELU(W_down x + b_down) + b_up), base defaulting to x.

    A GIST block passes branch = the attention output, so x + attn + A(x) reads x and attn once."""
    _check(x, w_down, b_down, w_up, b_up, base, branch)
    if x.dtype not in FUSED_DTYPES:  # the op computes in fp32 at most: float64 (a user's check) runs the reference
        return reference.adapter(x, w_down, b_down, w_up, b_up, scale, base, branch)
    flat = [t.reshape(-1, x.shape[-1]).contiguous() if t is not None else None for t in (x, base, branch)]
    out = adapter_fwd(flat[0], w_down, b_down, w_up, b_up, float(scale), flat[1], flat[2], None, None, 0.0,
                      autocast_dtype(x))[0]
    return out.view(x.shape)


def fusable_norm(norm) -> bool:
    """Whether adapter_norm (and so the lean block) computes this norm: an affine LayerNorm over the last
    dimension."""
    return (isinstance(norm, torch.nn.LayerNorm) and norm.weight is not None and norm.bias is not None
            and len(norm.normalized_shape) == 1)


def adapter_norm(
    x: Tensor, w_down: Tensor, b_down: Tensor, w_up: Tensor, b_up: Tensor, scale: float,
    norm_weight: Tensor, norm_bias: Tensor, eps: float = 1e-6,
    base: Optional[Tensor] = None, branch: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """The adapter above plus LayerNorm(out) from the same pass; returns (out, normed)."""
    _check(x, w_down, b_down, w_up, b_up, base, branch)
    if norm_weight.shape != x.shape[-1:] or norm_bias.shape != x.shape[-1:]:
        raise ValueError(f"norm weight and bias must be ({x.shape[-1]},), "
                         f"got {tuple(norm_weight.shape)}, {tuple(norm_bias.shape)}")
    if x.dtype not in FUSED_DTYPES:
        return reference.adapter_norm(x, w_down, b_down, w_up, b_up, scale, norm_weight, norm_bias, eps, base, branch)
    flat = [t.reshape(-1, x.shape[-1]).contiguous() if t is not None else None for t in (x, base, branch)]
    out, normed, _, _ = adapter_fwd(flat[0], w_down, b_down, w_up, b_up, float(scale), flat[1], flat[2],
                                    norm_weight, norm_bias, float(eps), autocast_dtype(x))
    return out.view(x.shape), normed.view(x.shape)
