"""timm ViT surgery: insert the Gist token and the PEFT modules, freeze the rest, rebind forwards (as
functools.partial of module-level functions, which pickle: torch.save(model) / copy.deepcopy work)."""
import functools
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Dict, List, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from gist_fast import lean_block
from gist_fast.lean_block import MEMORY_MODES
from gist_fast.peft import KINDS

PEFT_KINDS = tuple(KINDS)
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
        mine = self.to_dict()
        return [f"{k}: model {mine[k]!r} vs checkpoint {saved.get(k)!r}"
                for k in ("peft", "gist", "rank", "scale", "channels") if mine[k] != saved.get(k)]

    def patch_kwargs(self) -> dict:
        """The patch() arguments that rebuild this configuration on a fresh model."""
        return dict(peft=self.peft, gist=self.gist, rank=self.rank, scale=self.scale, fused=self.fused,
                    channels=self.channels, memory=self.memory)


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


def _gist_pos_embed(self, x: Tensor) -> Tensor:
    """timm's own position embedding, then the Gist token (no position embedding, own dropout)."""
    x = type(self)._pos_embed(self, x)
    i = self.gist_fast_config.gist_index
    gist = self.gist_drop(self.gist_token.expand(x.shape[0], -1, -1).to(x.dtype))
    return torch.cat([x[:, :i], gist, x[:, i:]], dim=1)


def _gist_forward(self, x: Tensor, *args, **kwargs):
    """Eval: logits, as timm returns them. Train: GistOutput(logits, gist_logits), both through
    the final norm and the same head."""
    feats = self.forward_features(x, *args, **kwargs)
    logits = self.forward_head(feats)
    if not self.training:
        return logits
    gist = self.head(self.head_drop(self.fc_norm(feats[:, self.gist_fast_config.gist_index])))
    return GistOutput(logits, gist)


def _trainable_groups(model: nn.Module) -> Dict[str, List[nn.Parameter]]:
    cfg, kind = model.gist_fast_config, KINDS[model.gist_fast_config.peft]
    groups = {"head": list(model.get_classifier().parameters())}
    if cfg.gist:
        groups["gist"] = [model.gist_token]
    if kind.trains_norms:
        groups["layernorms"] = [p for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()]
    if kind.module:
        groups[kind.group] = [p for b in model.blocks for p in getattr(b, kind.module).parameters()]
    return groups


def parameter_summary(model: nn.Module) -> ParameterSummary:
    """Counts of trainable parameters, in all and by group (head, gist, adapters, ...)."""
    by_group = ({k: sum(p.numel() for p in ps) for k, ps in _trainable_groups(model).items()}
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
) -> nn.Module:
    """Patch a timm VisionTransformer in place for GIST / iDAT / two-stage PEFT and return it.

    peft: "adapter" (GIST's parallel adapter), "seq-adapter" (iDAT), "adaptformer", "ln" (two-stage
    stage 1), "channels" (stage 2, needs `channels`), "linear" (head only). scale=None takes the
    method's own (0.1 for adapter/adaptformer, 1 for seq-adapter). fused: "auto"/True use the fused
    ops (Triton on CUDA, C++ on CPU, the reference elsewhere), False the plain-PyTorch reference.
    Everything but the PEFT parameters, the gist token and the head is frozen.
    memory: with fused ops, the block forward/backward of gist_fast.lean_block for "adapter" and
    "adaptformer": "lean" saves the block input and the MLP pre-activation in the compute dtype,
    "min" the block input only (more recomputation), None the eager block; "auto" is "lean" on CUDA
    and None on CPU (where compute, not memory, limits a step and recomputation only costs time).
    """
    config = _configure(model, peft, gist, rank, scale, fused, channels, memory)
    like = _like(model)
    model._gist_fast_trained_before = [n for n, p in model.named_parameters() if p.requires_grad]  # for unpatch
    _freeze(model)
    model.gist_fast_config = config
    paths = _insert_and_bind(model, KINDS[peft], config, like)
    if gist:
        _add_gist_token(model, like)
    for params in _trainable_groups(model).values():
        for p in params:
            p.requires_grad_(True)
    if verbose:
        adapter = f" rank={rank} scale={config.scale}" if KINDS[peft].is_adapter else ""
        print(f"gist_fast.patch: peft={peft}{adapter} gist={gist} fused={fused} blocks={paths} | "
              f"{parameter_summary(model)}")
    return model


def _configure(model, peft, gist, rank, scale, fused, channels, memory) -> PatchConfig:
    """Check every argument against the model; the configuration patch() applies."""
    check_model(model)
    if peft not in KINDS:
        raise ValueError(f"unknown peft {peft!r}; choose one of {PEFT_KINDS}")
    kind = KINDS[peft]
    if fused not in ("auto", True, False):
        raise ValueError(f"fused must be 'auto', True or False, got {fused!r}")
    if not 1 <= rank <= 1024:
        raise ValueError(f"rank must be in [1, 1024], got {rank}")
    if gist and not kind.takes_gist:
        raise ValueError(f"peft={peft!r} cannot carry the Gist token (gist=False)")
    if gist and getattr(model, "attn_pool", None) is not None:
        raise ValueError("gist=True needs token or average pooling; "
                         "this model pools with attention (global_pool='map')")
    if memory not in MEMORY_MODES + ("auto", None):
        raise ValueError(f"memory must be one of {MEMORY_MODES + ('auto',)} or None, got {memory!r}")
    return PatchConfig(
        peft=peft, gist=gist, rank=rank, scale=float((kind.scale or 0.0) if scale is None else scale),
        fused=fused is not False, gist_index=model.num_prefix_tokens,
        channels=_normalize_channels(channels, len(model.blocks), model.embed_dim) if peft == "channels" else None,
        memory=memory if fused is not False and kind.lean else None,
    )


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
            setattr(block, kind.module, kind.make(config, model.embed_dim, i).to(**like))
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
        return lean_block.bind(block, kind, config.memory), _LEAN_PATHS[config.memory]
    if kind.forward is None:
        return None, "timm"
    return functools.partial(kind.forward, block), f"eager (not lean: {refused})" if refused else "eager"


def _add_gist_token(model: nn.Module, like: dict) -> None:
    """The Gist token after the prefix tokens (no position embedding, its own dropout) and the two-output forward."""
    model.gist_token = nn.Parameter(torch.empty(1, 1, model.embed_dim).uniform_(-0.5, 0.5).to(**like))
    model.gist_drop = nn.Dropout(0.1)
    model.num_prefix_tokens += 1  # timm's pooling then skips the gist token as it skips CLS
    if hasattr(model.patch_drop, "num_prefix_tokens"):
        model.patch_drop.num_prefix_tokens += 1
    model._pos_embed = functools.partial(_gist_pos_embed, model)
    model.forward = functools.partial(_gist_forward, model)


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
    for block in model.blocks:
        block.__dict__.pop("forward", None)  # the bound partial shadowed the class's forward
        if kind.module and hasattr(block, kind.module):
            delattr(block, kind.module)
    if model.gist_fast_config.gist:
        del model.gist_token, model.gist_drop, model._pos_embed, model.forward
        model.num_prefix_tokens -= 1
        if hasattr(model.patch_drop, "num_prefix_tokens"):
            model.patch_drop.num_prefix_tokens -= 1
    trained = set(model.__dict__.pop("_gist_fast_trained_before", dict(model.named_parameters())))
    for name, p in model.named_parameters():
        p.requires_grad_(name in trained)
    del model.gist_fast_config
    return model
