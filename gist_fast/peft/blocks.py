"""The eager pieces of a pre-norm timm Block that every PEFT kind's forward is written with.

The kinds that act inside attention or the MLP (lora, qkv-lora, ssf) are one block forward, `steps_forward`,
over a `Steps` class: the block's math as timm writes it, with each site a kind may change (norm1, qkv, proj,
norm2, fc1, the rest of the MLP) a static method its subclass overrides. The memory-lean path
(gist_fast.lean_steps) runs the same steps."""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# what gist_fast.merge folds: (module path, parameter name, new value or None to remove it), computed by a
# kind's `fold(model, undo)` in float64 (f64)
Update = Tuple[str, str, Optional[Tensor]]


def f64(t: Tensor) -> Tensor:
    return t.detach().to(torch.float64)


def attn_branch(block, x: Tensor, attn_kwargs: dict) -> Tensor:
    """DP(LS(MHSA(LN1 x))). Newer timm passes attn_mask / is_causal to attention; timm 0.9 takes none."""
    return block.drop_path1(block.ls1(block.attn(block.norm1(x), **attn_kwargs)))


def mlp_branch(block, normed: Tensor) -> Tensor:
    """DP(LS(MLP(normed)))."""
    return block.drop_path2(block.ls2(block.mlp(normed)))


def steps_reason(model: nn.Module) -> Optional[str]:
    """Why `steps_forward` cannot compute the model's blocks (None when it can): it rewrites timm's Attention
    and Mlp."""
    from timm.layers import Mlp
    from timm.models.vision_transformer import Attention

    for block in model.blocks:
        if type(block.attn) is not Attention or getattr(block.attn, "gate", None) is not None:
            return f"its attention ({type(block.attn).__name__}) is not timm's ungated Attention"
        if type(block.mlp) is not Mlp:
            return f"its MLP ({type(block.mlp).__name__}) is not timm's Mlp"
    return None


def heads_attention(attn, qkv: Tensor, attn_kwargs: dict) -> Tensor:
    """timm's Attention between its qkv and proj Linears: head split, q/k norms, SDPA (its dropout in
    training), head merge and the scale-norm."""
    B, N, _ = qkv.shape
    q, k, v = qkv.reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    o = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0,
                                       **{k_: v_ for k_, v_ in attn_kwargs.items() if v_ is not None})
    o = o.transpose(1, 2).reshape(B, N, attn.num_heads * attn.head_dim)
    return attn.norm(o) if hasattr(attn, "norm") else o


class Steps:
    """timm's block math, site by site; a PEFT kind overrides the sites it changes."""

    @staticmethod
    def norm1(block, x: Tensor) -> Tensor:
        return block.norm1(x)

    @staticmethod
    def qkv(block, h: Tensor) -> Tensor:
        return block.attn.qkv(h)

    @staticmethod
    def proj(block, o: Tensor) -> Tensor:
        return block.attn.proj(o)

    @staticmethod
    def norm2(block, x: Tensor) -> Tensor:
        return block.norm2(x)

    @staticmethod
    def fc1(block, h: Tensor) -> Tensor:
        return block.mlp.fc1(h)

    @staticmethod
    def mlp_rest(block, u: Tensor) -> Tensor:
        """The MLP after fc1: activation, dropout, norm, fc2, dropout."""
        mlp = block.mlp
        return mlp.drop2(mlp.fc2(mlp.norm(mlp.drop1(mlp.act(u)))))


def attention_residual(block, steps, x: Tensor, attn_kwargs: dict) -> Tensor:
    """x1 = x + DP1(LS1(proj_drop(proj(attention(qkv(norm1 x))))))."""
    o = heads_attention(block.attn, steps.qkv(block, steps.norm1(block, x)), attn_kwargs)
    return x + block.drop_path1(block.ls1(block.attn.proj_drop(steps.proj(block, o))))


def mlp_residual(block, steps, x1: Tensor, u: Tensor) -> Tensor:
    """y = x1 + DP2(LS2(the MLP after fc1, from u = fc1(norm2 x1)))."""
    return x1 + block.drop_path2(block.ls2(steps.mlp_rest(block, u)))


def steps_forward(block, x: Tensor, *, steps, **attn_kwargs) -> Tensor:
    """The block forward of a kind given by its Steps class."""
    x1 = attention_residual(block, steps, x, attn_kwargs)
    return mlp_residual(block, steps, x1, steps.fc1(block, steps.norm2(block, x1)))
