"""timm ViT surgery: insert the Gist token and the PEFT modules, freeze the rest, rebind forwards (as
functools.partial of module-level functions, which pickle: torch.save(model) / copy.deepcopy work)."""
import functools
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Dict, List, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from gist_fast import lean_block
from gist_fast.lean_block import MEMORY_MODES
from gist_fast.peft import KINDS

PEFT_KINDS = tuple(KINDS)
MERGED = "_gist_fast_merged"  # the attribute gist_fast.merge leaves on a merged model (what unmerge puts back)
SUPPORTED = "timm VisionTransformer models with plain pre-norm Blocks (vit_*, deit_* without a distillation token)"


class GistOutput(NamedTuple):
    """What a gist-patched model returns in train mode."""

    logits: Tensor
    gist_logits: Tensor


@dataclass
class PatchConfig:
    peft: str
    gist: bool
    rank: int
    scale: float
    fused: bool
    channels: Optional[List[List[int]]] = None
    gist_index: int = 1
    memory: Optional[str] = "auto"
    prompts: Optional[int] = None     # vpt's prompt count
    alpha: Optional[float] = None     # the LoRA kinds' α

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict) -> "PatchConfig":
        unknown = sorted(saved.keys() - cls.__dataclass_fields__.keys())
        if unknown:
            raise ValueError(f"not a gist_fast patch configuration: unknown keys {unknown}")
        return cls(**saved)

    def differences(self, saved: dict) -> List[str]:
        """How a saved configuration's trained tensors would not fit this one's (fused and memory
        change how the math runs, not what it is)."""
        mine, kind = self.to_dict(), KINDS[self.peft]
        compared = ("peft", "gist", "scale", "channels", "prompts", "alpha") + (("rank",) if kind.uses_rank else ())
        return [f"{k}: model {mine[k]!r} vs checkpoint {saved.get(k)!r}" for k in compared if mine[k] != saved.get(k)]

    def patch_kwargs(self) -> dict:
        """The patch() arguments that rebuild this configuration on a fresh model."""
        return dict(peft=self.peft, gist=self.gist, rank=self.rank, scale=self.scale, fused=self.fused,
                    channels=self.channels, memory=self.memory, prompts=self.prompts, alpha=self.alpha)


@dataclass
class ParameterSummary:
    trainable: int
    total: int
    by_group: Dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        groups = ", ".join(f"{k} {v:,}" for k, v in self.by_group.items())
        return (f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
                f"trainable%: {100 * self.trainable / max(self.total, 1):.4f} ({groups})")


def _vit_classes():
    from timm.models.vision_transformer import Block, VisionTransformer

    return VisionTransformer, Block


def check_model(model: nn.Module) -> None:
    vit, block = _vit_classes()
    if not isinstance(model, vit) or getattr(model, "dist_token", None) is not None:
        raise TypeError(f"gist_fast.patch supports {SUPPORTED}; got {type(model).__name__}")
    if len(model.blocks) == 0:
        raise TypeError("gist_fast.patch needs a ViT with at least one block (depth >= 1)")
    odd = {type(b).__name__ for b in model.blocks if type(b) is not block}
    if odd:
        raise TypeError(f"gist_fast.patch supports {SUPPORTED}; this model has blocks of type {sorted(odd)}")
    if hasattr(model, "gist_fast_config"):
        raise RuntimeError("this model is already patched by gist_fast; gist_fast.unpatch(model) undoes it, "
                           "or create a fresh timm model")


def _normalize_channels(channels, depth: int, dim: int) -> List[List[int]]:
    if channels is None:
        raise ValueError("peft='channels' needs channels=: one index list per block (see gist_fast.select_channels)")
    rows = [list(map(int, c)) for c in (channels.tolist() if isinstance(channels, Tensor) else channels)]
    if len(rows) != depth:
        raise ValueError(f"channels must hold one index list per block ({depth}), got {len(rows)}")
    for i, row in enumerate(rows):
        if not row or min(row) < 0 or max(row) >= dim or len(set(row)) != len(row):
            raise ValueError(f"channels[{i}] must be distinct indices in [0, {dim}), "
                             f"got {row[:8]}{'...' if len(row) > 8 else ''}")
    return rows


def _peft_pos_embed(self, x: Tensor, *, patch_tokens, tokens, gist: bool) -> Tensor:
    """The kind's change to the patch tokens (ssf_patch), timm's own position embedding, then the Gist token and
    the kind's tokens (prompts) after the prefix tokens, without position embedding: [CLS, g, P_1..P_N, patches].
    The prompts' dropout draws before the Gist token's (the authors' order)."""
    if patch_tokens is not None:
        x = patch_tokens(self, x)
    x = type(self)._pos_embed(self, x)
    i = self.gist_fast_config.gist_index
    extra = [] if tokens is None else [tokens(self, x.shape[0], x.dtype)]
    if gist:
        extra.insert(0, self.gist_drop(self.gist_token.expand(x.shape[0], -1, -1).to(x.dtype)))
    return torch.cat([x[:, :i], *extra, x[:, i:]], dim=1)


def _gist_forward(self, x: Tensor, *args, **kwargs):
    """Eval: logits, as timm returns them. Train: GistOutput(logits, gist_logits), both through
    the final norm and the same head."""
    feats = self.forward_features(x, *args, **kwargs)
    logits = self.forward_head(feats)
    if not self.training:
        return logits
    gist = self.head(self.head_drop(self.fc_norm(feats[:, self.gist_fast_config.gist_index])))
    return GistOutput(logits, gist)


def trainable_groups(model: nn.Module) -> Dict[str, List[nn.Parameter]]:
    cfg, kind = model.gist_fast_config, KINDS[model.gist_fast_config.peft]
    groups = {"head": list(model.get_classifier().parameters())}
    if cfg.gist:
        groups["gist"] = [model.gist_token]
    if kind.trains_norms:
        groups["layernorms"] = [p for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()]
    if kind.modules or kind.model_modules:
        groups[kind.group] = ([p for name in kind.model_modules for p in _tensors(getattr(model, name))]
                              + [p for b in model.blocks for path in kind.modules
                                 for p in b.get_submodule(path).parameters()])
    return groups


def _tensors(m: Union[nn.Module, nn.Parameter]) -> List[nn.Parameter]:
    return [m] if isinstance(m, nn.Parameter) else list(m.parameters())


def parameter_summary(model: nn.Module) -> ParameterSummary:
    """Counts of trainable parameters, in all and by group (head, gist, adapters, ...)."""
    by_group = ({k: sum(p.numel() for p in ps) for k, ps in trainable_groups(model).items()}
                if hasattr(model, "gist_fast_config") else {})
    return ParameterSummary(sum(p.numel() for p in model.parameters() if p.requires_grad),
                            sum(p.numel() for p in model.parameters()), by_group)


def patch(
    model: nn.Module,
    *,
    peft: str = "adapter",
    gist: bool = True,
    rank: int = 4,
    scale: Optional[float] = None,
    fused: Union[str, bool] = "auto",
    channels: Optional[Union[Sequence[Sequence[int]], Tensor]] = None,
    verbose: bool = True,
    memory: Optional[str] = "auto",
    prompts: Optional[int] = None,
    alpha: Optional[float] = None,
) -> nn.Module:
    """Patch a timm VisionTransformer in place for GIST / iDAT / two-stage PEFT and return it.

    peft: "adapter" (GIST's parallel adapter), "seq-adapter" (iDAT), "adaptformer", "ln" (two-stage
    stage 1), "channels" (stage 2, needs `channels`), "linear" (head only), and GIST over other PEFT methods
    (METHODS §6): "vpt" (VPT-shallow, `prompts` tokens, 200 by default), "lora" (the authors' per-head LoRA on
    q and v, rank `rank`, `alpha` 1 by default, no α/r), "qkv-lora" (Hu et al.'s LoRA on the qkv Linear, HF
    PEFT's layout, scaling alpha/rank, `alpha` 8 by default), "ssf" (scale and shift at every site).
    scale=None takes the method's own (0.1 for adapter/adaptformer, 1 for seq-adapter). fused: "auto"/True use the fused
    ops (Triton on CUDA, C++ on CPU, the reference elsewhere), False the plain-PyTorch reference.
    Everything but the PEFT parameters, the gist token and the head is frozen.
    memory: with fused ops, the memory-lean block forward/backward (gist_fast.lean_block for "adapter" and
    "adaptformer", gist_fast.lean_steps for "vpt", "lora", "qkv-lora", "ssf"): "lean" saves the block input
    and the MLP pre-activation, "min" the block input only (more recomputation), None the eager block;
    "auto" is "lean" on CUDA and None on CPU (where compute, not memory, limits a step and recomputation
    only costs time).
    """
    config = _configure(model, peft, gist, rank, scale, fused, channels, memory, prompts, alpha)
    like = _like(model)
    model._gist_fast_trained_before = [n for n, p in model.named_parameters() if p.requires_grad]  # for unpatch
    _freeze(model)
    model.gist_fast_config = config
    kind = KINDS[peft]
    if kind.install is not None:
        kind.install(model, config, like)
    paths = _insert_and_bind(model, kind, config, like)
    if gist:
        _add_gist_token(model, like)
    _bind_tokens(model, kind, config)
    for params in trainable_groups(model).values():
        for p in params:
            p.requires_grad_(True)
    if verbose:
        print(f"gist_fast.patch: peft={peft}{_hyperparameters(kind, config)} gist={gist} fused={fused} "
              f"blocks={paths} | {parameter_summary(model)}")
    return model


def _hyperparameters(kind, config: PatchConfig) -> str:
    if kind.is_adapter:
        return f" rank={config.rank} scale={config.scale}"
    if kind.alpha is not None:
        return f" rank={config.rank} alpha={config.alpha}"
    return f" prompts={config.prompts}" if kind.prompts is not None else ""


def _configure(model, peft, gist, rank, scale, fused, channels, memory, prompts, alpha) -> PatchConfig:
    """Check every argument against the model; the configuration patch() applies."""
    check_model(model)
    if peft not in KINDS:
        raise ValueError(f"unknown peft {peft!r}; choose one of {PEFT_KINDS}")
    kind = KINDS[peft]
    if fused not in ("auto", True, False):
        raise ValueError(f"fused must be 'auto', True or False, got {fused!r}")
    if not 1 <= rank <= 1024:
        raise ValueError(f"rank must be in [1, 1024], got {rank}")
    refused = kind.check(model) if kind.check is not None else None
    if refused:
        raise TypeError(f"peft={peft!r} cannot patch this model: {refused}")
    if gist and not kind.takes_gist:
        raise ValueError(f"peft={peft!r} cannot carry the Gist token (gist=False)")
    if (gist or kind.tokens is not None) and getattr(model, "dynamic_img_size", False):
        raise ValueError("the Gist token and prompts need a fixed image size: timm resamples the position embedding "
                         "of a dynamic_img_size model by its prefix-token count, which would count them")
    if gist and getattr(model, "attn_pool", None) is not None:
        raise ValueError("gist=True needs token or average pooling; "
                         "this model pools with attention (global_pool='map')")
    if memory not in MEMORY_MODES + ("auto", None):
        raise ValueError(f"memory must be one of {MEMORY_MODES + ('auto',)} or None, got {memory!r}")
    _check_kind_options(kind, prompts, alpha)
    return PatchConfig(
        peft=peft, gist=gist, rank=rank, scale=float((kind.scale or 0.0) if scale is None else scale),
        fused=fused is not False, gist_index=model.num_prefix_tokens,
        channels=_normalize_channels(channels, len(model.blocks), model.embed_dim) if peft == "channels" else None,
        memory=memory if fused is not False and kind.lean else None,
        prompts=(kind.prompts if prompts is None else int(prompts)) if kind.prompts is not None else None,
        alpha=(kind.alpha if alpha is None else float(alpha)) if kind.alpha is not None else None,
    )


def _check_kind_options(kind, prompts, alpha) -> None:
    """prompts only for a prompt kind, alpha only for a LoRA kind: naming one for another kind is a mistake."""
    if prompts is not None:
        if kind.prompts is None:
            raise ValueError(f"prompts= is vpt's option, not {kind.name!r}'s")
        if isinstance(prompts, bool) or int(prompts) != prompts or prompts < 1:
            raise ValueError(f"prompts must be a positive integer, got {prompts!r}")
    if alpha is not None:
        if kind.alpha is None:
            raise ValueError(f"alpha= is the LoRA kinds' option (lora, qkv-lora), not {kind.name!r}'s")
        if isinstance(alpha, bool) or not (math.isfinite(float(alpha)) and alpha > 0):
            raise ValueError(f"alpha must be a positive finite number, got {alpha!r}")


def _like(model: nn.Module) -> dict:
    """New modules follow the backbone's device and dtype."""
    anchor = next(model.blocks.parameters())
    return {"device": anchor.device, "dtype": anchor.dtype}


def _freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def _insert_and_bind(model: nn.Module, kind, config: PatchConfig, like: dict) -> str:
    """Each block's PEFT module and forward, chosen here once (`_choose_forward`). Returns the paths taken, with a
    count each where blocks differ."""
    paths = []
    for i, block in enumerate(model.blocks):
        if kind.make is not None:
            for path, module in kind.make(config, block, i).items():
                parent, _, name = path.rpartition(".")
                block.get_submodule(parent).add_module(name, module.to(**like))
        forward, path = _choose_forward(block, kind, config)
        if forward is not None:
            block.forward = forward
        paths.append(path)
    counts = Counter(paths)
    return paths[0] if len(counts) == 1 else ", ".join(f"{n}x {p}" for p, n in counts.items())


_LEAN_PATHS = {"lean": "lean", "min": "lean(min)", "auto": "auto (lean on CUDA inputs, eager fused ops on CPU)"}


def _choose_forward(block: nn.Module, kind, config: PatchConfig):
    """(forward, path): the lean block where the configuration asks for it and the block's structure allows it
    (lean_block.unsupported_reason), the kind's eager forward otherwise, None for timm's own."""
    refused = lean_block.unsupported_reason(block) if config.memory is not None else None
    if config.memory is not None and refused is None:
        return kind.lean(block, config.memory), _LEAN_PATHS[config.memory]
    if kind.forward is None:
        return None, "timm"
    return functools.partial(kind.forward, block), f"eager (not lean: {refused})" if refused else "eager"


def _add_gist_token(model: nn.Module, like: dict) -> None:
    """The Gist token (its position and dropout: _bind_tokens) and the two-output forward."""
    model.gist_token = nn.Parameter(torch.empty(1, 1, model.embed_dim).uniform_(-0.5, 0.5).to(**like))
    model.gist_drop = nn.Dropout(0.1)
    model.forward = functools.partial(_gist_forward, model)


def _extra_tokens(config: PatchConfig) -> int:
    return int(config.gist) + (config.prompts or 0)


def _count_prefix(model: nn.Module, n: int) -> None:
    """timm's pooling and patch dropout skip the Gist token and the prompts as they skip CLS."""
    model.num_prefix_tokens += n
    if hasattr(model.patch_drop, "num_prefix_tokens"):
        model.patch_drop.num_prefix_tokens += n


def _bind_tokens(model: nn.Module, kind, config: PatchConfig) -> None:
    """The patched _pos_embed where the Gist token or the kind changes the token sequence (bind_pos_embed)."""
    if bind_pos_embed(model, kind.patch_tokens):
        _count_prefix(model, _extra_tokens(config))


def patch_config(model: nn.Module) -> dict:
    """The configuration patch() applied, as a plain dict (checkpoints carry it)."""
    if not hasattr(model, "gist_fast_config"):
        raise ValueError("model is not patched by gist_fast")
    return model.gist_fast_config.to_dict()


def unpatch(model: nn.Module) -> nn.Module:
    """Undo patch() in place, for A/B runs on one backbone: the PEFT modules and the Gist token are
    removed (save gist_fast.trainable_state_dict first to keep them), timm's forwards come back and
    the parameters that trained before patch() train again; a trained head keeps its weights.
    The model can be patched again afterwards. Returns it."""
    kind = KINDS[patch_config(model)["peft"]]
    config = model.gist_fast_config
    if hasattr(model, MERGED):
        raise RuntimeError("this model is merged (gist_fast.merge): gist_fast.unmerge(model) first, so that unpatch "
                           "gives back the original timm weights")
    for block in model.blocks:
        block.__dict__.pop("forward", None)  # the bound partial shadowed the class's forward
        for path in kind.modules:
            parent, _, name = path.rpartition(".")
            delattr(block.get_submodule(parent), name)
    if "_pos_embed" in model.__dict__:
        del model._pos_embed
        _count_prefix(model, -_extra_tokens(config))
    if config.gist:
        del model.gist_token, model.gist_drop, model.forward
    if kind.uninstall is not None:
        kind.uninstall(model)
    trained = set(model.__dict__.pop("_gist_fast_trained_before", dict(model.named_parameters())))
    for name, p in model.named_parameters():
        p.requires_grad_(name in trained)
    del model.gist_fast_config
    return model


def bind_pos_embed(model: nn.Module, patch_tokens) -> bool:
    """model._pos_embed as patch() binds it (_peft_pos_embed: the Gist token and the kind's tokens), with
    `patch_tokens` the change to the patch tokens (the kind's in patch(); None from gist_fast.merge, which folds
    it into the patch projection); timm's own where nothing changes the sequence. Whether it is patched."""
    config, kind = model.gist_fast_config, KINDS[model.gist_fast_config.peft]
    if not (config.gist or kind.tokens is not None or patch_tokens is not None):
        model.__dict__.pop("_pos_embed", None)
        return False
    model._pos_embed = functools.partial(_peft_pos_embed, model, patch_tokens=patch_tokens, tokens=kind.tokens,
                                         gist=config.gist)
    return True
