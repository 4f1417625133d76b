"""Saved-activation accounting and gradient accumulation for large batches on little memory.

    report = gist_fast.activation_bytes(model, images[:8], autocast_dtype=torch.bfloat16)
    report.per_image                     # bytes autograd keeps per image between forward and backward
    micro = gist_fast.fit_micro_batch(model, 64, 16 * 2**30, images[:4], autocast_dtype=torch.bfloat16)
    loss = gist_fast.accumulate_backward(model, gist_fast.GistLoss(), images, target, micro)
    optimizer.step()                     # the same update as one backward over the whole batch

A training CLI offering `--memory-budget` calls fit_micro_batch once, then accumulate_backward
every step in place of `loss_fn(model(images), target).backward()`.
"""
import contextlib
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch
from torch import Tensor, nn


@dataclass
class ActivationReport:
    """Bytes autograd saves for backward. per_image: the slope over the batch; fixed: what does
    not grow with the batch (e.g. low-precision copies of weights kept for backward)."""

    per_image: float
    fixed: float
    total: int
    batch: int
    by_module: Dict[str, float] = field(default_factory=dict)  # per-image bytes by top-level module

    @property
    def per_image_mb(self) -> float:
        return self.per_image / 2**20

    def __str__(self) -> str:
        parts = ", ".join(f"{k} {v / 2**20:.2f}" for k, v in self.by_module.items())
        return f"saved activations: {self.per_image_mb:.2f} MB/image + {self.fixed / 2**20:.2f} MB fixed ({parts})"


def _default_loss(output, batch: int) -> Tensor:
    target = torch.zeros(batch, dtype=torch.long, device=(output[0] if isinstance(output, tuple) else output).device)
    if isinstance(output, tuple):
        from gist_fast.ops import losses

        return losses.gist_loss(output[0], output[1], target, fused=False)
    return nn.functional.cross_entropy(output.float(), target)


@contextlib.contextmanager
def _reentrant_checkpoints():
    """timm's non-reentrant checkpoints hide what they keep from outer saved-tensor hooks; the
    re-entrant ones save their inputs through save_for_backward, where the hooks count them."""
    try:
        from timm.layers import set_reentrant_ckpt, use_reentrant_ckpt
    except ImportError:
        yield
        return
    previous = use_reentrant_ckpt()
    set_reentrant_ckpt(True)
    try:
        yield
    finally:
        set_reentrant_ckpt(previous)


def _count(model: nn.Module, images: Tensor, loss_fn, autocast_dtype) -> Dict[str, int]:
    skip = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen: Dict[int, int] = {}
    by_module: Dict[str, int] = {}
    where = ["other"]
    handles = []
    for name, child in model.named_children():
        def enter(_m, _args, name=name):
            where.append(name)

        def leave(_m, _args, _out):
            where.pop()

        handles += [child.register_forward_pre_hook(enter), child.register_forward_hook(leave)]

    def pack(t: Tensor):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in skip and key not in seen and storage.nbytes() > 0:
            seen[key] = storage.nbytes()
            by_module[where[-1]] = by_module.get(where[-1], 0) + storage.nbytes()
        return t

    amp = torch.autocast(images.device.type, autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    try:
        with _reentrant_checkpoints(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), amp:
            output = model(images)
            if loss_fn is None:
                _default_loss(output, images.shape[0])
            else:
                loss_fn(output)
    finally:
        for h in handles:
            h.remove()
    by_module["total"] = sum(seen.values())
    return by_module


def activation_bytes(model: nn.Module, images: Tensor, loss_fn: Optional[Callable] = None,
                     autocast_dtype: Optional[torch.dtype] = None) -> ActivationReport:
    """The bytes autograd saves for backward when `model` runs `images` (a batch), per image.

    Counts every tensor the forward (and loss_fn(output), default: cross-entropy / the GIST loss on
    class 0) hands to autograd, each storage once; parameters and buffers do not count. Runs the
    batch and its first half, so per_image is the slope and fixed the rest. Works on any device
    (no allocator statistics); under autocast when autocast_dtype is given. The model is run as it
    is (train mode gives the training graph)."""
    batch = images.shape[0]
    full = _count(model, images, loss_fn, autocast_dtype)
    if batch < 2:
        return ActivationReport(float(full["total"]), 0.0, full["total"], batch,
                                {k: float(v) for k, v in full.items() if k != "total"})
    half_n = batch // 2
    half = _count(model, images[:half_n].clone(), loss_fn, autocast_dtype)  # own storage: a view would count all of it
    slope = {k: (full.get(k, 0) - half.get(k, 0)) / (batch - half_n) for k in set(full) | set(half)}
    per_image = slope.pop("total")
    return ActivationReport(per_image, full["total"] - per_image * batch, full["total"], batch,
                            {k: v for k, v in sorted(slope.items(), key=lambda kv: -kv[1]) if v != 0})


def training_state_bytes(model: nn.Module, optimizer_states: int = 2) -> int:
    """Parameters, plus a gradient and `optimizer_states` fp32 tensors (AdamW: 2) per trainable one."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() * (p.element_size() + 4 * optimizer_states)
                    for p in model.parameters() if p.requires_grad)
    return params + trainable


def parse_bytes(text) -> int:
    """'16GiB', '800MB', '1.5G', or a number of bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    s = str(text).strip().lower().replace(" ", "")
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9,
             "tb": 10**12, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40, "b": 1}
    unit = next((u for u in sorted(units, key=len, reverse=True) if s.endswith(u)), "")
    try:
        size = float(s[: len(s) - len(unit)]) * units.get(unit, 1)
    except ValueError:
        size = -1.0
    if not size > 0 or size == float("inf"):
        raise ValueError(f"{text!r} is not a memory size: expected a positive size such as 16GiB, 800MB, 1.5G "
                         "or a number of bytes")
    return int(size)


def fit_micro_batch(model: nn.Module, batch_size: int, memory_budget_bytes, sample: Tensor,
                    autocast_dtype: Optional[torch.dtype] = None, loss_fn: Optional[Callable] = None,
                    optimizer_states: int = 2, headroom: float = 0.85, probe: Optional[bool] = None) -> int:
    """The largest micro-batch (≤ batch_size) whose training step fits in memory_budget_bytes.

    Estimate (any device): parameters + gradients + optimizer states + fixed saved bytes +
    micro_batch × saved bytes per image (activation_bytes on `sample`, a few images), within
    `headroom` of the budget (the rest is left to transient buffers of the backward). On CUDA with
    probe (default on CUDA), the estimate is then checked by running steps and reading
    torch.cuda.max_memory_allocated, halving until it fits (gradients are zeroed afterwards)."""
    devices = [sample.device] if sample.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # the probing forwards must not shift the training's dropout stream
        return _fit_micro_batch(model, batch_size, parse_bytes(memory_budget_bytes), sample, autocast_dtype, loss_fn,
                                optimizer_states, headroom, probe)


def _fit_micro_batch(model, batch_size, budget, sample, autocast_dtype, loss_fn, optimizer_states, headroom, probe):
    report = activation_bytes(model, sample, loss_fn, autocast_dtype)
    free = budget * headroom - training_state_bytes(model, optimizer_states) - max(report.fixed, 0.0)
    micro = int(max(1, min(batch_size, free // max(report.per_image, 1.0))))
    if probe is None:
        probe = sample.device.type == "cuda"
    if not probe:
        return micro
    # the allocator's peak counts parameters, gradients and activations; optimizer states come on top
    states = sum(4 * optimizer_states * p.numel() for p in model.parameters() if p.requires_grad)
    while micro > 1:
        images = sample[torch.arange(micro, device=sample.device) % sample.shape[0]]
        try:
            torch.cuda.reset_peak_memory_stats(sample.device)
            amp = torch.autocast("cuda", autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
            with amp:
                output = model(images)
                loss = _default_loss(output, micro) if loss_fn is None else loss_fn(output)
            loss.backward()
            fits = torch.cuda.max_memory_allocated(sample.device) + states <= budget
        except torch.cuda.OutOfMemoryError:
            fits = False
        finally:
            model.zero_grad(set_to_none=True)
        if fits:
            return micro
        micro = max(1, micro // 2) if micro <= 8 else int(micro * 0.8)
    return micro


def _rows(target: Tensor, ignore_index: Optional[int]) -> int:
    if ignore_index is not None and target.dtype in (torch.long, torch.int, torch.int16, torch.int8, torch.uint8):
        return int((target != ignore_index).sum())
    return int(target.shape[0])


def accumulate_backward(model: nn.Module, loss_fn: Callable, images: Tensor, target: Tensor, micro_batch: int,
                        ignore_index: Optional[int] = -100, scaler=None) -> Tensor:
    """loss_fn(model(images), target).backward() in micro-batches of `micro_batch` images, with the
    same gradients as the whole batch at once (up to float rounding).

    loss_fn must reduce by the mean over non-ignored rows (GistLoss, DistillLoss, CrossEntropyLoss
    with their default reduction): each micro-batch's loss is weighted by its share of those rows.
    Gradients accumulate into .grad (zero them before, step after). Returns the whole batch's loss
    (detached). Stochastic layers (gist dropout, DropPath) draw per micro-batch, so their masks differ
    from a whole-batch pass. scaler: a torch.amp.GradScaler for fp16."""
    batch = images.shape[0]
    if micro_batch >= batch:
        loss = loss_fn(model(images), target)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        return loss.detach()
    total_rows = _rows(target, ignore_index)
    if total_rows == 0:
        raise ValueError("every target row is ignored: the mean loss is undefined")
    total = None
    for start in range(0, batch, micro_batch):
        x, t = images[start:start + micro_batch], target[start:start + micro_batch]
        rows = _rows(t, ignore_index)
        if rows == 0:
            continue  # contributes nothing to a mean over non-ignored rows
        loss = loss_fn(model(x), t) * (rows / total_rows)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        total = loss.detach() if total is None else total + loss.detach()
    return total


def step_with_budget(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable, images: Tensor,
                     target: Tensor, micro_batch: int, ignore_index: Optional[int] = -100) -> Tensor:
    """One optimizer step over the whole batch, its backward in micro-batches (accumulate_backward)."""
    optimizer.zero_grad(set_to_none=True)
    loss = accumulate_backward(model, loss_fn, images, target, micro_batch, ignore_index)
    optimizer.step()
    return loss


__all__ = ["ActivationReport", "activation_bytes", "training_state_bytes", "parse_bytes", "fit_micro_batch",
           "accumulate_backward", "step_with_budget"]
