"""The fused adapter op's contract (gist_fast::adapter_fwd / adapter_bwd) in plain PyTorch, with the same fp32
math: the ops' default implementation (any device without a kernel of its own: CPU without gist_fast._C, CUDA
without triton, others), and the CUDA path above the Triton kernels' largest rank."""
import torch
import torch.nn.functional as F

from gist_fast.ops._backend import at_least_fp32 as _up

_EMPTY = (0,)


def adapter_fwd(x, w_down, b_down, w_up, b_up, scale, base, branch, norm_weight, norm_bias, eps, dot_dtype=None):
    """out = base + branch + scale (W_up GELU(W_down x + b_down) + b_up), normed = LN(out); fp32 math
    (at least as accurate as any dot_dtype asked for)."""
    dtype = x.dtype
    for t in (base, branch):
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    xf = _up(x)
    bottleneck = F.linear(F.gelu(F.linear(xf, _up(w_down), _up(b_down))), _up(w_up), _up(b_up))
    out = (xf if base is None else _up(base)) + scale * bottleneck
    if branch is not None:
        out = out + _up(branch)
    out = out.to(dtype)
    if norm_weight is None:
        empty = x.new_empty(_EMPTY, dtype=torch.float32)
        return out, x.new_empty(_EMPTY, dtype=dtype), empty, empty.clone()
    o = _up(out)  # the stored (rounded) out, normalised in fp32 as the kernels do
    normed, mean, rstd = torch.native_layer_norm(o, o.shape[-1:], _up(norm_weight),
                                                 None if norm_bias is None else _up(norm_bias), eps)
    return out, normed.to(dtype), mean.view(-1), rstd.view(-1)


def adapter_bwd(grad_out, grad_normed, x, w_down, b_down, w_up, scale, out, norm_weight, mean, rstd, x_is_base,
                dot_dtype=None):
    """The gradients of adapter_fwd (the op's contract): grad_x (with the residual when
    x_is_base), grad_residual (total gradient at out, when a norm is fused), weight gradients, norm
    weight/bias gradients (fp32)."""
    g = _up(grad_out)
    empty = x.new_empty(_EMPTY, dtype=torch.float32)
    g_nw, g_nb = empty, empty.clone()  # two tensors: op outputs may not alias
    if norm_weight is not None:
        o, w = _up(out), _up(norm_weight)  # in fp32: CPU's 16-bit LayerNorm backward wants 16-bit statistics
        gx, g_nw, g_nb = torch.ops.aten.native_layer_norm_backward(
            _up(grad_normed), o, o.shape[-1:], _up(mean).view(-1, 1), _up(rstd).view(-1, 1), w, w, (True, True, True))
        g = g + gx
    xf = _up(x)
    z = F.linear(xf, _up(w_down), _up(b_down))
    act = F.gelu(z)
    g_bu = scale * g.sum(0)
    g_wu = scale * (g.t() @ act)
    dz = torch.ops.aten.gelu_backward(scale * (g @ _up(w_up)), z)
    grad_x = dz @ _up(w_down)
    if x_is_base:
        grad_x = grad_x + g
    residual = g.to(grad_out.dtype) if norm_weight is not None else grad_out.new_empty(_EMPTY)
    return (grad_x.to(x.dtype), residual, (dz.t() @ xf).to(w_down.dtype), dz.sum(0).to(b_down.dtype),
            g_wu.to(w_up.dtype), g_bu.to(w_up.dtype), g_nw, g_nb)
