"""The memory budget: saved-activation accounting, the largest batch that fits, and gradient
accumulation in micro-batches, for large batches on little memory (the trainer and the benchmark
both use these).

    report = gist_fast.activation_bytes(model, images[:8], autocast_dtype=torch.bfloat16)
    report.per_image                     # bytes autograd keeps per image between forward and backward
    micro = gist_fast.fit_micro_batch(model, 64, 16 * 2**30, images[:4], autocast_dtype=torch.bfloat16)
    loss = gist_fast.accumulate_backward(model, gist_fast.GistLoss(), images, target, micro)
    optimizer.step()                     # the same update as one backward over the whole batch

A training CLI offering `--memory-budget` calls fit_micro_batch once, then accumulate_backward
every step in place of `loss_fn(model(images), target).backward()` (gist_fast.training: its own loss
through backward_in_parts). largest_batch + cuda_step_fits measure the largest batch on CUDA.
"""
import contextlib
import warnings
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


def sum_of_outputs(output) -> Tensor:
    """The default loss of the accounting: the sum of every floating output, so the model's own
    saved activations count and no loss is guessed (pass the training's loss to count its few too)."""
    outputs = output if isinstance(output, (tuple, list)) else (output,)
    return sum(o.float().sum() for o in outputs if isinstance(o, Tensor) and o.is_floating_point())


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
            (loss_fn or sum_of_outputs)(output)
    finally:
        for h in handles:
            h.remove()
    by_module["total"] = sum(seen.values())
    return by_module


def activation_bytes(model: nn.Module, images: Tensor, loss_fn: Optional[Callable] = None,
                     autocast_dtype: Optional[torch.dtype] = None) -> ActivationReport:
    """The bytes autograd saves for backward when `model` runs `images` (a batch), per image.

    Counts every tensor the forward (and loss_fn(output), default: sum_of_outputs) hands to
    autograd, each storage once; parameters and buffers do not count. Runs the batch and its first
    half, so per_image is the slope and fixed the rest. Works on any device (no allocator
    statistics); under autocast when autocast_dtype is given. The model is run as it is (train mode
    gives the training graph). loss_fn must take an output of any batch size (build its target from
    the output, e.g. torch.zeros(len(logits), dtype=torch.long))."""
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


def images_within(model: nn.Module, report: ActivationReport, budget: float, optimizer_states: int = 2) -> int:
    """How many images' saved activations (report.per_image each) fit in `budget` bytes beside the training
    state (training_state_bytes) and the fixed saved bytes; 0 when not one does."""
    free = budget - training_state_bytes(model, optimizer_states) - max(report.fixed, 0.0)
    return max(0, int(free // max(report.per_image, 1.0)))


def fit_micro_batch(model: nn.Module, batch_size: int, memory_budget_bytes, sample: Tensor,
                    autocast_dtype: Optional[torch.dtype] = None, loss_fn: Optional[Callable] = None,
                    optimizer_states: int = 2, headroom: float = 0.85, probe: Optional[bool] = None) -> int:
    """The largest micro-batch (≤ batch_size) whose training step fits in memory_budget_bytes.

    Estimate (any device): parameters + gradients + optimizer states + fixed saved bytes +
    micro_batch × saved bytes per image (activation_bytes on `sample`, a few images, with
    loss_fn(output), default sum_of_outputs), within `headroom` of the budget (the rest is left to
    transient buffers of the backward). On CUDA with probe (default on CUDA), the estimate is the
    start of largest_batch over real steps read with torch.cuda.max_memory_allocated (gradients are
    zeroed afterwards)."""
    budget = parse_bytes(memory_budget_bytes)
    devices = [sample.device] if sample.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # the probing forwards must not shift the training's dropout stream
        report = activation_bytes(model, sample, loss_fn, autocast_dtype)
        fitting = images_within(model, report, budget * headroom, optimizer_states)
        micro = max(1, min(batch_size, fitting))
        if fitting == 0:
            warnings.warn(f"a memory budget of {budget:,} bytes leaves no room for one image (the training state "
                          f"takes {training_state_bytes(model, optimizer_states):,}, an image "
                          f"{report.per_image:,.0f}): running micro-batches of 1", stacklevel=2)
        if not (sample.device.type == "cuda" if probe is None else probe):
            return micro
        # the allocator's peak counts parameters, gradients and activations; optimizer states come on top
        states = sum(4 * optimizer_states * p.numel() for p in model.parameters() if p.requires_grad)

        def fits(n: int) -> bool:
            images = sample[torch.arange(n, device=sample.device) % sample.shape[0]]
            amp = torch.autocast("cuda", autocast_dtype, enabled=autocast_dtype is not None)
            try:
                return cuda_step_fits(lambda: _backward(model, images, loss_fn, amp), budget - states, sample.device)
            finally:
                model.zero_grad(set_to_none=True)

        return max(1, largest_batch(fits, micro, batch_size))


def _backward(model: nn.Module, images: Tensor, loss_fn: Optional[Callable], amp) -> None:
    with amp:
        loss = (loss_fn or sum_of_outputs)(model(images))
    loss.backward()


def cuda_step_fits(step: Callable[[], object], budget: int, device: torch.device) -> bool:
    """Whether step()'s peak allocation on the CUDA device stays within budget bytes (an
    out-of-memory error is a no). The caller runs it once before if its first call allocates
    state that later calls reuse (an optimizer's)."""
    try:
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) <= budget
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        torch.cuda.empty_cache()


def largest_batch(fits: Callable[[int], bool], start: int, limit: int) -> int:
    """The largest n in [1, limit] with fits(n) (0 when not even 1 fits), assuming fits is monotone:
    doubling up from `start` or halving down, then bisection to within 1/16 of the answer."""
    start = max(1, min(start, limit))
    if fits(start):
        lo, hi = start, min(2 * start, limit + 1)
        while hi <= limit and fits(hi):
            lo, hi = hi, min(2 * hi, limit + 1)
    else:
        lo, hi = start // 2, start
        while lo > 0 and not fits(lo):
            lo, hi = lo // 2, lo
    while hi - lo > max(1, lo // 16):
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _rows(target: Tensor, ignore_index: Optional[int]) -> int:
    if ignore_index is not None and target.dtype in (torch.long, torch.int, torch.int16, torch.int8, torch.uint8):
        return int((target != ignore_index).sum())
    return int(target.shape[0])


def backward_in_parts(loss_sum: Callable[[Tensor, Tensor], Optional[Tensor]], images: Tensor, target: Tensor,
                      micro_batch: int, divisor: float, scaler=None) -> Tensor:
    """Backward of Σ_parts loss_sum(part) / divisor, one micro-batch of `micro_batch` rows at a time.

    loss_sum(images, target) returns the part's loss summed over its rows (None: the part adds
    nothing); with divisor the whole batch's row count the gradients are those of the batch's
    mean loss, however it is split. Returns Σ loss_sum, detached. scaler: a GradScaler for fp16."""
    total = torch.zeros((), device=images.device)
    for start in range(0, images.shape[0], micro_batch):
        loss = loss_sum(images[start:start + micro_batch], target[start:start + micro_batch])
        if loss is None:
            continue
        part = loss / divisor
        (scaler.scale(part) if scaler is not None else part).backward()
        total = total + loss.detach()
    return total


def accumulate_backward(model: nn.Module, loss_fn: Callable, images: Tensor, target: Tensor, micro_batch: int,
                        ignore_index: Optional[int] = -100, scaler=None) -> Tensor:
    """loss_fn(model(images), target).backward() in micro-batches of `micro_batch` images, with the
    same gradients as the whole batch at once (up to float rounding).

    loss_fn must reduce by the mean over non-ignored rows (GistLoss, DistillLoss, CrossEntropyLoss
    with their default reduction): each micro-batch's mean is weighted by its share of those rows.
    Gradients accumulate into .grad (zero them before, step after). Returns the whole batch's loss
    (detached). Stochastic layers (gist dropout, DropPath) draw per micro-batch, so their masks differ
    from a whole-batch pass. scaler: a torch.amp.GradScaler for fp16."""
    if micro_batch >= images.shape[0]:
        loss = loss_fn(model(images), target)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        return loss.detach()
    total_rows = _rows(target, ignore_index)
    if total_rows == 0:
        raise ValueError("every target row is ignored: the mean loss is undefined")

    def loss_sum(x: Tensor, t: Tensor) -> Optional[Tensor]:
        rows = _rows(t, ignore_index)  # a part of ignored rows only adds nothing to the mean
        return loss_fn(model(x), t) * rows if rows else None

    return backward_in_parts(loss_sum, images, target, micro_batch, total_rows, scaler) / total_rows


def step_with_budget(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable, images: Tensor,
                     target: Tensor, micro_batch: int, ignore_index: Optional[int] = -100) -> Tensor:
    """One optimizer step over the whole batch, its backward in micro-batches (accumulate_backward)."""
    optimizer.zero_grad(set_to_none=True)
    loss = accumulate_backward(model, loss_fn, images, target, micro_batch, ignore_index)
    optimizer.step()
    return loss


__all__ = ["ActivationReport", "activation_bytes", "training_state_bytes", "parse_bytes", "images_within",
           "fit_micro_batch", "largest_batch", "cuda_step_fits", "backward_in_parts", "accumulate_backward",
           "step_with_budget"]
