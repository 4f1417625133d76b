"""The authors' training recipe (METHODS §4) as defaults, the per-task VTAB-1K table, and the
small-model defaults of the embedded digits run."""
import math
import os
from dataclasses import MISSING, dataclass, field, fields
from typing import Dict, Optional, Sequence, Tuple

import torch

from gist_fast.peft import KINDS, TUNABLE

# framework -> (the PEFT kind it trains, whether the student has a Gist token)
FRAMEWORKS = {"gist": ("adapter", True), "adapter": ("adapter", False), "idat": ("seq-adapter", False),
              "two-stage": ("ln", False), "linear": ("linear", False)}
AMP_MODES = ("bf16", "fp16", "none")
FUSED_MODES = ("auto", "on", "off")
MEMORY_MODES = ("auto", "lean", "min", "none")  # patch(memory=): "none" is None, the eager block

# METHODS §5: task folder -> class count, in the three groups whose means are reported
VTAB_GROUPS: Dict[str, Tuple[str, ...]] = {
    "natural": ("cifar", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397"),
    "specialized": ("patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy"),
    "structured": ("clevr_count", "clevr_dist", "dmlab", "kitti", "dsprites_loc", "dsprites_ori",
                   "smallnorb_azi", "smallnorb_ele"),
}
VTAB_CLASSES = {
    "caltech101": 102, "cifar": 100, "clevr_count": 8, "clevr_dist": 6, "diabetic_retinopathy": 5, "dmlab": 6,
    "dsprites_loc": 16, "dsprites_ori": 16, "dtd": 47, "eurosat": 10, "oxford_flowers102": 102, "kitti": 4,
    "patch_camelyon": 2, "oxford_iiit_pet": 37, "resisc45": 45, "smallnorb_azi": 18, "smallnorb_ele": 9,
    "sun397": 397, "svhn": 10,
}
VTAB_TASKS = tuple(t for group in VTAB_GROUPS.values() for t in group)

# METHODS §4: task -> (lr, weight decay, drop-path rate)
TASK_HPARAMS = {
    "cifar": (5e-3, 5e-5, 0.0), "caltech101": (1e-3, 5e-2, 0.1), "dtd": (5e-3, 5e-5, 0.0),
    "oxford_flowers102": (5e-3, 5e-5, 0.0), "oxford_iiit_pet": (5e-3, 5e-5, 0.0), "svhn": (1e-2, 5e-5, 0.0),
    "sun397": (5e-3, 5e-5, 0.0), "patch_camelyon": (5e-3, 5e-5, 0.0), "eurosat": (3e-3, 5e-2, 0.2),
    "resisc45": (2e-3, 5e-5, 0.1), "diabetic_retinopathy": (5e-3, 5e-5, 0.2), "clevr_count": (2e-3, 5e-2, 0.1),
    "clevr_dist": (5e-2, 5e-2, 0.1), "dmlab": (5e-3, 5e-5, 0.1), "kitti": (1e-2, 5e-5, 0.0),
    "dsprites_loc": (1e-2, 5e-5, 0.0), "dsprites_ori": (5e-3, 5e-5, 0.2), "smallnorb_azi": (2e-2, 5e-5, 0.1),
    "smallnorb_ele": (5e-3, 5e-2, 0.2),
}

# The reference backbones: ImageNet-21k ViT-B/16 students and a ViT-S/16 iDAT teacher. GIST's and iDAT's code
# (timm 0.6.13's vit_base_patch16_224_in21k) loads the AugReg weights; the two-stage reconstruction follows the
# same authors' SCT code, which loads the original ones.
STUDENT_MODELS = {"gist": "vit_base_patch16_224.augreg_in21k", "adapter": "vit_base_patch16_224.augreg_in21k",
                  "idat": "vit_base_patch16_224.augreg_in21k", "linear": "vit_base_patch16_224.augreg_in21k",
                  "two-stage": "vit_base_patch16_224.orig_in21k"}
RECIPE = dict(teacher="vit_small_patch16_224.augreg_in21k",
              epochs=100, cooldown_epochs=10, warmup_epochs=10, lr=5e-3, weight_decay=5e-5, drop_path=0.0)
# The embedded digits run: 8x8 digits upsampled to 32x32, a 4-block ViT-Tiny with 16x16 patches
# (a 2x2 grid: 5 tokens) so that the default run takes about 10 s on two CPU cores.
EMBEDDED = dict(model="vit_tiny_patch16_224", model_kwargs=dict(img_size=32, patch_size=16, depth=4),
                teacher="vit_tiny_patch16_224",
                teacher_kwargs=dict(img_size=32, patch_size=16, depth=4, embed_dim=96, num_heads=3),
                epochs=8, cooldown_epochs=0, warmup_epochs=1, lr=1e-2, weight_decay=5e-5, drop_path=0.0)
# Options that only say how/where to run: a resumed run may change them, nothing else.
RUNTIME_OPTIONS = ("device", "workers", "output", "stop_after_steps", "progress", "eval_every", "memory_budget",
                   "memory")
# Options that only apply to some frameworks: naming one for another framework is a mistake, not a no-op.
PEFT_FRAMEWORKS = ("gist", "adapter", "idat")  # those that take --peft (any kind of gist_fast.peft.TUNABLE)
GIST_FRAMEWORKS = tuple(f for f, (_, gist) in FRAMEWORKS.items() if gist)  # those with the Gist token and GistLoss
FRAMEWORK_OPTIONS = {"peft": PEFT_FRAMEWORKS, "rank": PEFT_FRAMEWORKS, "prompts": PEFT_FRAMEWORKS,
                     "alpha": PEFT_FRAMEWORKS, "gist_temperature": GIST_FRAMEWORKS, "gist_weight": GIST_FRAMEWORKS,
                     "teacher": ("idat",), "teacher_kwargs": ("idat",), "teacher_pretrained_file": ("idat",),
                     "distill_kind": ("idat",), "stage1_epochs": ("two-stage",), "channels_k": ("two-stage",)}
# Options that only apply to some PEFT kinds (of the frameworks above): likewise refused for another kind. Read
# from the registry: the adapters' bottleneck and the LoRA kinds' rank; the kinds with a default prompt count, alpha.
KIND_OPTIONS = {"rank": tuple(k for k in TUNABLE if KINDS[k].is_adapter or KINDS[k].alpha is not None),
                "prompts": tuple(k for k in TUNABLE if KINDS[k].prompts is not None),
                "alpha": tuple(k for k in TUNABLE if KINDS[k].alpha is not None)}
PATH_OPTIONS = ("data", "pretrained_file", "teacher_pretrained_file")  # recorded absolute: resumable from anywhere


@dataclass
class TrainConfig:
    """Everything one training run depends on. None means "from the recipe": see resolve()."""

    framework: str = "gist"
    peft: Optional[str] = None            # override the framework's PEFT kind (gist_fast.peft.TUNABLE)
    model: Optional[str] = None
    model_kwargs: dict = field(default_factory=dict)
    pretrained: bool = False
    pretrained_file: Optional[str] = None
    teacher: Optional[str] = None
    teacher_kwargs: dict = field(default_factory=dict)
    teacher_pretrained_file: Optional[str] = None
    data: Optional[str] = None            # VTAB root (with task), an ImageFolder tree, or None: digits
    task: Optional[str] = None
    num_classes: Optional[int] = None
    epochs: Optional[int] = None          # cosine length; cool-down epochs at min_lr follow
    cooldown_epochs: Optional[int] = None
    warmup_epochs: Optional[int] = None
    warmup_lr: float = 1e-7
    min_lr: float = 1e-8
    lr: Optional[float] = None
    weight_decay: Optional[float] = None
    drop_path: Optional[float] = None
    batch_size: int = 64                  # global: split across DDP ranks
    seed: int = 42
    rank: int = 4                         # adapter bottleneck, LoRA rank
    prompts: Optional[int] = None         # vpt's prompt count; None: patch()'s default (KIND_OPTIONS: vpt only)
    alpha: Optional[float] = None         # the LoRA kinds' alpha; None: patch()'s default for the kind
    gist_temperature: float = 3.0         # GistLoss temperature T (the GIST code's; METHODS §1, §6)
    gist_weight: float = 0.75             # GistLoss kl_weight: λ, the weight of each of the two KL terms
    distill_kind: str = "kl"
    stage1_epochs: Optional[int] = None
    channels_k: Optional[int] = None
    amp: Optional[str] = None             # bf16 on a GPU that has it, else none
    fused: str = "auto"
    memory: str = "auto"                  # the block's memory mode (patch(memory=)); how, not what, is computed
    device: Optional[str] = None
    workers: Optional[int] = None
    eval_every: int = 1
    output: str = "runs/train"
    stop_after_steps: Optional[int] = None  # stop (resumably) after this many steps in this invocation
    memory_budget: Optional[str] = None   # e.g. "16GiB": backward in micro-batches that fit, same update
    progress: bool = True

    @property
    def total_epochs(self) -> int:
        return self.epochs + self.cooldown_epochs


def option(name: str) -> str:
    """The command-line spelling of a TrainConfig field, for error messages."""
    return "--" + name.replace("_", "-")


def kind_of(framework: str, peft: Optional[str]) -> str:
    """The PEFT kind a framework trains: its own, or --peft where it takes one."""
    return peft if peft and framework in PEFT_FRAMEWORKS else FRAMEWORKS[framework][0]


def check_framework_options(framework: str, given: dict, kinds: Optional[Sequence[str]] = None) -> None:
    """Refuse options the framework does not use, then options that none of the PEFT kinds it trains uses
    (given: the options set on the command line; kinds: a sweep's --peft list, else --peft or the
    framework's own kind)."""
    wrong = [option(k) for k in given if framework not in FRAMEWORK_OPTIONS.get(k, (framework,))]
    if wrong:
        uses = "; ".join(f"{option(k)}: {'/'.join(FRAMEWORK_OPTIONS[k])}" for k in given if option(k) in wrong)
        raise ValueError(f"--framework {framework} does not use {', '.join(wrong)} ({uses})")
    named = bool(kinds or given.get("peft"))
    kinds = list(kinds or [kind_of(framework, given.get("peft"))])
    wrong = [option(k) for k in given if k in KIND_OPTIONS and not set(kinds) & set(KIND_OPTIONS[k])]
    if wrong:
        uses = "; ".join(f"{option(k)}: --peft {'/'.join(KIND_OPTIONS[k])}" for k in given if option(k) in wrong)
        which = f"--peft {','.join(kinds)}" if named else f"--framework {framework} (--peft {kinds[0]})"
        raise ValueError(f"{which} does not use {', '.join(wrong)} ({uses})")


# field -> (test, what it accepts): the numeric options a run checks before it starts
_AT_LEAST = {"epochs": 1, "cooldown_epochs": 0, "warmup_epochs": 0, "warmup_lr": 0, "min_lr": 0, "weight_decay": 0,
             "batch_size": 1, "stage1_epochs": 1, "channels_k": 1, "num_classes": 2, "workers": 0, "eval_every": 1,
             "stop_after_steps": 1, "prompts": 1, "gist_weight": 0}
_RANGES = {**{k: (lambda v, low=low: v >= low, f">= {low}") for k, low in _AT_LEAST.items()},
           "lr": (lambda v: v > 0, "> 0"), "drop_path": (lambda v: 0 <= v < 1, "in [0, 1)"),
           "rank": (lambda v: 1 <= v <= 1024, "in [1, 1024]"), "alpha": (lambda v: v > 0, "> 0"),
           "gist_temperature": (lambda v: v > 0, "> 0")}


def _check_values(cfg: TrainConfig) -> None:
    for name, (ok, accepted) in _RANGES.items():
        value = getattr(cfg, name)
        if value is not None and not (math.isfinite(value) and ok(value)):
            raise ValueError(f"{option(name)} {value}: must be {accepted}")
    if cfg.peft is not None and cfg.peft not in TUNABLE:
        raise ValueError(f"--peft {cfg.peft!r}: choose one of {', '.join(TUNABLE)}")
    kind = kind_of(cfg.framework, cfg.peft)
    for name in ("prompts", "alpha"):  # None: the kind's default; set, only for a kind that uses it
        if getattr(cfg, name) is not None and kind not in KIND_OPTIONS[name]:
            raise ValueError(f"{option(name)} {getattr(cfg, name)}: only --peft {'/'.join(KIND_OPTIONS[name])} "
                             f"uses it (this run trains {kind})")
    if cfg.min_lr > cfg.lr or cfg.warmup_lr > cfg.lr:
        raise ValueError(f"--min-lr {cfg.min_lr:g} and --warmup-lr {cfg.warmup_lr:g} must not exceed --lr {cfg.lr:g}")
    given = cfg.model_kwargs.keys() | cfg.teacher_kwargs.keys()
    reserved = sorted({"num_classes", "drop_path_rate", "pretrained"} & given)
    if reserved:
        raise ValueError(f"--model-kwargs / --teacher-kwargs {', '.join(reserved)}: set by --num-classes, --drop-path "
                         "and --pretrained instead")
    if cfg.task in VTAB_CLASSES and cfg.num_classes not in (None, VTAB_CLASSES[cfg.task]):
        raise ValueError(f"--num-classes {cfg.num_classes}: the VTAB-1K task {cfg.task} has {VTAB_CLASSES[cfg.task]}")
    for name, choices in (("amp", AMP_MODES), ("fused", FUSED_MODES), ("memory", MEMORY_MODES)):
        if getattr(cfg, name) not in choices + ((None,) if name == "amp" else ()):
            raise ValueError(f"{option(name)} {getattr(cfg, name)!r}: choose one of {', '.join(choices)}")
    if cfg.framework == "two-stage" and cfg.stage1_epochs >= cfg.total_epochs:
        raise ValueError(f"--stage1-epochs {cfg.stage1_epochs}: two-stage needs epochs left for stage 2 "
                         f"(the run has {cfg.total_epochs})")
    if cfg.device is not None:
        try:
            device = torch.device(cfg.device)
        except RuntimeError:
            device = None
        if device is None or device.type not in ("cpu", "cuda"):
            raise ValueError(f"--device {cfg.device!r}: expected cpu, cuda or cuda:N")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"--device {cfg.device}: {torch.cuda.device_count()} CUDA devices are visible here")
    if cfg.pretrained and cfg.pretrained_file:
        raise ValueError("--pretrained and --pretrained-file: give one (timm's download, or a local file)")


def absolute_paths(options: dict) -> dict:
    """The path options made absolute: a recorded run can be resumed or evaluated from another folder."""
    return {k: os.path.abspath(v) if k in PATH_OPTIONS and v else v for k, v in options.items()}


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Fill every None: command line > per-task table > embedded-digits defaults > authors' recipe; then
    check every value (an error names the option and what it accepts)."""
    if cfg.framework not in FRAMEWORKS:
        raise ValueError(f"--framework {cfg.framework!r}: choose one of {', '.join(FRAMEWORKS)}")
    if cfg.task is not None and cfg.data is None:
        raise ValueError("--task needs --data ROOT (the VTAB-1K root holding the task folder)")
    base = dict(RECIPE, model=STUDENT_MODELS[cfg.framework]) if cfg.data else dict(EMBEDDED)
    if cfg.task in TASK_HPARAMS:
        base.update(zip(("lr", "weight_decay", "drop_path"), TASK_HPARAMS[cfg.task]))
    given = {"model_kwargs": cfg.model is not None, "teacher_kwargs": cfg.teacher is not None}
    for name, value in base.items():
        if name in given:  # a named model keeps its own size unless kwargs are given
            if not given[name] and not getattr(cfg, name):
                setattr(cfg, name, dict(value))
        elif getattr(cfg, name) is None:
            setattr(cfg, name, value)
    for name, value in absolute_paths({k: getattr(cfg, k) for k in PATH_OPTIONS}).items():
        setattr(cfg, name, value)
    if cfg.framework == "two-stage" and cfg.stage1_epochs is None:
        cfg.stage1_epochs = max(1, round(cfg.total_epochs / 10))
    _check_values(cfg)
    return cfg


def schedule(cfg: TrainConfig) -> str:
    """The learning-rate schedule in words (timm's CosineLRScheduler: the warm-up epochs are the first epochs of
    the cosine), printed when a run starts, with a warning when the warm-up outlasts the cosine."""
    warmup = f", the first {cfg.warmup_epochs} a linear warm-up from {cfg.warmup_lr:g}" if cfg.warmup_epochs else ""
    cooldown = f", then {cfg.cooldown_epochs} cool-down epochs at {cfg.min_lr:g}" if cfg.cooldown_epochs else ""
    text = (f"schedule: {cfg.total_epochs} epochs: {cfg.epochs} of cosine decay {cfg.lr:g} -> {cfg.min_lr:g}"
            f"{warmup}{cooldown}")
    if cfg.warmup_epochs >= cfg.epochs:
        text += (f"\nwarning: the {cfg.warmup_epochs}-epoch warm-up is not shorter than the {cfg.epochs}-epoch cosine "
                 "(--epochs): the learning rate rises through the warm-up and never reaches --lr "
                 "(lower --warmup-epochs)")
    return text


def with_defaults(config: dict) -> dict:
    """A recorded configuration (a checkpoint's, a result.json's) with the fields it predates at their defaults:
    the run that wrote it ran with those (e.g. --gist-temperature 3 before the option existed)."""
    return {**{f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}, **config}


def for_resume(saved: dict, given: dict, folder: str) -> TrainConfig:
    """A resumed run keeps the checkpoint's configuration; the command line may change only how and
    where it runs (RUNTIME_OPTIONS). given: the options set explicitly on the command line; folder: the
    checkpoint's, where the run goes on writing unless --output says otherwise."""
    given, saved = absolute_paths(given), with_defaults(saved)
    differ = sorted(option(k) for k, v in given.items() if k not in RUNTIME_OPTIONS and saved.get(k) != v)
    if differ:
        raise ValueError(f"--resume continues the checkpoint's run; these options differ from it: {', '.join(differ)} "
                         "(drop them, or start a new run in another --output)")
    runtime = {"output": folder, **{k: v for k, v in given.items() if k in RUNTIME_OPTIONS}}
    return TrainConfig(**{**saved, "stop_after_steps": None, **runtime})  # a step limit binds only its own call
