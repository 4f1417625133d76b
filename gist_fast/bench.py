"""`gist-fast bench`: end-to-end training-step benchmark of GIST on timm ViTs.

Implementations (same weights, same batch), in the order they run:
    eager            patch(fused=False): the authors' structure on timm, eager PyTorch
    checkpoint       eager + timm gradient checkpointing (model.set_grad_checkpointing())
    gist_fast_auto   patch() as a user calls it: memory="auto" ("lean" on CUDA, None on CPU)
    gist_fast        patch(fused="auto", memory="lean")
    gist_fast_min    patch(fused="auto", memory="min")
    gist_fast_ops    patch(fused="auto", memory=None): the fused ops in the eager block, no recomputation
    eager_compile    eager under torch.compile
    gist_fast_compile  gist_fast under torch.compile (compiled blocks use the fused ops, not the lean path)
Compiled implementations trace the batch dimension as dynamic, so one compilation serves every batch.

Per (model, implementation, batch): median step time over --steps timed steps after warm-up
(forward + GIST loss + backward + AdamW step; compilation and warm-up are never timed), images/s,
peak memory (CUDA), saved activations per image (gist_fast.activation_bytes), |loss - loss_eager|,
MFU (CUDA, bf16) and the largest batch within --memory-budget (CUDA: found by running steps; CPU:
estimated from saved activations and training state, marked "est"). On CUDA one implementation's
model is on the GPU at a time, so its peak memory and largest batch are its own; on CPU every
implementation is timed in interleaved rounds (a shared CPU's load drifts).
Writes bench.json and bench.md into --out (default benchmarks/results/<device>/) after every
(implementation, batch) cell, and bench_throughput.png and bench_memory.png at the end; with
--time-budget, cells that would end after it (a compiled implementation's first cell is expected to
take --compile-seconds, any other cell nothing) are recorded as "skipped: time budget".
"""
import argparse
import copy
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional

import torch

from gist_fast.training.recipe import MEMORY_MODES  # --memory, as gist-fast train spells it

# eager first (the loss reference), compiled last (the slowest to start)
IMPLS = ("eager", "checkpoint", "gist_fast_auto", "gist_fast", "gist_fast_min", "gist_fast_ops", "eager_compile",
         "gist_fast_compile")
MEMORY = {"gist_fast_auto": "auto", "gist_fast": "lean", "gist_fast_min": "min", "gist_fast_ops": None,
          "gist_fast_compile": "lean"}  # "auto" is patch()'s default
MODELS = ("vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224")
PEAK_BF16_TFLOPS = {"h100": 989.0, "h200": 989.0, "a100": 312.0, "l40s": 362.0, "4090": 165.0}


def _parse(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gist-fast bench", description=__doc__.split("\n")[0])
    p.add_argument("--models", default=None,
                   help="comma list; short names (vit_tiny) get _patch16_224 "
                   "(default: all three on CUDA, vit_tiny on CPU)")
    p.add_argument("--impls", default=None, help=f"comma list of {','.join(IMPLS)} (default: all)")
    p.add_argument("--batches", default=None, help="comma list (default 32,64,128,256 on CUDA, 8,32 on CPU)")
    p.add_argument("--dtype", default=None, choices=("fp32", "bf16"),
                   help="bf16 = autocast (default on CUDA), fp32 (default on CPU)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20 CUDA, 3 CPU)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps first (default 5 CUDA, 1 CPU; compile impls get 2 more)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--memory", default=None, help="comma list of patch memory modes (auto,lean,min,none; default all): "
                   "keeps the gist_fast implementations that run in them")
    p.add_argument("--memory-budget", default="16GiB",
                   help="largest batch within this (CUDA: by trying, CPU: estimate); 'none' to skip")
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--img-size", type=int, default=224, help="input resolution (smaller for smoke tests)")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results/<device>)")
    p.add_argument("--no-plots", action="store_true")
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


def _device(args: argparse.Namespace) -> torch.device:
    """--device, checked: cpu, or cuda where there is one (default: cuda when available)."""
    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name.split(":")[0] not in ("cpu", "cuda") or (name.startswith("cuda") and not torch.cuda.is_available()):
        raise ValueError(f"--device {name}: expected cpu, or cuda on a machine with a GPU")
    return torch.device(name)


def _full_name(name: str) -> str:
    return name if "patch" in name else f"{name}_patch16_224"


def device_slug(device: torch.device) -> str:
    if device.type == "cuda":
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    return device.type


def _git_sha() -> str:
    if os.environ.get("GIT_SHA"):  # passed in where the checkout travels without .git (the GPU machine)
        return os.environ["GIT_SHA"]
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here,
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "") if sha else "unknown"
    except Exception:
        return "unknown"


def environment(device: torch.device) -> Dict[str, str]:
    import timm

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"),
        "torch": torch.__version__, "triton": triton_version, "timm": timm.__version__,
        "python": platform.python_version(), "git_sha": _git_sha(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def step_gflops(model) -> float:
    """Forward + input-gradient backward FLOPs per image of a frozen ViT (2 × forward; ~70 for ViT-B/16)."""
    d, n = model.embed_dim, model.patch_embed.num_patches + model.num_prefix_tokens
    hidden = model.blocks[0].mlp.fc1.out_features
    per_block = n * (4 * d * d + 2 * d * hidden) + 2 * n * n * d
    patch = model.patch_embed.num_patches * d * model.patch_embed.proj.weight[0].numel()
    return 2 * 2 * (len(model.blocks) * per_block + patch) / 1e9


def _loss_fn(fused: bool):
    import gist_fast

    if fused:
        try:  # the fused loss when its backend is there, else the reference
            gist_fast.GistLoss()((torch.randn(2, 3), torch.randn(2, 3)), torch.tensor([0, 1]))
        except Exception:
            fused = False
    return gist_fast.GistLoss(fused=fused)


def build(impl: str, base, ref_state, device) -> torch.nn.Module:
    import gist_fast

    model = copy.deepcopy(base)
    if impl in ("eager", "eager_compile", "checkpoint"):
        gist_fast.patch(model, fused=False, verbose=False)
    else:
        gist_fast.patch(model, fused="auto", memory=MEMORY[impl], verbose=False)
    model.load_state_dict(ref_state)
    if impl == "checkpoint":
        model.set_grad_checkpointing(True)
    return model.to(device).train()


class Runner:
    """One implementation's training step on one model."""

    def __init__(self, impl: str, model, device, amp_dtype):
        self.impl, self.model, self.device, self.amp_dtype = impl, model, device, amp_dtype
        self.loss_fn = _loss_fn(impl.startswith("gist_fast"))
        self.reset()
        if impl.endswith("_compile"):
            # inductor draws dropout masks from its own generator unless told to call aten's: with
            # fallback_random the gist-token dropout matches eager's, so |Δloss| compares the math
            import torch._inductor.config

            torch._inductor.config.fallback_random = True
            compiled = torch.compile(self._forward)

            def forward(images, target):  # a dynamic batch: one compilation (a minute for ViT-B) serves every batch
                torch._dynamo.maybe_mark_dynamic(images, 0)
                torch._dynamo.maybe_mark_dynamic(target, 0)
                return compiled(images, target)

            self.forward = forward
        else:
            self.forward = self._forward

    def reset(self, state=None):
        """Back to the shared weights (every batch size starts from them) and a fresh optimizer."""
        if state is not None:
            self.model.load_state_dict(state)
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)

    def _forward(self, images, target):
        return self.loss_fn(self.model(images), target)

    def step(self, images, target) -> torch.Tensor:
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, self.amp_dtype, enabled=self.amp_dtype is not None):
            loss = self.forward(images, target)
        loss.backward()
        self.opt.step()
        return loss.detach()

    def loss(self, images, target, seed: int) -> float:
        torch.manual_seed(seed)  # same gist-dropout draws for every implementation
        with torch.autocast(self.device.type, self.amp_dtype, enabled=self.amp_dtype is not None):
            return float(self.forward(images, target).detach())


class Deadline:
    """A wall-clock budget (None: no limit)."""

    def __init__(self, seconds: Optional[float]):
        self.end = None if seconds is None else time.monotonic() + seconds

    def allows(self, seconds: float = 0.0) -> bool:
        """Whether work expected to take `seconds` would end inside the budget."""
        return self.end is None or time.monotonic() + seconds < self.end


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_steps(runner: Runner, images, target, steps: int) -> List[float]:
    times = []
    for _ in range(steps):
        if runner.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            runner.step(images, target)
            end.record()
            torch.cuda.synchronize(runner.device)
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            runner.step(images, target)
            times.append(time.perf_counter() - t0)
    return times


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


def _groups(impls: List[str], cuda: bool) -> List[List[str]]:
    """Implementations that are built and timed together: one at a time on CUDA (only its model on the
    GPU, so peak memory and the largest batch are its own), all together on CPU (interleaved rounds)."""
    return [[impl] for impl in impls] if cuda else [impls]


def _batch(args: argparse.Namespace, batch: int, device):
    g = torch.Generator().manual_seed(args.seed + batch)  # the same images for every implementation
    images = torch.randn(batch, 3, args.img_size, args.img_size, generator=g).to(device)
    return images, torch.randint(0, args.num_classes, (batch,), generator=g).to(device)


def _measure(runners: Dict[str, Runner], images, target, warmup: int, steps: int, device):
    """Step times (s) per implementation after warm-up, and peak memory (bytes, CUDA)."""
    for impl, r in runners.items():
        for _ in range(warmup + (2 if impl.endswith("_compile") else 0)):
            r.step(images, target)
    _sync(device)
    timings: Dict[str, List[float]] = {impl: [] for impl in runners}
    peak = {}
    if device.type == "cuda":
        for impl, r in runners.items():
            torch.cuda.reset_peak_memory_stats(device)
            timings[impl] = _time_steps(r, images, target, steps)
            peak[impl] = torch.cuda.max_memory_allocated(device)
    else:  # interleave: a shared CPU's load drifts, so each round times every implementation once
        for _ in range(steps):
            for impl, r in runners.items():
                timings[impl] += _time_steps(r, images, target, 1)
    return timings, peak


def _max_batch(runner: Runner, saved, budget: int, num_classes: int, deadline: Deadline):
    """(largest batch within budget, how it was found), or None where it cannot be told."""
    import gist_fast

    if runner.device.type == "cuda" and not runner.impl.endswith("_compile"):
        if not deadline.allows():
            return None, "skipped: time budget"
        return max_batch_cuda(runner, budget, num_classes), "measured"
    if saved is None:
        return None  # saved-tensor hooks do not see inside a compiled graph
    free = budget - gist_fast.memory.training_state_bytes(runner.model) - max(saved.fixed, 0)
    return int(free // saved.per_image), "estimate from saved activations (no allocator on this device)"


def run(args: argparse.Namespace, on_result=None) -> Dict:
    """Every (model, implementation, batch) cell; on_result(result so far) after each one, so a run
    stopped part-way keeps what it measured."""
    import timm

    import gist_fast

    device = _device(args)
    cuda = device.type == "cuda"
    models = [_full_name(m) for m in (args.models.split(",") if args.models else (MODELS if cuda else MODELS[:1]))]
    unknown = [m for m in models if not timm.is_model(m)]
    if unknown:
        raise ValueError(f"--models {','.join(unknown)}: not timm models (short names: vit_tiny, vit_small, vit_base)")
    impls = select_impls(args.impls, args.memory)
    batches = [int(b) for b in (args.batches.split(",") if args.batches else ((32, 64, 128, 256) if cuda else (8, 32)))]
    if min(batches) < 1 or args.img_size < 16 or args.num_classes < 2 or (args.steps or 1) < 1:
        raise ValueError("--batches >= 1, --img-size >= 16, --num-classes >= 2 and --steps >= 1 are needed")
    dtype = args.dtype or ("bf16" if cuda else "fp32")
    amp_dtype = torch.bfloat16 if dtype == "bf16" else None
    steps = args.steps or (20 if cuda else 3)
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    budget = None if str(args.memory_budget).lower() == "none" else gist_fast.memory.parse_bytes(args.memory_budget)
    deadline = Deadline(args.time_budget)
    env = environment(device)
    peak_tflops = next((v for k, v in PEAK_BF16_TFLOPS.items() if cuda and k in env["device"].lower()), None)
    rows: List[Dict] = []
    result = {"environment": env, "settings": {"models": models, "impls": impls, "batches": batches, "dtype": dtype,
                                               "steps": steps, "warmup": warmup, "memory_budget": args.memory_budget,
                                               "time_budget_s": args.time_budget, "peak_bf16_tflops": peak_tflops},
              "rows": rows}

    def publish():
        if on_result is not None:
            on_result(result)

    for name in models:
        torch.manual_seed(args.seed)
        base = timm.create_model(name, pretrained=False, num_classes=args.num_classes, img_size=args.img_size)
        ref_state = gist_fast.patch(copy.deepcopy(base), fused=False, verbose=False).state_dict()
        gflops = step_gflops(base)
        sample = torch.randn(4, 3, args.img_size, args.img_size,
                             generator=torch.Generator().manual_seed(args.seed + 1)).to(device)
        eager_loss: Dict[int, float] = {}
        for group in _groups(impls, cuda):
            runners: Dict[str, Runner] = {}
            saved = {}
            for batch in batches:
                compiles = not runners and any(impl.endswith("_compile") for impl in group)
                if not deadline.allows(args.compile_seconds if compiles else 0.0):
                    rows += [{"model": name, "impl": impl, "batch": batch, "dtype": dtype, "device": device.type,
                              "skipped": "time budget"} for impl in group]
                    publish()
                    continue
                if not runners:
                    runners = {impl: Runner(impl, build(impl, base, ref_state, device), device, amp_dtype)
                               for impl in group}
                    # hooks miss compiled graphs
                    saved = {impl: gist_fast.activation_bytes(r.model, sample, autocast_dtype=amp_dtype)
                             for impl, r in runners.items() if not impl.endswith("_compile")}
                images, target = _batch(args, batch, device)
                for r in runners.values():
                    r.reset(ref_state)
                losses = {impl: r.loss(images, target, args.seed) for impl, r in runners.items()}
                if "eager" in losses:
                    eager_loss[batch] = losses["eager"]
                timings, peak = _measure(runners, images, target, warmup, steps, device)
                for impl in group:
                    t = statistics.median(timings[impl])
                    row = {
                        "model": name, "impl": impl, "batch": batch, "dtype": dtype, "device": device.type,
                        "step_ms": 1e3 * t, "step_ms_all": [round(1e3 * x, 3) for x in timings[impl]],
                        "images_per_s": batch / t,
                        "peak_mem_mb": peak[impl] / 2**20 if impl in peak else None,
                        "saved_mb_per_image": saved[impl].per_image_mb if impl in saved else None,
                        "loss": losses[impl],
                        "loss_diff_vs_eager": abs(losses[impl] - eager_loss[batch]) if batch in eager_loss else None,
                        "gflop_per_image": gflops,
                        "mfu": (batch * gflops / t / 1e3 / peak_tflops) if (peak_tflops and dtype == "bf16") else None,
                    }
                    rows.append(row)
                    print(f"{name} {impl:18s} b={batch:4d} {row['step_ms']:9.1f} ms  {row['images_per_s']:8.1f} img/s  "
                          f"saved {row['saved_mb_per_image'] or float('nan'):6.2f} MB/img  "
                          f"|dloss| {row['loss_diff_vs_eager'] or 0:.2e}",
                          flush=True)
                publish()
            for impl, r in runners.items():
                found = _max_batch(r, saved.get(impl), budget, args.num_classes, deadline) if budget else None
                if found:
                    for row in rows:
                        if row["model"] == name and row["impl"] == impl and "skipped" not in row:
                            row["max_batch_in_budget"], row["max_batch_how"] = found
                    publish()
            del runners
            if cuda:
                torch.cuda.empty_cache()
    return result


def _measured(rows: List[Dict]) -> List[Dict]:
    return [r for r in rows if "skipped" not in r]


def markdown(result: Dict) -> str:
    env, s = result["environment"], result["settings"]
    lines = [f"# gist-fast bench: {env['device']}", "",
             f"torch {env['torch']}, triton {env['triton']}, timm {env['timm']}, git {env['git_sha']}, {env['date']}; "
             f"dtype {s['dtype']}, median of {s['steps']} timed steps after {s['warmup']} warm-up; "
             f"step = forward + GIST loss + backward + AdamW.", "",
             "| model | impl | batch | step ms | img/s | vs eager | peak MB | saved MB/img | |Δloss| | MFU | "
             f"max batch in {s['memory_budget']} |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    ref = {(r["model"], r["batch"]): r["images_per_s"] for r in _measured(result["rows"]) if r["impl"] == "eager"}

    def f(v, fmt):
        return "" if v is None else format(v, fmt)

    for r in sorted(result["rows"], key=lambda r: (s["models"].index(r["model"]), r["batch"], IMPLS.index(r["impl"]))):
        if "skipped" in r:
            lines.append(f"| {r['model'].replace('_patch16_224', '')} | {r['impl']} | {r['batch']} | "
                         f"skipped: {r['skipped']} |" + " |" * 7)
            continue
        speed = r["images_per_s"] / ref[(r["model"], r["batch"])] if (r["model"], r["batch"]) in ref else None
        mb, how = r.get("max_batch_in_budget"), r.get("max_batch_how", "")
        mb = how if mb is None else f"{mb}{' (est)' if 'estimate' in how else ''}"
        lines.append(f"| {r['model'].replace('_patch16_224', '')} | {r['impl']} | {r['batch']} | {r['step_ms']:.1f} | "
                     f"{r['images_per_s']:.1f} | {f(speed, '.2f')}× | {f(r['peak_mem_mb'], '.0f')} | "
                     f"{f(r['saved_mb_per_image'], '.2f')} | "
                     f"{f(r['loss_diff_vs_eager'], '.1e')} | {f(r['mfu'], '.1%')} | {mb} |")
    return "\n".join(lines) + "\n"


def plots(result: Dict, out: str) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, models = _measured(result["rows"]), result["settings"]["models"]
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    written = []
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, name in zip(axes[0], models):
        for impl in impls:
            pts = sorted((r["batch"], r["images_per_s"]) for r in rows if r["model"] == name and r["impl"] == impl)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_title(name.replace("_patch16_224", ""))
        ax.set_xlabel("batch")
        ax.set_ylabel("images / s")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"training step throughput, {result['environment']['device']}, {result['settings']['dtype']}")
    fig.tight_layout()
    path = os.path.join(out, "bench_throughput.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, name in zip(axes[0], models):
        vals = {}
        for r in rows:
            if r["model"] == name and r["saved_mb_per_image"] is not None:
                vals[r["impl"]] = r["saved_mb_per_image"]
        ax.bar(list(vals), list(vals.values()), color="tab:blue")
        ax.set_title(name.replace("_patch16_224", ""))
        ax.set_ylabel("saved activations, MB / image")
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle("memory autograd keeps between forward and backward")
    fig.tight_layout()
    path = os.path.join(out, "bench_memory.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written


def write_text_atomic(path: str, text: str) -> None:
    """Write through a temporary file, so a run killed mid-write leaves the previous whole file."""
    with open(path + ".tmp", "w") as fh:
        fh.write(text)
    os.replace(path + ".tmp", path)


def write(result: Dict, out: str, with_plots: bool = True) -> List[str]:
    os.makedirs(out, exist_ok=True)
    write_text_atomic(os.path.join(out, "bench.json"), json.dumps(result, indent=1))
    write_text_atomic(os.path.join(out, "bench.md"), markdown(result))
    written = [os.path.join(out, "bench.json"), os.path.join(out, "bench.md")]
    if with_plots:
        written += plots(result, out)
    return written


def main(argv: Optional[List[str]] = None) -> int:
    args = _parse(argv)
    try:
        out = args.out or os.path.join("benchmarks", "results", device_slug(_device(args)))
        result = run(args, on_result=lambda partial: write(partial, out, with_plots=False))
    except (ValueError, OSError) as e:  # a bad option or --out: one line, as gist-fast train does
        print(f"gist-fast bench: error: {e}", file=sys.stderr)
        return 2
    written = write(result, out, with_plots=not args.no_plots)
    print(markdown(result))
    print("wrote " + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
