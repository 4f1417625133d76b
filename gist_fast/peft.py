"""The PEFT modules patch() inserts, the timm-Block forwards that use them (METHODS §1-§3), and KINDS: the
registry that says, per kind, what patch() inserts, which forward it binds and what trains."""
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence

import torch
from torch import Tensor, nn

from gist_fast import ops, reference


def fusable_norm(norm: nn.Module) -> bool:
    """Whether the fused ops (and the lean block) compute this norm: an affine LayerNorm over the last dimension."""
    return isinstance(norm, nn.LayerNorm) and norm.weight is not None and len(norm.normalized_shape) == 1


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


class ChannelLinear(nn.Module):
    """Two-stage, stage 2: x[..., I] <- x[..., I] + W x[..., I] + b on K selected channels I."""

    def __init__(self, dim: int, channels: Sequence[int]):
        super().__init__()
        self.register_buffer("channels", torch.as_tensor(list(channels), dtype=torch.long))
        k = len(self.channels)
        self.linear = nn.Linear(k, k)
        nn.init.trunc_normal_(self.linear.weight, std=0.02)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        return reference.channel_linear(x, self.channels, self.linear.weight, self.linear.bias)


def _attn(block, x: Tensor, attn_kwargs: dict) -> Tensor:
    # newer timm passes attn_mask / is_causal to attention; timm 0.9 takes none
    return block.drop_path1(block.ls1(block.attn(block.norm1(x), **attn_kwargs)))


def _mlp(block, normed: Tensor) -> Tensor:
    return block.drop_path2(block.ls2(block.mlp(normed)))


def gist_adapter_forward(self, x: Tensor, **attn_kwargs) -> Tensor:
    """GIST: x' = x + DP(MHSA(LN1 x)) + A(x);  y = x' + DP(MLP(LN2 x')) + A(x'), one shared adapter."""
    x, normed = self.adapter.forward_norm(x, self.norm2, branch=_attn(self, x, attn_kwargs))
    return self.adapter(x, branch=_mlp(self, normed))


def seq_adapter_forward(self, x: Tensor, **attn_kwargs) -> Tensor:
    """iDAT: the unchanged block, then y = x'' + A(x'')."""
    x = x + _attn(self, x, attn_kwargs)
    return self.adapter(x + _mlp(self, self.norm2(x)))


def adaptformer_forward(self, x: Tensor, **attn_kwargs) -> Tensor:
    """AdaptFormer: x' = x + DP(MHSA(LN1 x));  y = x' + DP(MLP(LN2 x')) + s A(x')."""
    x = x + _attn(self, x, attn_kwargs)
    return self.adapter(x, branch=_mlp(self, self.norm2(x)))


def channels_forward(self, x: Tensor, **attn_kwargs) -> Tensor:
    """Two-stage, stage 2: the channel linear acts in place on the stream entering norm2."""
    x = self.channel_linear(x + _attn(self, x, attn_kwargs))
    return x + _mlp(self, self.norm2(x))


@dataclass(frozen=True)
class PeftKind:
    """Everything patch() needs to know of one PEFT kind: adding a kind is one entry in KINDS (and its module
    and block forward above)."""

    name: str
    module: Optional[str] = None           # the block attribute holding its per-block module
    make: Optional[Callable[[Any, int, int], nn.Module]] = None  # (patch config, dim, block index) -> module
    group: str = ""                        # its tensors' group in parameter_summary
    forward: Optional[Callable] = None     # the eager block forward; None: timm's own
    lean: bool = False                     # gist_fast.lean_block has a memory-lean forward for it
    scale: Optional[float] = None          # the default scale of an adapter kind
    trains_norms: bool = False             # the LayerNorm affine parameters train too
    takes_gist: bool = True                # can carry the Gist token and its loss

    @property
    def is_adapter(self) -> bool:
        return self.scale is not None


def _adapter(config, dim: int, _i: int) -> nn.Module:
    return Adapter(dim, config.rank, config.scale, config.fused)


def _channels(config, dim: int, i: int) -> nn.Module:
    return ChannelLinear(dim, config.channels[i])


KINDS: Dict[str, PeftKind] = {k.name: k for k in (
    PeftKind("adapter", "adapter", _adapter, "adapters", gist_adapter_forward, lean=True, scale=0.1),
    PeftKind("seq-adapter", "adapter", _adapter, "adapters", seq_adapter_forward, scale=1.0),
    PeftKind("adaptformer", "adapter", _adapter, "adapters", adaptformer_forward, lean=True, scale=0.1),
    PeftKind("ln", trains_norms=True),
    PeftKind("channels", "channel_linear", _channels, "channels", channels_forward, trains_norms=True),
    PeftKind("linear"),
)}
