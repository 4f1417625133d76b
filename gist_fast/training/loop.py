"""One training run: epochs of the recipe, evaluation every epoch, JSON-lines log, atomic resumable
checkpoints (also written on SIGINT/SIGTERM, mid-epoch), iDAT's teacher, the two-stage switch."""
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import asdict
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

import gist_fast
from gist_fast.training import checkpoint, data, distributed, models
from gist_fast.training.recipe import TrainConfig, resolve, schedule

FORMAT = "gist_fast.train/1"
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Stopped(Exception):
    """Training stopped early (signal or --stop-after-steps) after saving a resumable checkpoint; reason
    says what happened, the message adds how to continue."""

    def __init__(self, message: str, exit_code: int, reason: str = ""):
        super().__init__(message)
        self.exit_code, self.reason = exit_code, reason or message


def default_amp(device: torch.device) -> str:
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "none"


def loader_workers(cfg: TrainConfig) -> int:
    if cfg.workers is not None:
        return cfg.workers
    return 0 if cfg.data is None else min(4, os.cpu_count() or 1)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, amp: str) -> float:
    """Top-1 accuracy of model (in eval mode: CLS logits only) over loader, summed across ranks."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.autocast(device.type, dtype=AMP_DTYPES.get(amp), enabled=amp != "none"):
        for images, target in loader:
            images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
            counts[0] += (model(images).argmax(-1) == target).sum()
            counts[1] += target.numel()
    model.train(was_training)
    correct, total = distributed.all_sum(counts).tolist()
    return 100.0 * correct / max(total, 1)


class Trainer:
    def __init__(self, cfg: TrainConfig, world: distributed.World, resume: Optional[Dict[str, Any]] = None):
        self.cfg, self.world, self.device = cfg, world, world.device
        self.amp = cfg.amp or default_amp(self.device)
        self.main = world.main
        if cfg.batch_size % world.size:
            raise ValueError(f"--batch-size {cfg.batch_size} (global) must divide by the {world.size} processes")
        self.local_batch = cfg.batch_size // world.size
        size = models.input_size(cfg.model, cfg.model_kwargs)
        self.train_set, self.test_set, self.num_classes = data.build(cfg.data, cfg.task, cfg.num_classes, size)
        if cfg.framework == "idat" and models.input_size(cfg.teacher, cfg.teacher_kwargs) != size:
            raise ValueError(f"--teacher {cfg.teacher} {cfg.teacher_kwargs}: must take the student's input size {size}")
        torch.manual_seed(cfg.seed + world.rank)  # dropout / drop-path streams; data order is seeded apart
        saved = resume["student"]["gist_fast_config"] if resume else None
        self.models: List[nn.Module] = [models.student(cfg, self.num_classes, self.main and not resume, saved)]
        if cfg.framework == "idat":
            self.models.append(models.teacher(cfg, self.num_classes, self.main and not resume))
        self._prepare()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == "fp16")
        # summed over the rows not labelled IGNORE (TrainSampler's padding): _step weights the sums
        summed = dict(ignore_index=distributed.IGNORE, reduction="sum", fused=cfg.fused != "off")
        if cfg.framework == "gist":
            self.loss_fn = gist_fast.GistLoss(kl_weight=cfg.gist_weight, temperature=cfg.gist_temperature, **summed)
        elif cfg.framework == "idat":
            self.loss_fn = gist_fast.DistillLoss(kind=cfg.distill_kind, **summed)
        self.sampler = distributed.TrainSampler(self.train_set, num_replicas=world.size, rank=world.rank,
                                                shuffle=True, seed=cfg.seed)
        self.train_loader = self._loader(distributed.Padded(self.train_set), self.sampler)
        self.test_loader = self._loader(self.test_set, distributed.EvalSampler(len(self.test_set), world))
        self.epoch, self.step_in_epoch, self.best_acc, self.partial = 0, 0, -1.0, [0.0, 0.0, 0.0]
        if resume:
            self._restore(resume)
        self.stop_signal: Optional[int] = None
        self.steps_this_run = 0
        self.micro_batch = self._fit_micro_batch() if cfg.memory_budget else self.local_batch

    def _fit_micro_batch(self) -> int:
        """The largest micro-batch of the student's step within --memory-budget (the estimate
        covers the student with its training loss; an iDAT teacher is smaller)."""
        sample = torch.stack([self.train_set[i][0] for i in range(min(4, len(self.train_set)))]).to(self.device)
        micro = gist_fast.fit_micro_batch(self.student, self.local_batch, self.cfg.memory_budget, sample,
                                          autocast_dtype=AMP_DTYPES.get(self.amp), loss_fn=self._student_loss)
        if self.main:
            print(f"--memory-budget {self.cfg.memory_budget}: micro-batches of {micro} of {self.local_batch} images "
                  "per process")
        return micro

    def _student_loss(self, out) -> torch.Tensor:
        """The student's loss on class 0 (what the budget's probes run; an iDAT student's CE)."""
        logits = out[0] if isinstance(out, gist_fast.GistOutput) else out
        return self._criterion(out, torch.zeros(len(logits), dtype=torch.long, device=logits.device))

    def _loader(self, dataset, sampler=None) -> DataLoader:
        # its own generator: starting an epoch's iterator must not draw from the global RNG, or a
        # run resumed mid-epoch would see other dropout / drop-path masks
        return DataLoader(dataset, self.local_batch, sampler=sampler, num_workers=loader_workers(self.cfg),
                          pin_memory=self.device.type == "cuda", generator=torch.Generator().manual_seed(self.cfg.seed))

    # -- models, optimizers, DDP -------------------------------------------------------------
    def _prepare(self) -> None:
        """Move the models, wrap them for DDP, and give each its own AdamW and schedule."""
        self.wrapped = []
        for m in self.models:
            m.to(self.device).train()
            if self.world.size > 1:
                ids = [self.device.index] if self.device.type == "cuda" else None
                m = DistributedDataParallel(m, device_ids=ids)
            self.wrapped.append(m)
        self.optimizers = [models.optimizer(m, self.cfg) for m in self.models]
        self.schedulers = [models.scheduler(o, self.cfg) for o in self.optimizers]

    @property
    def student(self) -> nn.Module:
        return self.models[0]

    def _stage_two(self) -> None:
        """Two-stage: Taylor scores of the LN-tuned model, a fresh model with channel linears on the
        top-K channels, the stage-1 LayerNorms and head copied in, new optimizer and schedule."""
        stage1 = self.student
        loader = self._loader(self.train_set)
        scores = gist_fast.taylor_importance(stage1, loader, self.device)  # every rank: the same full pass
        k = self.cfg.channels_k or max(1, stage1.embed_dim // 8)
        channels = gist_fast.select_channels(scores, k).tolist()
        stage2 = models.student(self.cfg, self.num_classes, self.main, peft="channels", gist=False, channels=channels)
        stage2.to(self.device)
        models.copy_trained(stage1, stage2)
        self.models[0] = stage2
        self._prepare()
        self._log({"event": "stage2", "epoch": self.epoch, "channels_k": k, "channels": channels})

    # -- checkpoints --------------------------------------------------------------------------
    def _state(self) -> Dict[str, Any]:
        return {
            "format": FORMAT, "config": asdict(self.cfg), "epoch": self.epoch, "step": self.step_in_epoch,
            "best_acc": self.best_acc,
            "student": gist_fast.trainable_state_dict(self.student),
            "teacher": gist_fast.trainable_state_dict(self.models[1]) if len(self.models) > 1 else None,
            "optimizers": [o.state_dict() for o in self.optimizers],
            "schedulers": [s.state_dict() for s in self.schedulers],
            "scaler": self.scaler.state_dict(),
            # every rank's own RNG streams and partial epoch sums
            "per_rank": distributed.gather({"rng": checkpoint.rng_state(), "partial": list(self.partial)}),
        }

    def _restore(self, ckpt: Dict[str, Any]) -> None:
        gist_fast.load_trainable_state_dict(self.student, ckpt["student"])
        if ckpt.get("teacher") is not None:
            gist_fast.load_trainable_state_dict(self.models[1], ckpt["teacher"])
        for o, s in zip(self.optimizers, ckpt["optimizers"]):
            o.load_state_dict(s)
        for sch, s in zip(self.schedulers, ckpt["schedulers"]):
            sch.load_state_dict(s)
        self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.step_in_epoch = ckpt["epoch"], ckpt["step"]
        self.best_acc = ckpt["best_acc"]
        if len(ckpt["per_rank"]) != self.world.size:
            raise ValueError(f"the checkpoint was written by {len(ckpt['per_rank'])} processes; resume it with as many "
                             f"(not {self.world.size}) to continue exactly")
        mine = ckpt["per_rank"][self.world.rank]
        self.partial = list(mine["partial"])
        checkpoint.set_rng_state(mine["rng"])

    def _save(self, name: str, state: Dict[str, Any]) -> None:
        if self.main:
            checkpoint.atomic_save(state, os.path.join(self.cfg.output, name))
        distributed.barrier()

    def _log(self, record: Dict[str, Any], mode: str = "a") -> None:
        if self.main:
            os.makedirs(self.cfg.output, exist_ok=True)
            with open(os.path.join(self.cfg.output, "log.jsonl"), mode) as f:
                f.write(json.dumps(record) + "\n")

    # -- the loop -----------------------------------------------------------------------------
    def _criterion(self, out, target: torch.Tensor, teacher: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The framework's loss of a student output (and an iDAT teacher's logits), summed over the
        rows not labelled IGNORE."""
        logits = out[0] if isinstance(out, gist_fast.GistOutput) else out
        if teacher is not None:
            return self.loss_fn(logits.float(), teacher.float(), target)
        if self.cfg.framework == "gist":
            return self.loss_fn(gist_fast.GistOutput(out[0].float(), out[1].float()), target)
        return F.cross_entropy(logits.float(), target, ignore_index=distributed.IGNORE, reduction="sum")

    def _loss(self, images: torch.Tensor, target: torch.Tensor):
        """The summed loss (_criterion) and how many rows are right: _step weights the sum by the
        global batch's row count."""
        with torch.autocast(self.device.type, dtype=AMP_DTYPES.get(self.amp), enabled=self.amp != "none"):
            out = self.wrapped[0](images)
            teacher = self.wrapped[1](images) if self.cfg.framework == "idat" else None
            loss = self._criterion(out, target, teacher)
        logits = out[0] if isinstance(out, gist_fast.GistOutput) else out
        return loss, (logits.detach().argmax(-1) == target).sum()

    def _step(self, images: torch.Tensor, target: torch.Tensor, rows: int):
        """One optimizer step on this rank's share of a global batch of `rows` real samples; returns
        the summed loss and correct count of its own real rows. DDP averages the ranks' gradients,
        so the summed losses are divided by rows / world: the update is the global batch's mean,
        with padded rows and micro-batches of any size weighted right."""
        for o in self.optimizers:
            o.zero_grad(set_to_none=True)
        correct = []

        def loss_sum(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            loss, right = self._loss(x, t)
            correct.append(right)
            return loss

        # DDP reduces each micro-batch's gradients: correct, not fastest
        total = gist_fast.memory.backward_in_parts(loss_sum, images, target, self.micro_batch, rows / self.world.size,
                                                   self.scaler)
        for o in self.optimizers:
            self.scaler.step(o)
        self.scaler.update()
        return total, sum(correct)

    def _should_stop(self) -> bool:
        limit = self.cfg.stop_after_steps
        stop = torch.tensor(float(self.stop_signal is not None or (limit is not None and self.steps_this_run >= limit)),
                            device=self.device)  # NCCL reduces device tensors only
        return bool(distributed.all_sum(stop).item())  # every rank stops at the same step

    def _train_epoch(self) -> Dict[str, float]:
        steps = -(-self.sampler.num_samples // self.local_batch)
        self.sampler.set_epoch(self.epoch)
        self.sampler.skip = self.step_in_epoch * self.local_batch
        sums = torch.tensor(self.partial, dtype=torch.float64, device=self.device)  # summed loss, correct, n
        bar = tqdm(total=steps, initial=self.step_in_epoch, desc=f"epoch {self.epoch + 1}/{self.cfg.total_epochs}",
                   disable=not (self.main and self.cfg.progress), leave=False, dynamic_ncols=True, mininterval=0.5)
        start, seen = time.perf_counter(), 0
        for images, target in self.train_loader:
            images, target = images.to(self.device, non_blocking=True), target.to(self.device, non_blocking=True)
            rows = distributed.global_rows(len(self.train_set), self.cfg.batch_size, self.step_in_epoch)
            loss, correct = self._step(images, target, rows)
            n = (target != distributed.IGNORE).sum()  # padded rows count nowhere
            sums += torch.stack([loss.double(), correct.double(), n.double()])
            self.step_in_epoch += 1
            self.steps_this_run += 1
            seen += rows
            if bar.disable is False:
                bar.update()
                bar.set_postfix(loss=f"{sums[0].item() / sums[2].item():.4f}",
                                acc=f"{100 * sums[1].item() / sums[2].item():.1f}",
                                img_s=f"{seen / (time.perf_counter() - start):.0f}", refresh=False)
            if self.step_in_epoch < steps and self._should_stop():
                self.partial = sums.tolist()
                bar.close()
                return {}
        bar.close()
        sums = distributed.all_sum(sums)
        self.partial = [0.0, 0.0, 0.0]
        return {"train_loss": sums[0].item() / sums[2].item(), "train_acc": 100 * sums[1].item() / sums[2].item(),
                "images_per_s": seen / (time.perf_counter() - start)}

    def _finite(self) -> bool:
        return all(bool(p.isfinite().all()) for m in self.models for p in m.parameters() if p.requires_grad)

    def _stop(self) -> None:
        """Save a resumable checkpoint and leave through Stopped."""
        self._save("last.pt", self._state())
        path = os.path.join(self.cfg.output, "last.pt")
        if self.stop_signal is not None:
            reason = (f"{signal.Signals(self.stop_signal).name}: saved a resumable checkpoint to {path} "
                      f"(epoch {self.epoch + 1}, step {self.step_in_epoch})")
            code = 128 + self.stop_signal
        else:
            reason, code = f"stopped after {self.steps_this_run} steps: saved {path}", 0
        raise Stopped(f"{reason}; continue with --resume {path}", code, reason)

    def run(self) -> Dict[str, Any]:
        cfg, started = self.cfg, time.perf_counter()
        if self.main and self.epoch == 0 and self.step_in_epoch == 0:
            self._log({"event": "start", "config": asdict(cfg), "world_size": self.world.size,
                       "train_images": len(self.train_set), "test_images": len(self.test_set),
                       "trainable": gist_fast.parameter_summary(self.student).trainable}, mode="w")  # a new run
        last_acc = None
        with _stop_on_signals(self):
            while self.epoch < cfg.total_epochs:
                if (cfg.framework == "two-stage" and self.epoch >= cfg.stage1_epochs
                        and self.student.gist_fast_config.peft == "ln"):
                    self._stage_two()
                for s in self.schedulers:
                    s.step(self.epoch)
                stats = self._train_epoch()
                if not stats:
                    self._stop()
                finite = self._finite()
                if not (math.isfinite(stats["train_loss"]) and finite):  # unsaved: last.pt keeps the epoch before
                    raise ValueError(f"training diverged in epoch {self.epoch + 1}: the train loss is "
                                     f"{stats['train_loss']:.4g}, the weights {'' if finite else 'not '}finite; "
                                     f"lower --lr (this run's {cfg.lr:g})")
                record = {"epoch": self.epoch + 1, "lr": self.optimizers[0].param_groups[0]["lr"], **stats}
                final = self.epoch + 1 == cfg.total_epochs
                if final or (self.epoch + 1) % cfg.eval_every == 0:
                    last_acc = evaluate(self.student, self.test_loader, self.device, self.amp)
                    record["test_acc"] = last_acc
                    if last_acc > self.best_acc:
                        self.best_acc = last_acc
                        best = gist_fast.trainable_state_dict(self.student)
                        self._save("best.pt", {"format": FORMAT, "config": asdict(cfg), "epoch": self.epoch + 1,
                                               "acc": last_acc, "student": best})
                record["best_acc"] = self.best_acc
                self.epoch, self.step_in_epoch = self.epoch + 1, 0
                self._log(record)
                if self.main:
                    shown = {k: f"{v:.4g}" if k in ("lr", "train_loss") else f"{v:.2f}" if isinstance(v, float) else v
                             for k, v in record.items()}
                    tqdm.write("  ".join(f"{k} {v}" for k, v in shown.items()))
                if not final and self._should_stop():
                    self._stop()
                self._save("last.pt", self._state())
        if last_acc is None:  # resumed a finished run
            last_acc = evaluate(self.student, self.test_loader, self.device, self.amp)
        result = {"task": cfg.task or (cfg.data and os.path.basename(os.path.normpath(cfg.data))) or "digits",
                  "framework": cfg.framework, "best_acc": self.best_acc, "last_acc": last_acc,
                  "epochs": cfg.total_epochs, "trainable": gist_fast.parameter_summary(self.student).trainable,
                  "wall_s": time.perf_counter() - started}
        self._log({"event": "done", **result})
        if self.main:
            with open(os.path.join(cfg.output, "result.json"), "w") as f:  # with what produced it (vtab compares)
                json.dump({**result, "config": asdict(cfg)}, f, indent=1)
        return result


class _stop_on_signals:
    """SIGINT / SIGTERM ask the loop to save and stop at the next step; a second one aborts."""

    def __init__(self, trainer: Trainer):
        self.trainer, self.previous, self.pid = trainer, {}, os.getpid()

    def _handle(self, signum, frame):
        if os.getpid() != self.pid:  # a forked data-loader worker inherited the handler: the trainer's own answers
            return
        if self.trainer.stop_signal is not None:
            raise KeyboardInterrupt
        self.trainer.stop_signal = signum
        if self.trainer.main:
            print(f"\n{signal.Signals(signum).name}: saving last.pt after this step (again: stop without saving; "
                  "the last saved last.pt stays)", file=sys.stderr, flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self.previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def _announce(cfg: TrainConfig) -> None:
    """What a user should know before a run starts: the schedule, and a backbone left random."""
    print(schedule(cfg), flush=True)
    if cfg.data is not None and not (cfg.pretrained or cfg.pretrained_file):
        print(f"gist-fast: warning: no --pretrained or --pretrained-file: {cfg.model} starts from random weights "
              "and stays frozen (only the PEFT tensors and the head train)", file=sys.stderr)


def train(cfg: TrainConfig, resume: Optional[str] = None, overwrite: bool = False) -> Dict[str, Any]:
    """Train as configured (resume: a last.pt to continue from; overwrite: start afresh in an --output that
    holds an earlier run, which is refused otherwise); returns best/last accuracy."""
    ckpt = checkpoint.load(resume, resumable=True) if resume else None
    cfg = resolve(cfg)
    models.check(cfg)
    continues = resume and os.path.abspath(cfg.output) == os.path.dirname(os.path.abspath(resume))
    earlier = [] if continues else checkpoint.earlier_run(cfg.output)  # a resumed run may not write over another
    if earlier and not overwrite:
        raise ValueError(f"--output {cfg.output} holds an earlier run ({', '.join(earlier)}): continue it with "
                         f"--resume {os.path.join(cfg.output, 'last.pt')}, choose another --output, "
                         "or pass --overwrite")
    world = distributed.setup(cfg.device)
    trainer = Trainer(cfg, world, ckpt)  # checks the data before anything of the earlier run is removed
    if world.main:
        _announce(cfg)
        if earlier:
            checkpoint.clear_run(cfg.output)
    return trainer.run()


def evaluate_checkpoint(path: str, split: Optional[str] = None, **overrides) -> Dict[str, Any]:
    """Accuracy of a checkpoint's student on its evaluation set (or split: a VTAB list name such as
    'val200', an ImageFolder sub-folder, or 'train'); "split" in the result names what was evaluated."""
    ckpt = checkpoint.load(path)
    cfg = resolve(TrainConfig(**{**ckpt["config"], **{k: v for k, v in overrides.items() if v is not None}}))
    world = distributed.setup(cfg.device)
    size = models.input_size(cfg.model, cfg.model_kwargs)
    other = None if split in (None, "train") else split
    train_set, test_set, num_classes = data.build(cfg.data, cfg.task, cfg.num_classes, size, other)
    model = models.student(cfg, num_classes, False, ckpt["student"]["gist_fast_config"])
    gist_fast.load_trainable_state_dict(model, ckpt["student"])
    dataset = train_set if split == "train" else test_set
    loader = DataLoader(dataset, cfg.batch_size // world.size, num_workers=loader_workers(cfg),
                        sampler=distributed.EvalSampler(len(dataset), world))
    acc = evaluate(model.to(world.device), loader, world.device, cfg.amp or default_amp(world.device))
    return {"checkpoint": path, "split": dataset.split, "images": len(dataset), "acc": acc}
