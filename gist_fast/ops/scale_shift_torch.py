"""The fused SSF op's contract (gist_fast::scale_shift / scale_shift_bwd) in plain PyTorch, with the same fp32
math: the ops' default implementation (every device without a kernel of its own: CPU, CUDA without triton)."""
import torch
import torch.nn.functional as F

from gist_fast.ops._backend import at_least_fp32 as _up


def scale_shift(x, scale, shift, gelu):
    """out = x γ + β over the last dimension, then the exact GELU when gelu; fp32 math, x's dtype."""
    y = torch.addcmul(_up(shift), _up(x), _up(scale))
    return (F.gelu(y) if gelu else y).to(x.dtype)


def scale_shift_bwd(grad_out, x, scale, shift, gelu):
    """The gradients of scale_shift (the pre-activation recomputed from x): grad_x in x's dtype, grad_scale and
    grad_shift (sums over the rows) in their parameters' dtypes."""
    xf, g = _up(x), _up(grad_out)
    if gelu:
        g = torch.ops.aten.gelu_backward(g, torch.addcmul(_up(shift), xf, _up(scale)))
    return (g * _up(scale)).to(x.dtype), (g * xf).sum(0).to(scale.dtype), g.sum(0).to(shift.dtype)
