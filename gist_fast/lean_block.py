"""Memory-lean forward/backward for a frozen timm ViT Block with a GIST or AdaptFormer adapter.

The block (METHODS §1; AdaptFormer drops the first adapter):

    h1 = LN1(x);  a  = DP1(LS1(proj(SDPA(qkv(h1)))))
    x1 = x + a + s A(x);   h2 = LN2(x1)                       (one fused adapter+residual+norm op)
    u  = fc1(h2); m = DP2(LS2(fc2(GELU(u))))
    y  = x1 + m + s A(x1)                                      (fused adapter+residual op)

The backbone is frozen, so no frozen linear needs its input saved: only the input gradient and the
adapter (and LayerNorm, if trainable) gradients are computed. `_LeanBlock` saves, in the compute
dtype (bf16 under autocast):

    memory="lean"  x and u = fc1(h2)         (2D + 8D bytes per token in bf16; the eager block: ~28D)
    memory="min"   x only                     (2D bytes per token)
    memory="auto"  "lean" on CUDA; on CPU the eager block with the fused ops (compute-bound there,
                   recomputation measured ~15% slower on vit_tiny, benchmarks/results/cpu)

and recomputes the rest in backward, one block at a time: LN1, qkv, SDPA forward and proj (a
local autograd graph whose backward is SDPA's own fused kernel), the adapter bottleneck and LN2
(the fused op), and in "min" also fc1. Per image and block the extra work is qkv + proj + one
attention forward ("lean", ~+17% of a ViT-B step's FLOPs) or also fc1 ("min", ~+33%); timm's
gradient checkpointing recomputes the whole block (~+50%) and saves x in fp32.

Falls back to the block's ordinary (eager, fused-op) forward when the block is not the plain timm
structure, when attention/projection/MLP dropout is active in training, when a frozen backbone
weight requires grad, when an attention mask is passed, and under torch.compile (whose own
rematerialisation then plans memory). DropPath in training is reproduced exactly: the per-sample
masks are drawn by the block's own DropPath modules, in the same order and from the same RNG
stream as the eager block, and saved (B numbers).
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gist_fast.ops.adapter import adapter_bwd, adapter_fwd

MEMORY_MODES = ("lean", "min")


# ---------------------------------------------------------------------------------------------
# Which blocks the lean path serves

def _is_identity(m) -> bool:
    return m is None or isinstance(m, nn.Identity)


def _ls_gamma(ls: nn.Module) -> Optional[Tensor]:
    return None if isinstance(ls, nn.Identity) else ls.gamma


def unsupported_reason(block: nn.Module) -> Optional[str]:
    """Why the lean path cannot serve this block (None when it can). Static checks only."""
    from timm.layers import LayerScale, Mlp
    from timm.models.vision_transformer import Attention

    attn, mlp = block.attn, block.mlp
    if type(attn) is not Attention:
        return f"attention {type(attn).__name__} is not timm's Attention"
    if not (_is_identity(attn.q_norm) and _is_identity(attn.k_norm) and _is_identity(getattr(attn, "norm", None))
            and getattr(attn, "gate", None) is None):
        return "qk-norm / scale-norm / gated attention"
    if (type(mlp) is not Mlp or not isinstance(mlp.act, nn.GELU) or mlp.act.approximate != "none"
            or not _is_identity(mlp.norm)):
        return "MLP is not Linear-GELU-Linear"
    for ls in (block.ls1, block.ls2):
        if not (isinstance(ls, nn.Identity) or (type(ls) is LayerScale and not ls.inplace)):
            return "unsupported LayerScale"
    for norm in (block.norm1, block.norm2):
        if not (isinstance(norm, nn.LayerNorm) and norm.weight is not None and len(norm.normalized_shape) == 1):
            return "norms must be affine LayerNorms"
    frozen = [attn, mlp, block.ls1, block.ls2]
    if any(p.requires_grad for m in frozen for p in m.parameters()):
        return "a backbone weight requires grad"
    return None


def _dynamic_fallback(block: nn.Module, attn_kwargs: dict) -> bool:
    if any(v is not None and v is not False for v in attn_kwargs.values()):
        return True
    if torch.compiler.is_compiling():
        return True
    if block.training:
        drops = (block.attn.attn_drop, block.attn.proj_drop, block.mlp.drop1, block.mlp.drop2)
        if any(getattr(d, "p", 0.0) > 0 for d in drops):
            return True
    return False


def _compute_dtype(x: Tensor) -> torch.dtype:
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def _drop_mask(dp: nn.Module, like: Tensor, training: bool) -> Optional[Tensor]:
    """DropPath's per-sample mask (already divided by keep_prob), drawn exactly as timm draws it."""
    if isinstance(dp, nn.Identity) or not training or getattr(dp, "drop_prob", 0.0) == 0.0:
        return None
    return dp(like.new_ones((like.shape[0],) + (1,) * (like.ndim - 1)))


# ---------------------------------------------------------------------------------------------
# The block math, shared by forward, the no-grad path and backward's recomputation

def _w(t: Optional[Tensor], dtype) -> Optional[Tensor]:
    return None if t is None else t.to(dtype)


def _attention(block, h1: Tensor, dt) -> Tensor:
    """proj(SDPA(qkv(h1))) in dtype dt; differentiable in h1 (frozen weights)."""
    attn = block.attn
    B, N, _ = h1.shape
    qkv = F.linear(h1, _w(attn.qkv.weight, dt), _w(attn.qkv.bias, dt))
    q, k, v = qkv.view(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    o = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
    o = o.transpose(1, 2).reshape(B, N, attn.attn_dim)
    return F.linear(o, _w(attn.proj.weight, dt), _w(attn.proj.bias, dt))


def _ln(t: Tensor, norm: nn.LayerNorm, weight: Tensor, bias: Tensor) -> Tensor:
    return F.layer_norm(t, norm.normalized_shape, weight.to(t.dtype), bias.to(t.dtype), norm.eps)


def _scaled(t: Tensor, gamma: Optional[Tensor], mask: Optional[Tensor]) -> Tensor:
    if gamma is not None:
        t = t * gamma.to(t.dtype)
    if mask is not None:
        t = t * mask.to(t.dtype)
    return t


class _LeanBlock(torch.autograd.Function):
    """One GIST/AdaptFormer block; saves x (and u in "lean") in the compute dtype."""

    @staticmethod
    def forward(ctx, x, w_down, b_down, w_up, b_up, n1w, n1b, n2w, n2b, block, gist, mode, dt, masks):
        y, saved = _block_forward(block, x, (w_down, b_down, w_up, b_up), (n1w, n1b, n2w, n2b), gist, mode, dt, masks)
        ctx.block, ctx.gist, ctx.mode, ctx.dt, ctx.masks = block, gist, mode, dt, masks
        ctx.x_dtype = x.dtype
        ctx.save_for_backward(saved["xc"], saved.get("u"), w_down, b_down, w_up, b_up, n1w, n1b, n2w, n2b)
        return y

    @staticmethod
    def backward(ctx, dy):
        xc, u, w_down, b_down, w_up, b_up, n1w, n1b, n2w, n2b = ctx.saved_tensors
        block, dt, (mask1, mask2) = ctx.block, ctx.dt, ctx.masks
        need = ctx.needs_input_grad
        B, N, D = xc.shape
        res_dtype = torch.promote_types(ctx.x_dtype, dt)
        scale = block.adapter.scale
        wts = (w_down, b_down, w_up, b_up)
        with torch.autocast(xc.device.type, enabled=False):
            # recompute the attention branch as a local graph x -> LN1 -> qkv -> SDPA -> proj
            with torch.enable_grad():
                x_leaf = xc.detach().requires_grad_()
                norm1_params = [t for t in (n1w, n1b) if t.requires_grad]
                a = _scaled(_attention(block, _ln(x_leaf, block.norm1, n1w, n1b), dt), _ls_gamma(block.ls1), mask1)
            xr = xc.to(res_dtype).reshape(-1, D)
            a_flat = a.detach().reshape(-1, D)
            if ctx.gist:
                x1, h2, mean2, rstd2 = adapter_fwd(xr, *wts, scale, None, a_flat, n2w, n2b, block.norm2.eps, dt)
            else:
                x1 = xr + a_flat.to(res_dtype)
                h2 = None
            if u is None:
                if h2 is None:
                    h2 = _ln(x1.to(dt), block.norm2, n2w, n2b)
                u = F.linear(h2.to(dt), _w(block.mlp.fc1.weight, dt), _w(block.mlp.fc1.bias, dt))
            else:
                u = u.reshape(-1, u.shape[-1])
            dy = dy.reshape(-1, D)
            # second adapter: y = x1 + m + s A(x1)
            g_x1, _, g_wd2, g_bd2, g_wu2, g_bu2, _, _ = adapter_bwd(
                dy.contiguous(), None, x1, w_down, b_down, w_up, scale, None, None, None, None, True, dt)
            # MLP: m = DP2(LS2(fc2(GELU(u))))  ->  dh2
            dm = _scaled(dy.view(B, N, D), _ls_gamma(block.ls2), mask2).reshape(-1, D).to(dt)
            dg = dm @ _w(block.mlp.fc2.weight, dt)
            dh2 = torch.ops.aten.gelu_backward(dg, u) @ _w(block.mlp.fc1.weight, dt)
            # first adapter + LN2: x1 = x + a + s A(x), h2 = LN2(x1)
            if ctx.gist:
                g_x, g_a, g_wd1, g_bd1, g_wu1, g_bu1, g_n2w, g_n2b = adapter_bwd(
                    g_x1.contiguous(), dh2.to(h2.dtype).contiguous(), xr, w_down, b_down, w_up, scale,
                    x1, n2w, mean2, rstd2, True, dt)
            else:
                with torch.enable_grad():
                    x1_leaf = x1.detach().requires_grad_()
                    n2_params = [t for t in (n2w, n2b) if t.requires_grad]
                    h2g = _ln(x1_leaf.to(dt), block.norm2, n2w, n2b)
                grads = torch.autograd.grad(h2g, [x1_leaf] + n2_params, dh2.to(h2g.dtype))
                g_a = g_x1 + grads[0]
                g_x = g_a
                g_n2w = g_n2b = None
                if n2_params:
                    it = iter(grads[1:])
                    g_n2w = next(it) if n2w.requires_grad else None
                    g_n2b = next(it) if n2b.requires_grad else None
            # attention branch
            grads = torch.autograd.grad(a, [x_leaf] + norm1_params, g_a.view(B, N, D).to(a.dtype))
            g_x = g_x.view(B, N, D).to(res_dtype) + grads[0].to(res_dtype)
        g_n1w = g_n1b = None
        it = iter(grads[1:])
        if n1w.requires_grad:
            g_n1w = next(it)
        if n1b.requires_grad:
            g_n1b = next(it)
        g_w = [None] * 4
        if ctx.gist:
            g_w = [g1 + g2 for g1, g2 in zip((g_wd1, g_bd1, g_wu1, g_bu1), (g_wd2, g_bd2, g_wu2, g_bu2))]
        else:
            g_w = [g_wd2, g_bd2, g_wu2, g_bu2]
        g_w = [g.to(p.dtype) if n else None for g, p, n in zip(g_w, wts, need[1:5])]
        if ctx.gist:
            g_n2w = g_n2w.to(n2w.dtype) if need[7] else None
            g_n2b = g_n2b.to(n2b.dtype) if need[8] else None
        return (g_x.to(ctx.x_dtype), *g_w, g_n1w, g_n1b, g_n2w, g_n2b, None, None, None, None, None)


def _block_forward(block, x, wts, norms, gist, mode, dt, masks):
    """y and the tensors to save; no autograd (called under no_grad or inside Function.forward)."""
    n1w, n1b, n2w, n2b = norms
    mask1, mask2 = masks
    B, N, D = x.shape
    scale = block.adapter.scale
    with torch.autocast(x.device.type, enabled=False):
        xc = x.to(dt)
        a = _scaled(_attention(block, _ln(xc, block.norm1, n1w, n1b), dt), _ls_gamma(block.ls1), mask1)
        xf = x.reshape(-1, D)
        if gist:
            x1, h2, _, _ = adapter_fwd(xf.contiguous(), *wts, scale, None, a.reshape(-1, D),
                                       n2w, n2b, block.norm2.eps, dt)
        else:
            x1 = xf + a.reshape(-1, D).to(torch.promote_types(x.dtype, dt))
            h2 = _ln(x1.to(dt), block.norm2, n2w, n2b)
        u = F.linear(h2.to(dt), _w(block.mlp.fc1.weight, dt), _w(block.mlp.fc1.bias, dt))
        m = F.linear(F.gelu(u), _w(block.mlp.fc2.weight, dt), _w(block.mlp.fc2.bias, dt))
        m = _scaled(m.view(B, N, D), _ls_gamma(block.ls2), mask2).reshape(-1, D)
        y, _, _, _ = adapter_fwd(x1.contiguous(), *wts, scale, None, m, None, None, 0.0, dt)
    saved = {"xc": xc}
    if mode == "lean":
        saved["u"] = u.view(B, N, -1)
    return y.view(B, N, D), saved


def lean_forward(block: nn.Module, x: Tensor, fallback, gist: bool, mode: str, attn_kwargs: dict) -> Tensor:
    """The lean block forward, or `fallback(block, x, **attn_kwargs)` where it does not apply."""
    if mode == "auto":  # lean where activations limit the batch (CUDA); on CPU compute does
        if x.device.type != "cuda":
            return fallback(block, x, **attn_kwargs)
        mode = "lean"
    if not block.adapter.fused or _dynamic_fallback(block, attn_kwargs) or unsupported_reason(block) is not None:
        return fallback(block, x, **attn_kwargs)
    dt = _compute_dtype(x)
    ad = block.adapter
    wts = (ad.down.weight, ad.down.bias, ad.up.weight, ad.up.bias)
    norms = (block.norm1.weight, block.norm1.bias, block.norm2.weight, block.norm2.bias)
    like = x.new_empty((x.shape[0], 1, 1), dtype=dt)
    mask1 = _drop_mask(block.drop_path1, like, block.training)
    mask2 = _drop_mask(block.drop_path2, like, block.training)
    if not torch.is_grad_enabled() or not (x.requires_grad or any(t.requires_grad for t in wts + norms)):
        with torch.no_grad():
            return _block_forward(block, x, wts, norms, gist, mode, dt, (mask1, mask2))[0]
    return _LeanBlock.apply(x, *wts, *norms, block, gist, mode, dt, (mask1, mask2))


def block_forward(self, x: Tensor, *, peft: str, mode: str, **attn_kwargs) -> Tensor:
    """The forward patch() binds to a block (functools.partial: a patched model stays picklable): the lean
    path for "adapter" (GIST) and "adaptformer", with the eager forward of gist_fast.peft as the fallback."""
    from gist_fast.peft import KINDS

    return lean_forward(self, x, KINDS[peft].forward, peft == "adapter", mode, attn_kwargs)


