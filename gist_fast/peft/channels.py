"""Two-stage, stage 2 (METHODS §3): a K×K linear on the Taylor-selected channels entering norm2."""
from typing import Sequence

import torch
from torch import Tensor, nn

from gist_fast import reference
from gist_fast.peft.blocks import attn_branch, mlp_branch


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


def make_channels(config, block, i: int) -> dict:
    return {"channel_linear": ChannelLinear(block.norm2.normalized_shape[0], config.channels[i])}


def channels_forward(self, x: Tensor, **attn_kwargs) -> Tensor:
    """Two-stage, stage 2: the channel linear acts in place on the stream entering norm2."""
    x = self.channel_linear(x + attn_branch(self, x, attn_kwargs))
    return x + mlp_branch(self, self.norm2(x))
