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

The block math is stated once, as steps shared by the forward, the no-grad path and backward's
recomputation (`_attention_branch`, the first residual, `_fc1`, `_mlp_branch`, `_second_residual`);
the backward is the same steps in reverse. GIST and AdaptFormer differ in one step only, the first
residual (`GistResidual`: the fused adapter op; `PlainResidual`: x + a and torch's LayerNorm).

Decided once, by patch() (`unsupported_reason`, `bind`): whether the block's structure is one this path
computes (timm's Attention and Linear-GELU-Linear MLP, affine LayerNorms, plain LayerScale); blocks it
is not keep the kind's eager forward. Decided per call, falling back to that eager (fused-op) forward:
memory="auto" on an input not on CUDA, attention/projection/MLP dropout active in training, a frozen
backbone weight that requires grad, an adapter switched to fused=False, an attention mask, and
torch.compile tracing (whose own rematerialisation then plans memory). DropPath in training is
reproduced exactly: the per-sample masks are drawn by the block's own DropPath modules, in the same
order and from the same RNG stream as the eager block, and saved (B numbers).
"""
import functools
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gist_fast.ops._backend import FUSED_DTYPES
from gist_fast.ops.adapter import adapter_bwd, adapter_fwd, fusable_norm

MEMORY_MODES = ("lean", "min")


# ---------------------------------------------------------------------------------------------
# Which blocks the lean path serves: decided once, at patch time

def _is_identity(m) -> bool:
    return m is None or isinstance(m, nn.Identity)


def _ls_gamma(ls: nn.Module) -> Optional[Tensor]:
    return None if isinstance(ls, nn.Identity) else ls.gamma


def unsupported_reason(block: nn.Module) -> Optional[str]:
    """Why the lean path cannot compute this block (None when it can): its structure, which does not change
    after patch(). Whether a frozen weight requires grad can, and is checked per call (`_falls_back`)."""
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
    if not (fusable_norm(block.norm1) and fusable_norm(block.norm2)):
        return "norms must be affine LayerNorms (with weight and bias)"
    return None


def bind(block: nn.Module, mode: str, *, first, fallback) -> functools.partial:
    """The forward patch() binds to a block `unsupported_reason` accepts, for an adapter kind with a lean path
    ("adapter": GIST, "adaptformer"): its first-residual step and its eager forward (the per-call fallback) are
    chosen once (the kind's registry entry). A functools.partial of module-level objects: a patched model stays
    picklable."""
    return functools.partial(lean_forward, block, first=first, fallback=fallback, mode=mode)


# ---------------------------------------------------------------------------------------------
# Per call: what can change between calls

def _frozen_weights(block: nn.Module) -> Tuple[Optional[Tensor], ...]:
    """The backbone tensors the lean path treats as constants (their gradients are never computed)."""
    attn, mlp = block.attn, block.mlp
    return (attn.qkv.weight, attn.qkv.bias, attn.proj.weight, attn.proj.bias, mlp.fc1.weight, mlp.fc1.bias,
            mlp.fc2.weight, mlp.fc2.bias, _ls_gamma(block.ls1), _ls_gamma(block.ls2))


def _falls_back(block: nn.Module, x: Tensor, attn_kwargs: dict) -> bool:
    """Whether this call takes the eager forward. Each reason can change after patch(): attention masks and
    torch.compile tracing are per call; dropout is active only in training and its rate is a plain attribute;
    requires_grad is a flag a user may set on a frozen weight to fine-tune it (the lean path would silently give
    it no gradient); Adapter.fused is the adapter's own switch, which its eager forward also reads per call."""
    if any(v is not None and v is not False for v in attn_kwargs.values()) or torch.compiler.is_compiling():
        return True
    if x.dtype not in FUSED_DTYPES:  # float64: the eager forward's ops take the reference
        return True
    if not block.adapter.fused:
        return True
    if block.training:
        drops = (block.attn.attn_drop, block.attn.proj_drop, block.mlp.drop1, block.mlp.drop2)
        if any(getattr(d, "p", 0.0) > 0 for d in drops):
            return True
    return any(t is not None and t.requires_grad for t in _frozen_weights(block))


def _compute_dtype(x: Tensor) -> torch.dtype:
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def _drop_path_masks(block: nn.Module, x: Tensor, dt: torch.dtype) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """DropPath's per-sample masks (already divided by keep_prob) for the attention and the MLP branch, drawn as
    the eager block draws them: by the block's own DropPath modules, in that order, from the same RNG stream.
    Per call: training flips, and drop_prob is a plain attribute (stochastic-depth schedules change it)."""
    if not block.training:
        return None, None
    ones = x.new_ones((x.shape[0], 1, 1), dtype=dt)
    return tuple(None if isinstance(dp, nn.Identity) or getattr(dp, "drop_prob", 0.0) == 0.0 else dp(ones)
                 for dp in (block.drop_path1, block.drop_path2))


def resolve_mode(mode: Optional[str], x: Tensor) -> Optional[str]:
    """The memory mode of this call: "auto" is "lean" on CUDA inputs, None (the eager block) elsewhere. Resolved from
    the input, not at patch(): models are patched on the CPU and then moved (gist-fast bench and train do), so only
    the call knows where the block runs."""
    return ("lean" if x.is_cuda else None) if mode == "auto" else mode


def lean_forward(block: nn.Module, x: Tensor, *, first, fallback, mode: str, **attn_kwargs) -> Tensor:
    """A block's forward as `bind` binds it: the lean block, or `fallback(block, x, **attn_kwargs)` for this call."""
    mode = resolve_mode(mode, x)
    if mode is None or _falls_back(block, x, attn_kwargs):
        return fallback(block, x, **attn_kwargs)
    dt = _compute_dtype(x)
    ad, n1, n2 = block.adapter, block.norm1, block.norm2
    wts = (ad.down.weight, ad.down.bias, ad.up.weight, ad.up.bias)
    norms = (n1.weight, n1.bias, n2.weight, n2.bias)
    masks = _drop_path_masks(block, x, dt)
    if torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in wts + norms)):
        return _LeanBlock.apply(x, *wts, *norms, block, first, mode, dt, masks)
    with torch.no_grad():
        return _block_forward(block, first, x, x.to(dt), wts, norms, dt, masks)[0]


# ---------------------------------------------------------------------------------------------
# The block math, once: shared by the forward, the no-grad path and backward's recomputation.
# Every step runs with autocast off, in the compute dtype dt; x, x1 and y keep the residual dtype.

def _w(t: Optional[Tensor], dtype) -> Optional[Tensor]:
    return None if t is None else t.to(dtype)


def _ln(t: Tensor, norm: nn.LayerNorm, weight: Tensor, bias: Tensor) -> Tensor:
    return F.layer_norm(t, norm.normalized_shape, weight.to(t.dtype), bias.to(t.dtype), norm.eps)


def _scaled(t: Tensor, gamma: Optional[Tensor], mask: Optional[Tensor]) -> Tensor:
    """LayerScale then the DropPath mask (either may be absent)."""
    if gamma is not None:
        t = t * gamma.to(t.dtype)
    if mask is not None:
        t = t * mask.to(t.dtype)
    return t


def _attention_branch(block, x: Tensor, n1w: Tensor, n1b: Tensor, dt, mask1: Optional[Tensor]) -> Tensor:
    """a = DP1(LS1(proj(SDPA(qkv(LN1 x))))), x (B, N, D) in dt; differentiable in x and the LN1 affine."""
    attn = block.attn
    B, N, _ = x.shape
    qkv = F.linear(_ln(x, block.norm1, n1w, n1b), _w(attn.qkv.weight, dt), _w(attn.qkv.bias, dt))
    q, k, v = qkv.view(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    o = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
    o = o.transpose(1, 2).reshape(B, N, attn.attn_dim)
    return _scaled(F.linear(o, _w(attn.proj.weight, dt), _w(attn.proj.bias, dt)), _ls_gamma(block.ls1), mask1)


def _fc1(block, h2: Tensor, dt) -> Tensor:
    """u = fc1(h2), the MLP pre-activation ("lean" saves it)."""
    return F.linear(h2.to(dt), _w(block.mlp.fc1.weight, dt), _w(block.mlp.fc1.bias, dt))


def _mlp_branch(block, u: Tensor, dt, mask2: Optional[Tensor], shape) -> Tensor:
    """m = DP2(LS2(fc2(GELU(u)))), flat (M, D)."""
    m = F.linear(F.gelu(u), _w(block.mlp.fc2.weight, dt), _w(block.mlp.fc2.bias, dt))
    return _scaled(m.view(shape), _ls_gamma(block.ls2), mask2).reshape(-1, shape[-1])


def _second_residual(block, x1: Tensor, m: Tensor, wts, dt) -> Tensor:
    """y = x1 + m + s A(x1) (the fused op), flat."""
    return adapter_fwd(x1.contiguous(), *wts, block.adapter.scale, None, m, None, None, 0.0, dt)[0]


class GistResidual:
    """GIST's first residual and LN2 in one fused op: x1 = x + a + s A(x), h2 = LN2(x1)."""

    @staticmethod
    def forward(block, x: Tensor, a: Tensor, wts, n2, dt, need_h2: bool = True):
        """(x1, h2, what backward needs: LN2's mean and rstd); x, a flat (M, D). h2 comes with the op."""
        x1, h2, mean, rstd = adapter_fwd(x.contiguous(), *wts, block.adapter.scale, None, a, *n2, block.norm2.eps, dt)
        return x1, h2, (mean, rstd)

    @staticmethod
    def backward(block, g_x1, dh2, x, x1, state, wts, n2, dt, g_w2):
        """From the gradients reaching x1 and h2: (grad x, grad a, the adapter weight gradients with the second
        application's g_w2 added, the LN2 affine gradients)."""
        mean, rstd = state
        g_x, g_a, *g_w1, g_n2w, g_n2b = adapter_bwd(
            g_x1.contiguous(), dh2.to(x1.dtype).contiguous(), x, *wts[:3], block.adapter.scale, x1, n2[0], mean, rstd,
            True, dt)
        return g_x, g_a, [g1 + g2 for g1, g2 in zip(g_w1, g_w2)], (g_n2w, g_n2b)


class PlainResidual:
    """AdaptFormer's first residual, no adapter: x1 = x + a, h2 = LN2(x1) (torch's LayerNorm)."""

    @staticmethod
    def forward(block, x: Tensor, a: Tensor, wts, n2, dt, need_h2: bool = True):
        """(x1, h2 or None where not needed, no state); x, a flat (M, D)."""
        x1 = x + a.to(torch.promote_types(x.dtype, dt))
        return x1, _ln(x1.to(dt), block.norm2, *n2) if need_h2 else None, None

    @staticmethod
    def backward(block, g_x1, dh2, x, x1, state, wts, n2, dt, g_w2):
        """As GistResidual.backward: LN2 by autograd on a recomputed local graph; grad x = grad a; the adapter
        weight gradients are the second application's alone."""
        with torch.enable_grad():
            x1_leaf = x1.detach().requires_grad_()
            h2 = _ln(x1_leaf.to(dt), block.norm2, *n2)
        g_ln, g_n2 = _grads(h2, dh2.to(h2.dtype), x1_leaf, n2)
        g = g_x1 + g_ln
        return g, g, g_w2, g_n2


def _block_forward(block, first, x: Tensor, xc: Tensor, wts, norms, dt, masks):
    """(y, u): the block on x (xc: x in dt) and its MLP pre-activation; no autograd (called under no_grad or
    inside Function.forward)."""
    B, N, D = x.shape
    with torch.autocast(x.device.type, enabled=False):
        a = _attention_branch(block, xc, *norms[:2], dt, masks[0])
        x1, h2, _ = first.forward(block, x.reshape(-1, D), a.reshape(-1, D), wts, norms[2:], dt)
        u = _fc1(block, h2, dt)
        y = _second_residual(block, x1, _mlp_branch(block, u, dt, masks[1], x.shape), wts, dt)
    return y.view(B, N, D), u


# ---------------------------------------------------------------------------------------------
# Backward: recompute the front of the block, then the steps in reverse

class _Replay(NamedTuple):
    x_leaf: Tensor      # the saved x in dt, the leaf of the attention graph
    a: Tensor           # the attention branch, with its graph to x_leaf and the LN1 affine
    x: Tensor           # x flat in the residual dtype
    x1: Tensor          # the first residual's output
    state: object       # the first residual step's own (GIST: LN2 mean and rstd)
    u: Tensor           # fc1(h2), saved ("lean") or recomputed ("min")


def grads_of(outputs: Sequence[Tensor], inputs: Sequence[Tensor], grads: Sequence[Tensor]) -> List[Optional[Tensor]]:
    """d(outputs)/d(inputs) given the outputs' gradients; None for an input that does not require grad or that the
    outputs do not depend on (and for all of them when no output requires grad)."""
    pairs = [(o, g) for o, g in zip(outputs, grads) if o.requires_grad]
    wanted = [t for t in inputs if t.requires_grad]
    found = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
                 if pairs and wanted else ())
    return [next(found) if t.requires_grad and pairs else None for t in inputs]


def _grads(out: Tensor, grad: Tensor, leaf: Tensor, params: Sequence[Tensor]):
    """(d out/d leaf, (d out/d p for each p of params: None where p does not require grad)), given grad."""
    g_leaf, *g = grads_of([out], [leaf, *params], [grad])
    return g_leaf, tuple(g)


def _recompute(block, first, xc: Tensor, u: Optional[Tensor], wts, norms, dt, mask1, res_dtype) -> _Replay:
    """The block's front again from the saved x (and u): the attention branch as a local autograd graph, the
    first residual, and fc1 unless u was saved."""
    with torch.enable_grad():
        x_leaf = xc.detach().requires_grad_()
        a = _attention_branch(block, x_leaf, *norms[:2], dt, mask1)
    D = xc.shape[-1]
    x = xc.to(res_dtype).reshape(-1, D)
    x1, h2, state = first.forward(block, x, a.detach().reshape(-1, D), wts, norms[2:], dt, need_h2=u is None)
    return _Replay(x_leaf, a, x, x1, state, _fc1(block, h2, dt) if u is None else u)


def _second_residual_backward(block, dy: Tensor, x1: Tensor, wts, dt):
    """y = x1 + m + s A(x1): (the gradient reaching x1, the adapter's weight gradients); m's gradient is dy."""
    g_x1, _, *g_w, _, _ = adapter_bwd(dy.contiguous(), None, x1, *wts[:3], block.adapter.scale, None, None, None,
                                      None, True, dt)
    return g_x1, g_w


def _mlp_backward(block, dy: Tensor, u: Tensor, mask2, dt, shape) -> Tensor:
    """m = DP2(LS2(fc2(GELU(u)))), u = fc1(h2): the gradient reaching h2 (frozen weights: input gradients only)."""
    dm = _scaled(dy.view(shape), _ls_gamma(block.ls2), mask2).reshape(-1, shape[-1]).to(dt)
    dg = dm @ _w(block.mlp.fc2.weight, dt)
    return torch.ops.aten.gelu_backward(dg, u) @ _w(block.mlp.fc1.weight, dt)


def _attention_backward(r: _Replay, g_x: Tensor, g_a: Tensor, n1, res_dtype):
    """x's total gradient (g_x, from the residual and the adapter, plus the attention branch's) and LN1's."""
    g_leaf, g_n1 = _grads(r.a, g_a.view(r.a.shape).to(r.a.dtype), r.x_leaf, n1)
    return g_x.view(r.a.shape).to(res_dtype) + g_leaf.to(res_dtype), g_n1


class _LeanBlock(torch.autograd.Function):
    """One GIST/AdaptFormer block; saves x (and u in "lean") in the compute dtype."""

    @staticmethod
    def forward(ctx, x, w_down, b_down, w_up, b_up, n1w, n1b, n2w, n2b, block, first, mode, dt, masks):
        wts, norms = (w_down, b_down, w_up, b_up), (n1w, n1b, n2w, n2b)
        xc = x.to(dt)
        y, u = _block_forward(block, first, x, xc, wts, norms, dt, masks)
        ctx.block, ctx.first, ctx.dt, ctx.masks, ctx.x_dtype = block, first, dt, masks, x.dtype
        ctx.save_for_backward(xc, u if mode == "lean" else None, *wts, *norms)
        return y

    @staticmethod
    def backward(ctx, dy):
        xc, u, *params = ctx.saved_tensors
        wts, n1, n2 = tuple(params[:4]), tuple(params[4:6]), tuple(params[6:])
        block, first, dt, (mask1, mask2) = ctx.block, ctx.first, ctx.dt, ctx.masks
        res_dtype = torch.promote_types(ctx.x_dtype, dt)
        with torch.autocast(xc.device.type, enabled=False):
            r = _recompute(block, first, xc, u, wts, n1 + n2, dt, mask1, res_dtype)
            dy = dy.reshape(-1, xc.shape[-1])
            g_x1, g_w2 = _second_residual_backward(block, dy, r.x1, wts, dt)
            dh2 = _mlp_backward(block, dy, r.u, mask2, dt, xc.shape)
            g_x, g_a, g_w, g_n2 = first.backward(block, g_x1, dh2, r.x, r.x1, r.state, wts, n2, dt, g_w2)
            g_x, g_n1 = _attention_backward(r, g_x, g_a, n1, res_dtype)
        grads = [g.to(p.dtype) if need and g is not None else None
                 for g, p, need in zip((*g_w, *g_n1, *g_n2), params, ctx.needs_input_grad[1:9])]
        return (g_x.to(ctx.x_dtype), *grads, None, None, None, None, None)
