"""The eager pieces of a pre-norm timm Block that every PEFT kind's forward is written with."""
from torch import Tensor


def attn_branch(block, x: Tensor, attn_kwargs: dict) -> Tensor:
    """DP(LS(MHSA(LN1 x))). Newer timm passes attn_mask / is_causal to attention; timm 0.9 takes none."""
    return block.drop_path1(block.ls1(block.attn(block.norm1(x), **attn_kwargs)))


def mlp_branch(block, normed: Tensor) -> Tensor:
    """DP(LS(MLP(normed)))."""
    return block.drop_path2(block.ls2(block.mlp(normed)))
