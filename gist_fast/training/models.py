"""Backbones, their patching per framework, and the optimizer/schedule of the recipe (METHODS §4)."""
import difflib
import logging
import os
from typing import List, Optional

import torch
from torch import nn

import gist_fast
from gist_fast.training.recipe import FRAMEWORKS, TrainConfig, kind_of


class _LoadReport(logging.Handler):
    """timm's loader only logs the keys a pretrained file lacked (info) or had in excess (warning);
    collect both to fail loudly instead of training on half-loaded weights."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.missing: List[str] = []
        self.unexpected: List[str] = []

    def emit(self, record):
        text = record.getMessage()  # "Missing keys (a, b) discovered while ...", "Unexpected keys (c) found ..."
        for prefix, end, keys in (("Missing keys (", ") discovered", self.missing),
                                  ("Unexpected keys (", ") found", self.unexpected)):
            if text.startswith(prefix) and end in text:
                keys += text[len(prefix):text.index(end)].split(", ")


def backbone(name: str, kwargs: dict, num_classes: int, drop_path: float, seed: int,
             pretrained: bool = False, pretrained_file: Optional[str] = None) -> nn.Module:
    """A timm model, built under its own seed so that a random backbone is the same in every
    process and in `gist-fast eval` (checkpoints hold only the trained tensors)."""
    import timm

    extra = dict(kwargs, num_classes=num_classes, drop_path_rate=drop_path)
    if pretrained_file:
        if not os.path.isfile(pretrained_file):
            raise FileNotFoundError(f"{pretrained_file}: pretrained file not found (--pretrained-file)")
        # timm's own loader (pos-embed resampling, npz conversion); num_classes=-1 drops the
        # file's head: the fine-tuning head is always new
        extra["pretrained_cfg_overlay"] = dict(file=os.path.abspath(pretrained_file),
                                               custom_load=pretrained_file.endswith(".npz"), num_classes=-1)
    logger, catcher = logging.getLogger("timm.models._builder"), _LoadReport()
    level = logger.level
    logger.addHandler(catcher)
    logger.setLevel(logging.INFO)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = timm.create_model(name, pretrained=pretrained or bool(pretrained_file), **extra)
    except Exception as e:
        if pretrained_file:  # torch lists every mismatching tensor: the first says enough
            lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
            reason = next((line for line in lines if "size mismatch" in line), lines[-1])
            raise ValueError(f"{pretrained_file}: cannot load as pretrained weights for {name} {kwargs or ''}: "
                             f"{reason}") from None
        raise
    finally:
        logger.removeHandler(catcher)
        logger.setLevel(level)
    missing = [k for k in catcher.missing if not k.startswith("head.")]
    if pretrained_file and (missing or catcher.unexpected):
        what = f"it lacks {missing[:5]}" if missing else f"it has tensors the model does not: {catcher.unexpected[:5]}"
        raise ValueError(f"{pretrained_file}: does not fit {name} {kwargs or ''}: {what}")
    return model


def peft_of(cfg: TrainConfig):
    """(the PEFT kind the student trains, whether it has the Gist token)."""
    return kind_of(cfg.framework, cfg.peft), FRAMEWORKS[cfg.framework][1]


def peft_kwargs(cfg: TrainConfig) -> dict:
    """The patch() arguments of the PEFT kind's size: rank, and prompts / alpha where the run sets them
    (None: patch()'s own default for the kind; what it chose is recorded in the model's PatchConfig)."""
    return dict(rank=cfg.rank, **{k: getattr(cfg, k) for k in ("prompts", "alpha") if getattr(cfg, k) is not None})


def fused_flag(cfg: TrainConfig):
    return {"auto": "auto", "on": True, "off": False}[cfg.fused]


def memory_mode(cfg: TrainConfig) -> Optional[str]:
    return None if cfg.memory == "none" else cfg.memory


def student(cfg: TrainConfig, num_classes: int, verbose: bool, saved: Optional[dict] = None,
            **patch_kwargs) -> nn.Module:
    """The patched student: as the framework patches it, with patch_kwargs on top (two-stage's stage 2), or as
    `saved` (a checkpoint's patch configuration) was; the run decides how it computes (fused, memory)."""
    model = backbone(cfg.model, cfg.model_kwargs, num_classes, cfg.drop_path, cfg.seed,
                     cfg.pretrained, cfg.pretrained_file)
    peft, gist = peft_of(cfg)
    kwargs = gist_fast.PatchConfig.from_dict(saved).patch_kwargs() if saved else dict(peft=peft, gist=gist,
                                                                                          **peft_kwargs(cfg))
    kwargs.update(patch_kwargs, fused=fused_flag(cfg), memory=memory_mode(cfg))
    with torch.random.fork_rng(devices=[]):  # new PEFT tensors are seeded too
        torch.manual_seed(cfg.seed)
        return gist_fast.patch(model, **kwargs, verbose=verbose)


def teacher(cfg: TrainConfig, num_classes: int, verbose: bool) -> nn.Module:
    model = backbone(cfg.teacher, cfg.teacher_kwargs, num_classes, cfg.drop_path, cfg.seed + 1,
                     cfg.pretrained, cfg.teacher_pretrained_file)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 1)
        return gist_fast.patch(model, peft=peft_of(cfg)[0], gist=False, **peft_kwargs(cfg),
                               fused=fused_flag(cfg), memory=memory_mode(cfg), verbose=verbose)


def copy_trained(src: nn.Module, dst: nn.Module) -> None:
    """Copy the tensors src trained into dst where dst trains the same names (two-stage: the
    stage-1 LayerNorms and head into the stage-2 model)."""
    mine = dict(dst.named_parameters())
    with torch.no_grad():
        for name, p in src.named_parameters():
            if p.requires_grad and name in mine and mine[name].requires_grad:
                mine[name].copy_(p)


def optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW on the trainable tensors; weight decay only where ndim >= 2 (the 1x1xD gist token too)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)


def scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig):
    """Cosine over cfg.epochs stepped per epoch, linear warm-up from warmup_lr, then min_lr for the
    cool-down epochs (timm's CosineLRScheduler, as the authors' code uses)."""
    from timm.scheduler import CosineLRScheduler

    return CosineLRScheduler(opt, t_initial=cfg.epochs, lr_min=cfg.min_lr, warmup_t=cfg.warmup_epochs,
                             warmup_lr_init=cfg.warmup_lr, cycle_limit=1)


def _meta_model(name: str, kwargs: dict, flag: str) -> nn.Module:
    """A weightless copy on the meta device; an unknown name or a bad keyword names the option."""
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name.split(".")[0], timm.list_models(), n=3)
        raise ValueError(f"{flag} {name}: not a timm model{f' (similar: {close})' if close else ''}")
    try:
        with torch.device("meta"):
            return timm.create_model(name, pretrained=False, **kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        raise ValueError(f"{flag}-kwargs {kwargs}: {name} does not take them: {e}") from e


def check(cfg: TrainConfig) -> None:
    """Refuse, before anything is loaded or written, a model patch() does not support (the same message
    as patch's) or a --channels-k the model cannot hold."""
    from gist_fast.patch import check_model

    for flag, name, kwargs in [("--model", cfg.model, cfg.model_kwargs)] + (
            [("--teacher", cfg.teacher, cfg.teacher_kwargs)] if cfg.framework == "idat" else []):
        model = _meta_model(name, kwargs, flag)
        try:
            check_model(model)
        except TypeError as e:
            raise ValueError(f"{flag} {name}: {e}") from None
        if flag == "--model" and cfg.channels_k is not None and cfg.channels_k > model.embed_dim:
            raise ValueError(f"--channels-k {cfg.channels_k}: {name} has {model.embed_dim} channels per block")


def input_size(name: str, kwargs: dict):
    """(H, W) the model takes, read from a weightless copy built on the meta device."""
    return tuple(_meta_model(name, kwargs, "--model").patch_embed.img_size)
