"""Fused per-head LoRA on q and v: gist_fast::lora_qv / lora_qv_bwd.

    qkv (..., 3D) split as (3, heads, d_h):  q_h + α up_q(down_q q_h),  k_h,  v_h + α up_v(down_v v_h)

Each op is declared once, here: its schema (custom_op), fake implementation and one autograd formula for every
device (it saves qkv, and the backward recomputes the rank-r bottleneck). The dispatcher picks the implementation
by the tensors' device: CUDA → the Triton launchers (kernels/lora_qv.py, registered below); every other device,
the CPU included (the op has no C++ kernel) → the decorated body, the same contract in plain torch
(lora_qv_torch.py).
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from gist_fast import reference
from gist_fast.ops import lora_qv_torch
from gist_fast.ops._backend import FUSED_DTYPES, HAS_TRITON
from gist_fast.ops.adapter import autocast_dtype


@torch.library.custom_op("gist_fast::lora_qv", mutates_args=())
def lora_qv_op(
    qkv: Tensor, down_q: Tensor, up_q: Tensor, down_v: Tensor, up_v: Tensor, alpha: float, num_heads: int,
    dot_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """qkv (M, 3D); down (r, d_h), up (d_h, r) for q and for v. Returns (M, 3D) in qkv's layout and dtype.
    dot_dtype: the autocast dtype the LoRA linears run in (None: qkv's dtype, which the factors follow), on CUDA;
    the op computes in fp32 otherwise."""
    return lora_qv_torch.lora_qv(qkv, down_q, up_q, down_v, up_v, alpha, num_heads, dot_dtype)


lora_qv_op.register_fake(lambda qkv, down_q, up_q, down_v, up_v, alpha, num_heads, dot_dtype=None:
                         qkv.new_empty(qkv.shape))


@torch.library.custom_op("gist_fast::lora_qv_bwd", mutates_args=())
def lora_qv_bwd(
    grad_out: Tensor, qkv: Tensor, down_q: Tensor, up_q: Tensor, down_v: Tensor, up_v: Tensor, alpha: float,
    num_heads: int, dot_dtype: Optional[torch.dtype] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns grad_qkv (qkv's dtype; k's part passes grad_out through) and the gradients of down_q, up_q, down_v,
    up_v (sums over rows and heads, in their dtypes)."""
    return lora_qv_torch.lora_qv_bwd(grad_out, qkv, down_q, up_q, down_v, up_v, alpha, num_heads, dot_dtype)


lora_qv_bwd.register_fake(lambda grad_out, qkv, down_q, up_q, down_v, up_v, alpha, num_heads, dot_dtype=None: tuple(
    t.new_empty(t.shape) for t in (qkv, down_q, up_q, down_v, up_v)))


def _setup_context(ctx, inputs, output):
    qkv, down_q, up_q, down_v, up_v, alpha, num_heads, dot_dtype = inputs
    ctx.alpha, ctx.num_heads, ctx.dot_dtype = alpha, num_heads, dot_dtype
    ctx.save_for_backward(qkv, down_q, up_q, down_v, up_v)


def _backward(ctx, grad_out):
    grads = lora_qv_bwd(grad_out.contiguous(), *ctx.saved_tensors, ctx.alpha, ctx.num_heads, ctx.dot_dtype)
    return (*grads, None, None, None)


lora_qv_op.register_autograd(_backward, setup_context=_setup_context)


def _kernels_take(qkv, down_q, up_q, down_v, up_v, num_heads):
    """The Triton launchers, or None where the plain-torch contract serves: a rank or head dimension above the
    kernels' largest, or factors of different dtypes."""
    from gist_fast.kernels import lora_qv as kernels  # here, not at the top: `import gist_fast` needs no triton

    fits = (max(down_q.shape[0], down_v.shape[0]) <= kernels.MAX_RANK
            and qkv.shape[-1] // (3 * num_heads) <= kernels.MAX_HEAD_DIM
            and len({t.dtype for t in (down_q, up_q, down_v, up_v)}) == 1)
    return kernels if fits else None


def lora_qv_triton(qkv, down_q, up_q, down_v, up_v, alpha, num_heads, dot_dtype=None):
    """lora_qv on CUDA: one Triton launch, or the plain-torch contract where the kernels do not reach."""
    kernels = _kernels_take(qkv, down_q, up_q, down_v, up_v, num_heads)
    impl = kernels.lora_qv_fwd if kernels else lora_qv_torch.lora_qv
    return impl(qkv, down_q, up_q, down_v, up_v, alpha, num_heads, dot_dtype)


def lora_qv_bwd_triton(grad_out, qkv, down_q, up_q, down_v, up_v, alpha, num_heads, dot_dtype=None):
    """lora_qv_bwd on CUDA, as lora_qv_triton."""
    kernels = _kernels_take(qkv, down_q, up_q, down_v, up_v, num_heads)
    impl = kernels.lora_qv_bwd if kernels else lora_qv_torch.lora_qv_bwd
    return impl(grad_out, qkv, down_q, up_q, down_v, up_v, alpha, num_heads, dot_dtype)


if HAS_TRITON:  # without triton, CUDA tensors run the plain-torch body
    lora_qv_op.register_kernel("cuda")(lora_qv_triton)
    lora_qv_bwd.register_kernel("cuda")(lora_qv_bwd_triton)


def _check(qkv: Tensor, down_q: Tensor, up_q: Tensor, down_v: Tensor, up_v: Tensor, num_heads: int) -> None:
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    width = qkv.shape[-1] if qkv.dim() else 0
    if width == 0 or width % (3 * num_heads):
        raise ValueError(f"qkv's last dimension must be 3D with D divisible by num_heads={num_heads} (a multiple of "
                         f"{3 * num_heads}), got qkv {tuple(qkv.shape)}")
    head_dim = width // (3 * num_heads)
    for name, down, up in (("q", down_q, up_q), ("v", down_v, up_v)):
        rank = down.shape[0] if down.dim() == 2 else -1
        if down.shape != (rank, head_dim) or up.shape != (head_dim, rank):
            raise ValueError(f"LoRA factors of {name} must be down_{name} (r, d_h) and up_{name} (d_h, r) with "
                             f"d_h = {head_dim} (qkv {tuple(qkv.shape)}, {num_heads} heads); got "
                             f"{tuple(down.shape)} and {tuple(up.shape)}")


def lora_qv(qkv: Tensor, down_q: Tensor, up_q: Tensor, down_v: Tensor, up_v: Tensor, alpha: float,
            num_heads: int) -> Tensor:
    """Per-head LoRA on q and v (METHODS §6) of the qkv Linear's output qkv (..., 3D), any leading shape:
    q_h + α up_q(down_q q_h), k unchanged, v_h + α up_v(down_v v_h); down (r, d_h), up (d_h, r), shared by the
    heads. Returns (..., 3D) in qkv's layout (callers reshape to heads as timm does) and dtype.

    Dtypes other than fp32 / bf16 / fp16 (float64: a user's check) run gist_fast.reference."""
    _check(qkv, down_q, up_q, down_v, up_v, num_heads)
    if any(t.dtype not in FUSED_DTYPES for t in (qkv, down_q, up_q, down_v, up_v)):
        return reference.lora_qv(qkv, down_q, up_q, down_v, up_v, alpha, num_heads)
    width = qkv.shape[-1]
    out = lora_qv_op(qkv.reshape(-1, width).contiguous(), *(t.contiguous() for t in (down_q, up_q, down_v, up_v)),
                     float(alpha), num_heads, autocast_dtype(qkv))
    return out.view(qkv.shape)
