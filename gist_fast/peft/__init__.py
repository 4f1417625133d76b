"""The PEFT kinds patch() knows, one file each (their modules and timm-Block forwards, METHODS §1-§3, §6), and
KINDS: the registry that says, per kind, what patch() inserts, which forward it binds and what trains."""
import functools
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

from torch import Tensor, nn

from gist_fast import lean_block, lean_steps
from gist_fast.lean_block import GistResidual, PlainResidual
from gist_fast.peft.adapter import Adapter, adaptformer_forward, gist_adapter_forward, make_adapter, seq_adapter_forward
from gist_fast.peft.blocks import Steps, steps_forward, steps_reason
from gist_fast.peft.channels import ChannelLinear, channels_forward, make_channels
from gist_fast.peft.lora import LoRA, LoraSteps, QkvLoraSteps, fold_lora, fold_qkv_lora, make_lora, make_qkv_lora
from gist_fast.peft.ssf import (
    BLOCK_SITES,
    ScaleShift,
    SsfSteps,
    fold_ssf,
    install_ssf,
    make_ssf,
    ssf_reason,
    uninstall_ssf,
)
from gist_fast.peft.vpt import install_prompts, prompts, uninstall_prompts


@dataclass(frozen=True)
class PeftKind:
    """Everything patch() needs to know of one PEFT kind: adding a kind is one entry in KINDS (and its modules
    and block forward in a file of this package)."""

    name: str
    modules: Tuple[str, ...] = ()          # its per-block modules: paths inside a block (e.g. "attn.lora_q")
    make: Optional[Callable[[Any, nn.Module, int], Dict[str, nn.Module]]] = None  # (config, block, i) -> {path: module}
    group: str = ""                        # its tensors' group in parameter_summary
    forward: Optional[Callable] = None     # the eager block forward; None: timm's own
    lean: Optional[Callable] = None        # (block, memory mode) -> the memory-lean block forward; None: no lean path
    check: Optional[Callable[[nn.Module], Optional[str]]] = None  # (model) -> why the kind cannot patch it, or None
    install: Optional[Callable] = None     # (model, config, like): its model-level tensors and hooks
    uninstall: Optional[Callable] = None   # (model): undoes install
    model_modules: Tuple[str, ...] = ()    # the model attributes install adds that train
    patch_tokens: Optional[Callable[[nn.Module, Tensor], Tensor]] = None  # (model, patch tokens) before pos-embed
    tokens: Optional[Callable[[nn.Module, int, Any], Tensor]] = None  # (model, batch, dtype): tokens after the Gist
    scale: Optional[float] = None          # the default scale of an adapter kind
    alpha: Optional[float] = None          # the default α of a LoRA kind
    prompts: Optional[int] = None          # the default prompt count of a prompt kind
    fold: Optional[Callable] = None        # (model, undo) -> [Update]: gist_fast.merge's fold into frozen weights
    unmergeable: str = ""                  # why nothing can fold, for a kind without `fold`
    trains_norms: bool = False             # the LayerNorm affine parameters train too
    takes_gist: bool = True                # can carry the Gist token and its loss

    @property
    def is_adapter(self) -> bool:
        return self.scale is not None

    @property
    def uses_rank(self) -> bool:
        return self.is_adapter or self.alpha is not None


def _steps_kind(name: str, steps, **kw) -> PeftKind:
    """A kind whose block forward is `steps` (peft.blocks.steps_forward) and whose lean path replays it."""
    return PeftKind(name, forward=functools.partial(steps_forward, steps=steps),
                    lean=functools.partial(lean_steps.bind, steps=steps), **{"check": steps_reason, **kw})


def _adapter_lean(first, forward) -> Callable:
    return functools.partial(lean_block.bind, first=first, fallback=forward)


def _patch_ssf(model: nn.Module, x: Tensor) -> Tensor:
    return model.ssf_patch(x)


GELU_ADAPTER = "its adapters apply a GELU between their two Linears: no frozen weight can absorb them"

KINDS: Dict[str, PeftKind] = {k.name: k for k in (
    PeftKind("adapter", ("adapter",), make_adapter, "adapters", gist_adapter_forward,
             _adapter_lean(GistResidual, gist_adapter_forward), scale=0.1, unmergeable=GELU_ADAPTER),
    PeftKind("seq-adapter", ("adapter",), make_adapter, "adapters", seq_adapter_forward, scale=1.0,
             unmergeable=GELU_ADAPTER),
    PeftKind("adaptformer", ("adapter",), make_adapter, "adapters", adaptformer_forward,
             _adapter_lean(PlainResidual, adaptformer_forward), scale=0.1, unmergeable=GELU_ADAPTER),
    PeftKind("ln", trains_norms=True, unmergeable="its trained tensors are the LayerNorms' own weights: there is "
             "nothing to fold and the blocks already run timm's forward"),
    PeftKind("channels", ("channel_linear",), make_channels, "channels", channels_forward, trains_norms=True,
             unmergeable="its K×K linear acts on the residual stream entering norm2, where no frozen weight sits"),
    PeftKind("linear", unmergeable="only the head trains: there is nothing to fold"),
    PeftKind("vpt", group="prompts", lean=functools.partial(lean_steps.bind, steps=Steps), install=install_prompts,
             uninstall=uninstall_prompts, model_modules=("prompt_tokens",), tokens=prompts, prompts=200,
             unmergeable="prompts are tokens, not weights: they stay in the sequence"),
    _steps_kind("lora", LoraSteps, modules=("attn.lora_q", "attn.lora_v"), make=make_lora, group="lora", alpha=1.0,
                fold=fold_lora),
    _steps_kind("qkv-lora", QkvLoraSteps, modules=("attn.qkv_lora",), make=make_qkv_lora, group="lora", alpha=8.0,
                fold=fold_qkv_lora),
    _steps_kind("ssf", SsfSteps, modules=tuple(f"ssf_{s}" for s in BLOCK_SITES), make=make_ssf, group="ssf",
                check=ssf_reason, install=install_ssf, uninstall=uninstall_ssf,
                model_modules=("ssf_patch", "ssf_final"), patch_tokens=_patch_ssf, fold=fold_ssf),
)}

# the kinds `gist-fast train --peft` offers: those with tensors of their own that leave the LayerNorms frozen
# (ln and channels are the two-stage framework's, linear its own)
TUNABLE = tuple(k for k, kind in KINDS.items() if kind.group and not kind.trains_norms)

__all__ = ["PeftKind", "KINDS", "TUNABLE", "Adapter", "ChannelLinear", "LoRA", "ScaleShift"]
