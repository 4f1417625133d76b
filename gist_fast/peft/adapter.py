"""The bottleneck adapter and the three block forwards that place it (METHODS §1-§2): GIST's parallel
adapter, iDAT's sequential one, AdaptFormer's beside the MLP."""
from typing import Optional

from torch import Tensor, nn

from gist_fast import ops, reference
from gist_fast.ops.adapter import fusable_norm
from gist_fast.peft.blocks import attn_branch, mlp_branch


class Adapter(nn.Module):
    """Bottleneck adapter applied residually: forward(x, branch) = x + branch + scale * A(x),
    A(x) = W_up GELU(W_down x + b_down) + b_up (exact GELU). Fused into one op when `fused`."""

    def __init__(self, dim: int, rank: int = 4, scale: float = 0.1, fused: bool = True):
        super().__init__()
        self.down, self.up = nn.Linear(dim, rank), nn.Linear(rank, dim)
        self.scale, self.fused = float(scale), fused
        for layer in (self.down, self.up):  # the authors' init: both trunc-normal 0.02, up NOT zero
            nn.init.trunc_normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

    def _weights(self):
        return self.down.weight, self.down.bias, self.up.weight, self.up.bias, self.scale

    def forward(self, x: Tensor, branch: Optional[Tensor] = None) -> Tensor:
        fn = ops.adapter if self.fused else reference.adapter
        return fn(x, *self._weights(), branch=branch)

    def forward_norm(self, x: Tensor, norm: nn.Module, branch: Optional[Tensor] = None):
        """(out, norm(out)) with out = forward(x, branch); one pass when fused and `norm` is fusable."""
        if not (self.fused and fusable_norm(norm)):
            out = self.forward(x, branch)
            return out, norm(out)
        return ops.adapter_norm(x, *self._weights(), norm.weight, norm.bias, norm.eps, branch=branch)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, fused={self.fused}"


def make_adapter(config, block, _i: int) -> dict:
    return {"adapter": Adapter(block.norm1.normalized_shape[0], config.rank, config.scale, config.fused)}


def gist_adapter_forward(self, x: Tensor, **attn_kwargs) -> Tensor:
    """GIST: x' = x + DP(MHSA(LN1 x)) + A(x);  y = x' + DP(MLP(LN2 x')) + A(x'), one shared adapter."""
    x, normed = self.adapter.forward_norm(x, self.norm2, branch=attn_branch(self, x, attn_kwargs))
    return self.adapter(x, branch=mlp_branch(self, normed))


def seq_adapter_forward(self, x: Tensor, **attn_kwargs) -> Tensor:
    """iDAT: the unchanged block, then y = x'' + A(x'')."""
    x = x + attn_branch(self, x, attn_kwargs)
    return self.adapter(x + mlp_branch(self, self.norm2(x)))


def adaptformer_forward(self, x: Tensor, **attn_kwargs) -> Tensor:
    """AdaptFormer: x' = x + DP(MHSA(LN1 x));  y = x' + DP(MLP(LN2 x')) + s A(x')."""
    x = x + attn_branch(self, x, attn_kwargs)
    return self.adapter(x, branch=mlp_branch(self, self.norm2(x)))
