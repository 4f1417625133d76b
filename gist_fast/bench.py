"""`gist-fast bench`: end-to-end training-step benchmark of GIST on timm ViTs.

Per PEFT kind (--peft: GIST's adapter by default, or GIST over vpt, lora, qkv-lora, ssf; the Gist token and
GistLoss in every one), the implementations (same weights, same batch), in the order they run:
    eager            patch(fused=False): the authors' structure on timm, eager PyTorch
    checkpoint       eager + timm gradient checkpointing (model.set_grad_checkpointing())
    gist_fast_auto   patch() as a user calls it: memory="auto" ("lean" on CUDA, None on CPU)
    gist_fast        patch(fused="auto", memory="lean")
    gist_fast_min    patch(fused="auto", memory="min")
    gist_fast_ops    patch(fused="auto", memory=None): the fused ops in the eager block, no recomputation
    eager_compile    eager under torch.compile
    gist_fast_compile  gist_fast under torch.compile (compiled blocks use the fused ops, not the lean path)
Compiled implementations trace the batch dimension as dynamic, so one compilation serves every batch.

Per (model, implementation, batch), through the benchmark harness (gist_fast.bench_harness): the
step time (forward + GIST loss + backward + AdamW step; triton.testing.do_bench on CUDA, perf_counter
on CPU; p50/p20/p80 over --steps timed steps after --warmup untimed ones, compilation never timed),
images/s, peak memory (CUDA), saved activations per image (gist_fast.activation_bytes),
|loss - loss_eager|, MFU (CUDA, bf16) and the largest batch within --memory-budget (CUDA: found by
running steps; CPU: estimated from saved activations and training state, marked "est"). On CUDA one
implementation's model is on the GPU at a time, so its peak memory and largest batch are its own; on
CPU every implementation is timed in interleaved rounds (a shared CPU's load drifts).

Every result is a row appended to --out/results.csv (default runs/bench/<device>/) as soon
as its cell is measured, and bench.md is redrawn from that CSV after every cell, bench_throughput.png
and bench_memory.png at the end (gist_fast.bench_report; benchmarks/plot.py redraws them). With
--time-budget, cells that would end after it (a compiled implementation's first cell is expected to
take --compile-seconds, any other cell nothing) are recorded as "skipped: time budget".
"""
import contextlib
import copy
import dataclasses
import os
import sys
from typing import Callable, Dict, List, Optional

import torch

import gist_fast
from gist_fast import bench_harness as harness
from gist_fast.bench_harness import Deadline, Row, make_row
from gist_fast.peft import TUNABLE
from gist_fast.training.recipe import MEMORY_MODES  # --memory, as gist-fast train spells it

# eager first (the loss reference), compiled last (the slowest to start)
IMPLS = ("eager", "checkpoint", "gist_fast_auto", "gist_fast", "gist_fast_min", "gist_fast_ops", "eager_compile",
         "gist_fast_compile")
MEMORY = {"gist_fast_auto": "auto", "gist_fast": "lean", "gist_fast_min": "min", "gist_fast_ops": None,
          "gist_fast_compile": "lean"}  # "auto" is patch()'s default
MODELS = ("vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224")
PEAK_BF16_TFLOPS = {"h100": 989.0, "h200": 989.0, "a100": 312.0, "l40s": 362.0, "4090": 165.0}
BENCH_KINDS = tuple(k for k in TUNABLE if k != "seq-adapter")  # the kinds GistLoss trains (iDAT's is not one)
OP = "train_step"  # the harness's op name for a whole training step; mode "step"
SAMPLE = 4  # images the saved-activation accounting runs


def _parse(argv: Optional[List[str]]):
    p = harness.Parser(prog="gist-fast bench", description=__doc__.split("\n")[0])
    p.add_argument("--models", default=None,
                   help="comma list; short names (vit_tiny) get _patch16_224 "
                   "(default: all three on CUDA, vit_tiny on CPU)")
    p.add_argument("--impls", default=None, help=f"comma list of {','.join(IMPLS)} (default: all)")
    p.add_argument("--peft", default="adapter", help=f"comma list of PEFT kinds, each with the Gist token "
                   f"({','.join(BENCH_KINDS)}; default adapter: GIST itself)")
    p.add_argument("--batches", default=None, help="comma list (default 32,64,128,256 on CUDA, 8,32 on CPU)")
    p.add_argument("--dtype", default=None, choices=("fp32", "bf16"),
                   help="bf16 = autocast (default on CUDA), fp32 (default on CPU)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20 CUDA, 5 CPU)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps first (default 3 CUDA, 1 CPU; compile impls get 2 more)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--memory", default=None, help="comma list of patch memory modes (auto,lean,min,none; default all): "
                   "keeps the gist_fast implementations that run in them")
    p.add_argument("--memory-budget", default="16GiB",
                   help="largest batch within this (CUDA: by trying, CPU: estimate); 'none' to skip")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU (default: torch's; "
                   "1 is steadier on a loaded machine)")
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--img-size", type=int, default=224, help="input resolution (smaller for smoke tests)")
    p.add_argument("--out", default=None, help="output folder (default runs/bench/<device>; the committed results: "
                   "benchmarks/results/<device>); "
                   "rows are appended to its results.csv")
    p.add_argument("--no-plots", action="store_true", help="write bench.md but no PNGs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="start no (implementation, batch) cell that would end after this many seconds; "
                   "those are recorded as skipped")
    p.add_argument("--compile-seconds", type=float, default=90.0,
                   help="what a compiled implementation's first cell is expected to take under --time-budget "
                   "(ViT-B on an H100)")
    return p.parse_args(argv)


def select_impls(impls: Optional[str], memory: Optional[str]) -> List[str]:
    """--impls (default all), less the gist_fast implementations whose patch memory mode --memory leaves out."""
    requested = impls.split(",") if impls else list(IMPLS)
    unknown = set(requested) - set(IMPLS)
    if unknown:
        raise ValueError(f"--impls {','.join(sorted(unknown))}: choose from {','.join(IMPLS)}")
    modes = memory.split(",") if memory else list(MEMORY_MODES)
    if set(modes) - set(MEMORY_MODES):
        raise ValueError(f"--memory {memory}: choose from {','.join(MEMORY_MODES)}")
    return [i for i in IMPLS if i in requested and (i not in MEMORY or (MEMORY[i] or "none") in modes)]


def _full_name(name: str) -> str:
    return name if "patch" in name else f"{name}_patch16_224"


@dataclasses.dataclass
class Settings:
    """The command line, checked and with the device's defaults filled in."""
    device: torch.device
    models: List[str]
    pefts: List[str]
    impls: List[str]
    batches: List[int]
    dtype: str
    steps: int
    warmup: int
    budget: Optional[int]  # bytes; None: no largest-batch search
    num_classes: int
    img_size: int
    seed: int
    time_budget: Optional[float]
    compile_seconds: float

    @property
    def amp_dtype(self) -> Optional[torch.dtype]:
        return torch.bfloat16 if self.dtype == "bf16" else None


def settings(args) -> Settings:
    """Settings from parsed arguments; ValueError (one line, naming the option) on a bad one."""
    import timm

    from gist_fast.memory import parse_bytes

    device = harness.device(args.device)
    cuda = device.type == "cuda"
    models = [_full_name(m) for m in (args.models.split(",") if args.models else (MODELS if cuda else MODELS[:1]))]
    unknown = [m for m in models if not timm.is_model(m)]
    if unknown:
        raise ValueError(f"--models {','.join(unknown)}: not timm models (short names: vit_tiny, vit_small, vit_base)")
    batches = harness.positive_ints(args.batches, "--batches") if args.batches else ([32, 64, 128, 256] if cuda
                                                                                      else [8, 32])
    if args.img_size < 16 or args.num_classes < 2 or (args.steps is not None and args.steps < 1):
        raise ValueError("--img-size >= 16, --num-classes >= 2 and --steps >= 1 are needed")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads {args.threads}: expected >= 1")
    pefts = [k for k in args.peft.split(",") if k]
    if not pefts or set(pefts) - set(BENCH_KINDS):
        raise ValueError(f"--peft {args.peft}: choose from {','.join(BENCH_KINDS)}")
    budget = None if str(args.memory_budget).lower() == "none" else parse_bytes(args.memory_budget)
    steps = args.steps if args.steps is not None else (20 if cuda else 5)
    return Settings(device, models, pefts, select_impls(args.impls, args.memory), batches,
                    args.dtype or ("bf16" if cuda else "fp32"), steps,
                    args.warmup if args.warmup is not None else (3 if cuda else 1), budget, args.num_classes,
                    args.img_size, args.seed, args.time_budget, args.compile_seconds)


def step_gflops(model) -> float:
    """Forward + input-gradient backward FLOPs per image of a frozen ViT (2 × forward; ~70 for ViT-B/16)."""
    d, n = model.embed_dim, model.patch_embed.num_patches + model.num_prefix_tokens
    hidden = model.blocks[0].mlp.fc1.out_features
    per_block = n * (4 * d * d + 2 * d * hidden) + 2 * n * n * d
    patch = model.patch_embed.num_patches * d * model.patch_embed.proj.weight[0].numel()
    return 2 * 2 * (len(model.blocks) * per_block + patch) / 1e9


def build(impl: str, peft: str, base, ref_state, device) -> torch.nn.Module:
    model = copy.deepcopy(base)
    if impl in ("eager", "eager_compile", "checkpoint"):
        gist_fast.patch(model, peft=peft, fused=False, verbose=False)
    else:
        gist_fast.patch(model, peft=peft, fused="auto", memory=MEMORY[impl], verbose=False)
    model.load_state_dict(ref_state)
    if impl == "checkpoint":
        model.set_grad_checkpointing(True)
    return model.to(device).train()


def _compiled_scope():
    """Inductor draws dropout masks from its own generator unless told to call aten's: with
    fallback_random the gist-token dropout matches eager's, so |Δloss| compares the math. Scoped to
    the compiled implementation's own calls (compilation included), not set for the process."""
    import torch._inductor.config

    return torch._inductor.config.patch(fallback_random=True)


class Runner:
    """One implementation's training step on one model."""

    def __init__(self, impl: str, model, device, amp_dtype):
        self.impl, self.model, self.device, self.amp_dtype = impl, model, device, amp_dtype
        self.loss_fn = gist_fast.GistLoss(fused=impl.startswith("gist_fast"))
        self.reset()
        self.scope: Callable = contextlib.nullcontext
        self.forward = self._forward
        if impl.endswith("_compile"):
            self.scope = _compiled_scope
            compiled = torch.compile(self._forward)

            def forward(images, target):  # a dynamic batch: one compilation (a minute for ViT-B) serves every batch
                torch._dynamo.maybe_mark_dynamic(images, 0)
                torch._dynamo.maybe_mark_dynamic(target, 0)
                return compiled(images, target)

            self.forward = forward

    def reset(self, state=None):
        """Back to the shared weights (every batch size starts from them) and a fresh optimizer."""
        if state is not None:
            self.model.load_state_dict(state)
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)

    def _forward(self, images, target):
        return self.loss_fn(self.model(images), target)

    def class0_loss(self, output):
        """The step's loss with every target 0: what the activation accounting runs after the model."""
        return self.loss_fn(output, torch.zeros(len(output[0]), dtype=torch.long, device=output[0].device))

    def step(self, images, target) -> torch.Tensor:
        self.opt.zero_grad(set_to_none=True)
        with self.scope():
            with torch.autocast(self.device.type, self.amp_dtype, enabled=self.amp_dtype is not None):
                loss = self.forward(images, target)
            loss.backward()
        self.opt.step()
        return loss.detach()

    def loss(self, images, target, seed: int) -> float:
        torch.manual_seed(seed)  # same gist-dropout draws for every implementation
        with self.scope(), torch.autocast(self.device.type, self.amp_dtype, enabled=self.amp_dtype is not None):
            return float(self.forward(images, target).detach())


def max_batch_cuda(runner: Runner, budget: int, num_classes: int, start: int = 16, limit: int = 4096) -> int:
    """Largest batch whose step (the optimizer's state allocated by a first step) peaks within
    `budget` bytes (gist_fast.memory.largest_batch)."""
    from gist_fast import memory

    size = runner.model.patch_embed.img_size

    def fits(batch: int) -> bool:
        images = torch.randn(batch, 3, *size, device=runner.device)
        target = torch.randint(0, num_classes, (batch,), device=runner.device)
        step = lambda: runner.step(images, target)  # noqa: E731
        try:  # the first step allocates the optimizer's state, which the measured one reuses
            warm = memory.cuda_step_fits(step, float("inf"), runner.device)
            return warm and memory.cuda_step_fits(step, budget, runner.device)
        finally:
            runner.opt.zero_grad(set_to_none=True)

    return memory.largest_batch(fits, start, limit)


def _max_batch(runner: Runner, saved, budget: int, num_classes: int, deadline: Deadline):
    """(largest batch within budget, how it was found), or None where it cannot be told."""
    if runner.device.type == "cuda" and not runner.impl.endswith("_compile"):
        if not deadline.allows():
            return None, "skipped: time budget"
        return max_batch_cuda(runner, budget, num_classes), "measured"
    if saved is None:
        return None  # saved-tensor hooks do not see inside a compiled graph
    estimate = gist_fast.memory.images_within(runner.model, saved, budget)
    return estimate, "estimate from saved activations (no allocator on this device)"


def _groups(impls: List[str], cuda: bool) -> List[List[str]]:
    """Implementations that are built and timed together: one at a time on CUDA (only its model on the
    GPU, so peak memory and the largest batch are its own), all together on CPU (interleaved rounds)."""
    return [[impl] for impl in impls] if cuda else [impls]


@dataclasses.dataclass
class _Model:
    """One model's shared state: the weights every implementation starts from, its config columns,
    and eager's loss per batch (the reference of |Δloss|)."""

    name: str
    peft: str
    base: torch.nn.Module
    ref_state: Dict
    gflops: float
    sample: torch.Tensor
    config: Dict[str, object]
    eager_loss: Dict[int, float] = dataclasses.field(default_factory=dict)


def _batch(s: Settings, batch: int):
    g = torch.Generator().manual_seed(s.seed + batch)  # the same images for every implementation
    images = torch.randn(batch, 3, s.img_size, s.img_size, generator=g).to(s.device)
    return images, torch.randint(0, s.num_classes, (batch,), generator=g).to(s.device)


def _rows(s: Settings, env, m: _Model, impl: str, batch: int, timing, peak, loss: float) -> List[Row]:
    """One timed cell's rows: ms, img/s, peak MB (CUDA), |Δloss| (with eager's loss), MFU (CUDA bf16)."""
    def row(metric, value, method=""):
        return make_row(env, OP, impl, "step", metric, "batch", batch, m.config, value, method)

    rows = [row("ms", timing), row("img_per_s", timing.per_second(batch), timing.method)]
    if peak is not None:
        rows.append(row("peak_MB", peak[0], "torch.cuda.max_memory_allocated over one step"))
    if batch in m.eager_loss:
        rows.append(row("abs_dloss", abs(loss - m.eager_loss[batch]), "same weights, batch and dropout draws"))
    peak_tflops = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in env["device"].lower()), None)
    if s.device.type == "cuda" and s.dtype == "bf16" and peak_tflops:
        flops = batch * m.gflops * 1e9
        rows.append(row("mfu", tuple(flops / (t * 1e-3) / (peak_tflops * 1e12) for t in
                                     (timing.p50, timing.p80, timing.p20)),
                        f"{m.gflops:.1f} GFLOP/img (2x forward) / {peak_tflops:g} TFLOP/s bf16 peak"))
    return rows


def _cell(s: Settings, env, m: _Model, runners: Dict[str, Runner], batch: int) -> List[Row]:
    """Every implementation of a group at one batch: losses first (same seed), then warm-up and timing."""
    images, target = _batch(s, batch)
    for r in runners.values():
        r.reset(m.ref_state)
    losses = {impl: r.loss(images, target, s.seed) for impl, r in runners.items()}
    if "eager" in losses:
        m.eager_loss[batch] = losses["eager"]
    steps = {impl: (lambda r=r: r.step(images, target)) for impl, r in runners.items()}
    for impl, step in steps.items():
        for _ in range(2 if impl.endswith("_compile") else 0):  # compilation: forward, then backward
            step()
    timings = harness.measure(steps, s.device, warmup=s.warmup, reps=s.steps)
    rows = []
    for impl in runners:
        peak = harness.peak_memory_mb(steps[impl], s.device)
        rows += _rows(s, env, m, impl, batch, timings[impl], peak, losses[impl])
        ms = timings[impl].p50
        print(f"{m.name} {m.peft} {impl:18s} b={batch:4d} {ms:9.1f} ms  {batch * 1e3 / ms:8.1f} img/s  "
              f"|dloss| {abs(losses[impl] - m.eager_loss.get(batch, losses[impl])):.2e}", flush=True)
    return rows


def _build_runners(s: Settings, env, m: _Model, group: List[str]):
    """The group's runners, and the rows of their saved activations per image (compiled graphs hide
    theirs from saved-tensor hooks)."""
    runners = {impl: Runner(impl, build(impl, m.peft, m.base, m.ref_state, s.device), s.device, s.amp_dtype)
               for impl in group}
    saved = {impl: gist_fast.activation_bytes(r.model, m.sample, r.class0_loss, s.amp_dtype)
             for impl, r in runners.items() if not impl.endswith("_compile")}
    rows = [make_row(env, OP, impl, "step", "saved_MB_per_img", "batch", SAMPLE, m.config, rep.per_image_mb,
                     "saved-tensor hooks (gist_fast.activation_bytes)") for impl, rep in saved.items()]
    return runners, saved, rows


def _max_batch_rows(s: Settings, env, m: _Model, runners: Dict[str, Runner], saved, deadline) -> List[Row]:
    rows = []
    for impl, r in runners.items():
        found = _max_batch(r, saved.get(impl), s.budget, s.num_classes, deadline)
        if found:
            value, how = found
            skipped = how if value is None else ""
            rows.append(make_row(env, OP, impl, "step", "max_batch", "budget_GiB", s.budget / 2**30, m.config,
                                 value, "" if skipped else how, skipped))
    return rows


def _bench_group(s: Settings, env, m: _Model, group: List[str], deadline: Deadline, emit) -> None:
    """One group of implementations over every batch, then their largest batch within the budget."""
    runners: Dict[str, Runner] = {}
    saved = {}
    for batch in s.batches:
        compiles = not runners and any(impl.endswith("_compile") for impl in group)
        if not deadline.allows(s.compile_seconds if compiles else 0.0):
            emit([make_row(env, OP, impl, "step", "ms", "batch", batch, m.config, None, note="skipped: time budget")
                  for impl in group])
            continue
        if not runners:
            runners, saved, saved_rows = _build_runners(s, env, m, group)
            emit(saved_rows)
        emit(_cell(s, env, m, runners, batch))
    if runners and s.budget:
        emit(_max_batch_rows(s, env, m, runners, saved, deadline))
    del runners
    if s.device.type == "cuda":
        torch.cuda.empty_cache()


def _model(s: Settings, name: str, peft: str) -> _Model:
    import timm

    torch.manual_seed(s.seed)
    base = timm.create_model(name, pretrained=False, num_classes=s.num_classes, img_size=s.img_size)
    ref_state = gist_fast.patch(copy.deepcopy(base), peft=peft, fused=False, verbose=False).state_dict()
    sample = torch.randn(SAMPLE, 3, s.img_size, s.img_size, generator=torch.Generator().manual_seed(s.seed + 1))
    config = {"model": name, "peft": peft, "dtype": s.dtype, "img": s.img_size, "classes": s.num_classes}
    return _Model(name, peft, base, ref_state, step_gflops(base), sample.to(s.device), config)


def run(s: Settings, on_rows: Optional[Callable[[List[Row]], None]] = None) -> List[Row]:
    """Every (model, implementation, batch) cell; on_rows(new rows) as soon as each is measured, so a
    run stopped part-way keeps what it measured."""
    env = harness.environment(s.device)
    deadline = Deadline(s.time_budget)
    rows: List[Row] = []

    def emit(new: List[Row]) -> None:
        rows.extend(new)
        if on_rows is not None and new:
            on_rows(new)

    for name in s.models:
        for peft in s.pefts:
            m = _model(s, name, peft)
            for group in _groups(s.impls, s.device.type == "cuda"):
                _bench_group(s, env, m, group, deadline, emit)
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    """The command line: 0 when done, 2 (one line on stderr) on a bad option or --out."""
    return harness.run_cli("gist-fast bench", lambda: _main(argv))


def _main(argv: Optional[List[str]]) -> int:
    from gist_fast import bench_report

    args = _parse(argv)
    s = settings(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or os.path.join("runs", "bench", harness.device_slug(s.device))
    path, emit = bench_report.results_sink(out)
    rows = run(s, on_rows=emit)
    written = bench_report.write_reports(out, plots=not args.no_plots)
    print(bench_report.train_markdown(rows))
    print(f"appended {len(rows)} rows to {path}; wrote " + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
