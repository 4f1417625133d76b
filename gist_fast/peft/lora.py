"""LoRA in its two forms (METHODS §6): the GIST authors' per-head LoRA on q and v (`lora`) and Hu et al.'s LoRA
on the qkv Linear's input (`qkv-lora`, the layout HF PEFT gives a timm ViT with target_modules=["qkv"])."""
from typing import List

import torch
from torch import Tensor, nn

from gist_fast import ops, reference
from gist_fast.peft.blocks import Steps, Update, f64


class LoRA(nn.Module):
    """x -> scaling · up(down(x)), two bias-free Linears: down (rank, in), up (out, rank). `zero` names the
    factor initialised to zero; the other keeps nn.Linear's init U(±1/√fan_in) (= PEFT's kaiming_uniform(a=√5)
    for lora_A)."""

    def __init__(self, in_features: int, rank: int, out_features: int, scaling: float, zero: str,
                 fused: bool = True):
        super().__init__()
        self.down, self.up = nn.Linear(in_features, rank, bias=False), nn.Linear(rank, out_features, bias=False)
        nn.init.zeros_(getattr(self, zero).weight)
        self.scaling, self.fused = float(scaling), fused

    def forward(self, x: Tensor) -> Tensor:
        return self.scaling * self.up(self.down(x))

    def delta(self) -> Tensor:
        """scaling · up @ down: the (out, in) matrix this pair adds."""
        return self.scaling * self.up.weight @ self.down.weight

    def extra_repr(self) -> str:
        return f"scaling={self.scaling}, fused={self.fused}"


def make_lora(config, block, _i: int) -> dict:
    """One (down 0, up U(±1/√r)) pair for q and one for v, shared by the heads; no α/r factor."""
    d_h = block.attn.head_dim
    return {f"attn.lora_{t}": LoRA(d_h, config.rank, d_h, config.alpha, "down", config.fused) for t in "qv"}


def make_qkv_lora(config, block, _i: int) -> dict:
    """Hu et al.: A (down) random, B (up) zero, scaling α/r."""
    qkv = block.attn.qkv
    return {"attn.qkv_lora": LoRA(qkv.in_features, config.rank, qkv.out_features, config.alpha / config.rank,
                                  "up", config.fused)}


class LoraSteps(Steps):
    """After the qkv projection (bias included): q_h += α up_q(down_q q_h), v_h += α up_v(down_v v_h)."""

    @staticmethod
    def qkv(block, h: Tensor) -> Tensor:
        attn = block.attn
        lq, lv = attn.lora_q, attn.lora_v
        fn = ops.lora_qv if lq.fused else reference.lora_qv
        return fn(attn.qkv(h), lq.down.weight, lq.up.weight, lv.down.weight, lv.up.weight, lq.scaling,
                  attn.num_heads)


class QkvLoraSteps(Steps):
    """qkv(h) + (α/r) B A h."""

    @staticmethod
    def qkv(block, h: Tensor) -> Tensor:
        return block.attn.qkv(h) + block.attn.qkv_lora(h)


# --- merge (gist_fast.merge): the LoRA forms folded into the frozen qkv Linear -----------------------------

def fold_lora(model: nn.Module, undo: bool) -> List[Update]:
    updates = []
    for i, block in enumerate(model.blocks):
        attn, path = block.attn, f"blocks.{i}.attn.qkv"
        heads, d_h = attn.num_heads, attn.head_dim
        width = heads * d_h
        w, b = f64(attn.qkv.weight), None if attn.qkv.bias is None else f64(attn.qkv.bias)
        for third, lora in ((0, attn.lora_q), (2, attn.lora_v)):
            m = torch.eye(d_h, dtype=torch.float64, device=w.device) + f64(lora.delta())
            rows = slice(third * width, (third + 1) * width)
            if undo:
                _check_invertible(m, attn.qkv.weight.dtype, f"block {i}'s {'qv'[third // 2]}")
                w[rows] = torch.linalg.solve(m, w[rows].reshape(heads, d_h, -1)).reshape(width, -1)
                if b is not None:
                    b[rows] = torch.linalg.solve(m, b[rows].reshape(heads, d_h, 1)).reshape(width)
            else:
                w[rows] = (m @ w[rows].reshape(heads, d_h, -1)).reshape(width, -1)
                if b is not None:
                    b[rows] = (b[rows].reshape(heads, d_h) @ m.T).reshape(width)
        updates.append((path, "weight", w.to(attn.qkv.weight.dtype)))
        if b is not None:
            updates.append((path, "bias", b.to(attn.qkv.bias.dtype)))
    return updates


def _check_invertible(m: Tensor, dtype: torch.dtype, where: str) -> None:
    """Refuse an I + α·up·down that is singular at the weight's precision: its condition number times the dtype's
    eps (the unfolded weights' relative error bound) reaches 1."""
    cond = torch.linalg.cond(m).item()
    if not cond * torch.finfo(dtype).eps < 1:
        raise ValueError(f"cannot unmerge: I + α·up·down of {where} is singular at {dtype}'s precision (condition "
                         f"number {cond:.3g}), so the weights merge folded it into cannot be recovered")


def fold_qkv_lora(model: nn.Module, undo: bool) -> List[Update]:
    updates = []
    for i, block in enumerate(model.blocks):
        qkv = block.attn.qkv
        delta = f64(block.attn.qkv_lora.delta())
        updates.append((f"blocks.{i}.attn.qkv", "weight", (f64(qkv.weight) + (-delta if undo else delta))
                        .to(qkv.weight.dtype)))
    return updates
