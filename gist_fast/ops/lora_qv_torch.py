"""The fused per-head LoRA op's contract (gist_fast::lora_qv / lora_qv_bwd) in plain PyTorch, with the same fp32
math: the ops' default implementation (every device without a kernel of its own: CPU, CUDA without triton), and
the CUDA path beyond the Triton kernels' largest rank or head dimension."""
import torch

from gist_fast.ops._backend import at_least_fp32 as _up


def lora_qv(qkv, down_q, up_q, down_v, up_v, alpha, num_heads, dot_dtype=None):
    """qkv (M, 3D) split as (3, heads, d_h): q_h + α up_q(down_q q_h), k, v_h + α up_v(down_v v_h), in qkv's
    layout and dtype; fp32 math (at least as accurate as any dot_dtype asked for)."""
    q, k, v = _up(qkv).unflatten(-1, (3, num_heads, -1)).unbind(1)
    q = q + alpha * ((q @ _up(down_q).t()) @ _up(up_q).t())
    v = v + alpha * ((v @ _up(down_v).t()) @ _up(up_v).t())
    return torch.stack((q, k, v), dim=1).flatten(1).to(qkv.dtype)


def _part_bwd(g, x, down, up, alpha):
    """One of q, v: (grad x, grad down, grad up) for g, x (M, heads, d_h)."""
    h = x @ down.t()
    gh = g @ up
    rank, head_dim = down.shape
    return (g + alpha * (gh @ down), alpha * (gh.reshape(-1, rank).t() @ x.reshape(-1, head_dim)),
            alpha * (g.reshape(-1, head_dim).t() @ h.reshape(-1, rank)))


def lora_qv_bwd(grad_out, qkv, down_q, up_q, down_v, up_v, alpha, num_heads, dot_dtype=None):
    """The gradients of lora_qv: grad_qkv (qkv's dtype; k's part is grad_out's) and the gradients of down_q, up_q,
    down_v, up_v (sums over rows and heads, in their dtypes)."""
    g_q, g_k, g_v = _up(grad_out).unflatten(-1, (3, num_heads, -1)).unbind(1)
    q, _, v = _up(qkv).unflatten(-1, (3, num_heads, -1)).unbind(1)
    gx_q, g_dq, g_uq = _part_bwd(g_q, q, _up(down_q), _up(up_q), alpha)
    gx_v, g_dv, g_uv = _part_bwd(g_v, v, _up(down_v), _up(up_v), alpha)
    return (torch.stack((gx_q, g_k, gx_v), dim=1).flatten(1).to(qkv.dtype), g_dq.to(down_q.dtype),
            g_uq.to(up_q.dtype), g_dv.to(down_v.dtype), g_uv.to(up_v.dtype))
