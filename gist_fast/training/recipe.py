"""The authors' training recipe (METHODS §4) as defaults, the per-task VTAB-1K table, and the
small-model defaults of the embedded digits run."""
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

FRAMEWORKS = ("gist", "adapter", "idat", "two-stage", "linear")
AMP_MODES = ("bf16", "fp16", "none")
FUSED_MODES = ("auto", "on", "off")

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

# The reference backbones (ImageNet-21k ViT-B/16 student, ViT-S/16 iDAT teacher)
RECIPE = dict(model="vit_base_patch16_224.orig_in21k", teacher="vit_small_patch16_224.augreg_in21k",
              epochs=100, cooldown_epochs=10, warmup_epochs=10, lr=5e-3, weight_decay=5e-5, drop_path=0.0)
# The embedded digits run: 8x8 digits upsampled to 32x32, a 4-block ViT-Tiny with 16x16 patches
# (a 2x2 grid: 5 tokens) so that the default run takes about a minute on two CPU cores.
EMBEDDED = dict(model="vit_tiny_patch16_224", model_kwargs=dict(img_size=32, patch_size=16, depth=4),
                teacher="vit_tiny_patch16_224",
                teacher_kwargs=dict(img_size=32, patch_size=16, depth=4, embed_dim=96, num_heads=3),
                epochs=8, cooldown_epochs=0, warmup_epochs=1, lr=1e-2, weight_decay=5e-5, drop_path=0.0)
# Options that only say how/where to run: a resumed run may change them, nothing else.
RUNTIME_OPTIONS = ("device", "workers", "output", "stop_after_steps", "progress", "eval_every", "memory_budget")


@dataclass
class TrainConfig:
    """Everything one training run depends on. None means "from the recipe": see resolve()."""

    framework: str = "gist"
    peft: Optional[str] = None            # override the framework's adapter kind (e.g. adaptformer)
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
    rank: int = 4                         # adapter bottleneck
    distill_kind: str = "kl"
    stage1_epochs: Optional[int] = None
    channels_k: Optional[int] = None
    amp: Optional[str] = None             # bf16 on a GPU that has it, else none
    fused: str = "auto"
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


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Fill every None: command line > per-task table > embedded-digits defaults > authors' recipe."""
    if cfg.framework not in FRAMEWORKS:
        raise ValueError(f"unknown framework {cfg.framework!r}; choose one of {FRAMEWORKS}")
    if cfg.task is not None and cfg.data is None:
        raise ValueError("--task needs --data ROOT (the VTAB-1K root holding the task folder)")
    base = dict(RECIPE if cfg.data else EMBEDDED)
    if cfg.task in TASK_HPARAMS:
        base.update(zip(("lr", "weight_decay", "drop_path"), TASK_HPARAMS[cfg.task]))
    given = {"model_kwargs": cfg.model is not None, "teacher_kwargs": cfg.teacher is not None}
    for name, value in base.items():
        if name in given:  # a named model keeps its own size unless kwargs are given
            if not given[name] and not getattr(cfg, name):
                setattr(cfg, name, dict(value))
        elif getattr(cfg, name) is None:
            setattr(cfg, name, value)
    if cfg.framework == "two-stage" and cfg.stage1_epochs is None:
        cfg.stage1_epochs = max(1, round(cfg.total_epochs / 10))
    if cfg.amp is not None and cfg.amp not in AMP_MODES:
        raise ValueError(f"--amp must be one of {AMP_MODES}, got {cfg.amp!r}")
    if cfg.fused not in FUSED_MODES:
        raise ValueError(f"--fused must be one of {FUSED_MODES}, got {cfg.fused!r}")
    if cfg.epochs < 1 or cfg.cooldown_epochs < 0 or cfg.warmup_epochs < 0 or cfg.batch_size < 1:
        raise ValueError("need epochs >= 1, cooldown/warm-up epochs >= 0 and batch size >= 1")
    return cfg


def for_resume(saved: dict, given: dict) -> TrainConfig:
    """A resumed run keeps the checkpoint's configuration; the command line may change only how and
    where it runs (RUNTIME_OPTIONS). given: the options set explicitly on the command line."""
    differ = sorted(k for k, v in given.items() if k not in RUNTIME_OPTIONS and saved.get(k) != v)
    if differ:
        raise ValueError(f"--resume continues the checkpoint's run; these options differ from it: {differ} "
                         "(drop them, or start a new run in another --output)")
    saved = dict(saved, stop_after_steps=None)  # a limit applies to the invocation that set it
    return TrainConfig(**{**saved, **{k: v for k, v in given.items() if k in RUNTIME_OPTIONS}})
