"""SSF (METHODS §6): a per-channel scale and shift after the patch embedding, norm1, qkv, proj, norm2, fc1,
fc2 and the final norm. Fused: after a LayerNorm it is the LayerNorm with the affine (w γ, b γ + β); after
fc1 it rides with the GELU (one op); elsewhere one scale-shift op."""
import functools
import warnings
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gist_fast import ops, reference
from gist_fast.ops.adapter import fusable_norm
from gist_fast.peft.blocks import Steps, Update, f64, steps_reason

BLOCK_SITES = ("norm1", "qkv", "proj", "norm2", "fc1", "fc2")


class ScaleShift(nn.Module):
    """u -> u ⊙ scale + shift over the last dimension; scale ~ N(1, 0.02²), shift ~ N(0, 0.02²)."""

    def __init__(self, dim: int, fused: bool = True):
        super().__init__()
        self.scale, self.shift = nn.Parameter(torch.empty(dim)), nn.Parameter(torch.empty(dim))
        nn.init.normal_(self.scale, mean=1.0, std=0.02)
        nn.init.normal_(self.shift, std=0.02)
        self.fused = fused

    def forward(self, u: Tensor, gelu: bool = False) -> Tensor:
        return (ops.scale_shift if self.fused else reference.scale_shift)(u, self.scale, self.shift, gelu)

    def extra_repr(self) -> str:
        return f"{self.scale.numel()}, fused={self.fused}"


def _width(block, site: str) -> int:
    attn, mlp = block.attn, block.mlp
    return {"norm1": block.norm1.normalized_shape[0], "qkv": attn.qkv.out_features,
            "proj": attn.proj.out_features, "norm2": block.norm2.normalized_shape[0],
            "fc1": mlp.fc1.out_features, "fc2": mlp.fc2.out_features}[site]


def make_ssf(config, block, _i: int) -> dict:
    return {f"ssf_{s}": ScaleShift(_width(block, s), config.fused) for s in BLOCK_SITES}


def norm_then_ssf(norm: nn.Module, ssf: ScaleShift, x: Tensor) -> Tensor:
    """SSF(norm(x)); fused: one LayerNorm with the affine (w γ, b γ + β)."""
    if ssf.fused and fusable_norm(norm):
        return F.layer_norm(x, norm.normalized_shape, norm.weight * ssf.scale, torch.addcmul(ssf.shift, norm.bias,
                                                                                           ssf.scale), norm.eps)
    return ssf(type(norm).forward(norm, x))


def _exact_gelu(act: nn.Module) -> bool:
    return isinstance(act, nn.GELU) and act.approximate == "none"


class SsfSteps(Steps):
    """Every block site followed by its scale-shift."""

    @staticmethod
    def norm1(block, x: Tensor) -> Tensor:
        return norm_then_ssf(block.norm1, block.ssf_norm1, x)

    @staticmethod
    def qkv(block, h: Tensor) -> Tensor:
        return block.ssf_qkv(block.attn.qkv(h))

    @staticmethod
    def proj(block, o: Tensor) -> Tensor:
        return block.ssf_proj(block.attn.proj(o))

    @staticmethod
    def norm2(block, x: Tensor) -> Tensor:
        return norm_then_ssf(block.norm2, block.ssf_norm2, x)

    @staticmethod
    def mlp_rest(block, u: Tensor) -> Tensor:
        """SSF after fc1 (with the GELU in one op when it is the exact GELU), the activation, dropout, norm, fc2,
        SSF after fc2, dropout."""
        mlp, ssf1 = block.mlp, block.ssf_fc1
        a = ssf1(u, gelu=True) if _exact_gelu(mlp.act) else mlp.act(ssf1(u))
        return mlp.drop2(block.ssf_fc2(mlp.fc2(mlp.norm(mlp.drop1(a)))))


def ssf_reason(model: nn.Module) -> Optional[str]:
    """Why SSF cannot patch the model (None when it can): ssf_patch sits right after the patch projection."""
    if not isinstance(getattr(model.patch_embed, "norm", nn.Identity()), nn.Identity):
        return "its patch embedding has a norm (SSF's patch site is the projection's output)"
    return steps_reason(model)


def final_norm(model: nn.Module) -> str:
    """The final norm ssf_final follows: `norm` (every token), or `fc_norm` where timm normalises after pooling
    (global_pool="avg": `norm` is an Identity there)."""
    return "fc_norm" if isinstance(model.norm, nn.Identity) and hasattr(model, "fc_norm") else "norm"


def install_ssf(model: nn.Module, config, like: dict) -> None:
    """The model-level sites: ssf_patch (applied to the patch tokens in the patched _pos_embed, before CLS, the
    Gist token and the position embedding join) and ssf_final (after the final norm)."""
    model.ssf_patch = ScaleShift(model.embed_dim, config.fused).to(**like)
    model.ssf_final = ScaleShift(model.embed_dim, config.fused).to(**like)
    norm = model.get_submodule(final_norm(model))
    norm.forward = functools.partial(norm_then_ssf, norm, model.ssf_final)


def uninstall_ssf(model: nn.Module) -> None:
    model.get_submodule(final_norm(model)).__dict__.pop("forward", None)
    del model.ssf_patch, model.ssf_final


# --- merge (gist_fast.merge): each site folded into the LayerNorm, Linear or Conv2d before it -------------

_BLOCK_TARGETS = {"norm1": "norm1", "qkv": "attn.qkv", "proj": "attn.proj", "norm2": "norm2", "fc1": "mlp.fc1",
                  "fc2": "mlp.fc2"}


def _ssf_sites(model: nn.Module) -> List[Tuple[str, str]]:
    """(ScaleShift path, the path of the layer whose output it scales and shifts)."""
    sites = [("ssf_patch", "patch_embed.proj"), ("ssf_final", final_norm(model))]
    for i in range(len(model.blocks)):
        sites += [(f"blocks.{i}.ssf_{s}", f"blocks.{i}.{t}") for s, t in _BLOCK_TARGETS.items()]
    return sites


def _absorbs(layer: nn.Module) -> bool:
    return isinstance(layer, (nn.LayerNorm, nn.Linear, nn.Conv2d))


def fold_ssf(model: nn.Module, undo: bool) -> List[Update]:
    updates = []
    for ssf_path, path in _ssf_sites(model):
        ssf, layer = model.get_submodule(ssf_path), model.get_submodule(path)
        if not _absorbs(layer):
            raise ValueError(f"cannot merge {ssf_path}: it follows {path} ({type(layer).__name__}), and merge folds "
                             "SSF into a LayerNorm, Linear or Conv2d only")
        gamma, beta = f64(ssf.scale), f64(ssf.shift)
        dtype = next(t for t in (layer.weight, layer.bias, ssf.scale) if t is not None).dtype
        w = torch.ones_like(gamma) if layer.weight is None else f64(layer.weight)
        b = torch.zeros_like(gamma) if layer.bias is None else f64(layer.bias)
        g = gamma.reshape(-1, *[1] * (w.dim() - 1))
        if undo:
            if (gamma == 0).any():
                raise ValueError(f"cannot unmerge {ssf_path}: {int((gamma == 0).sum())} of its scales are 0, so merge "
                                 f"set those channels of {path} to zero and they cannot be recovered")
            w, b = w / g, (b - beta) / gamma
        else:
            if (gamma == 0).any():
                warnings.warn(f"{ssf_path} has {int((gamma == 0).sum())} scales of 0: merge zeroes those channels of "
                              f"{path}, and gist_fast.unmerge will not be able to recover them", stacklevel=3)
            w, b = w * g, b * gamma + beta
        updates += [(path, "weight", w.to(dtype)), (path, "bias", b.to(dtype))]
    return updates
