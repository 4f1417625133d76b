"""Op micro-benchmarks, CPU or CUDA: the fused ops against the eager reference, torch.compile of it and,
for the losses on CUDA, Liger-Kernel; forward, backward and both, through the benchmark harness
(gist_fast.bench_harness): rows appended to <out>/results.csv, ops.md redrawn after every
measurement, ops_<op>.png at the end (gist_fast.bench_report; benchmarks/plot.py redraws them).

    python benchmarks/bench_ops.py [--device cpu|cuda] [--ops adapter,gist_loss,distill_loss,scale_shift,lora_qv]
        [--providers gist_fast,eager,compile,liger] [--modes forward,backward,full] [--xs 1584,6336]
        [--threads N] [--rep-ms 100] [--time-budget SECONDS] [--out DIR] [--no-plots]

One setup_<op>(provider, x, config, device) per op builds its inputs (random, non-zero, the same for
every provider) and one call of the op; the harness times three modes of it:
    forward    the call, building the autograd graph (inputs require grad)
    backward   backward through one retained graph (upstream gradient 1 for a loss, random otherwise)
    full       forward + backward
Cases (x is swept; the rest is the config):
    adapter       gist_fast.ops.adapter_norm with a branch (a GIST block's x + attn + A(x), then norm2) at
                  D 768 (ViT-B), rank 4 and 64; x = rows = batch x 198 tokens. CPU: fp32 and bf16 tensors;
                  CUDA: bf16 tensors, and "amp" (x and weights fp32, branch bf16, under bf16 autocast)
    gist_loss     gist_fast.ops.gist_loss at batch 256; x = classes. CPU fp32, CUDA bf16 logits
    distill_loss  gist_fast.ops.distill_loss(kind="kl"), as gist_loss
    scale_shift   gist_fast.ops.scale_shift (SSF) at D 768 (after norm1, proj, fc2, norm2) and, with the GELU,
                  3072 (after fc1); x = rows. CPU: fp32; CUDA: bf16 tensors, and "amp" (x bf16, scale and shift
                  fp32, as under bf16 autocast)
    lora_qv       gist_fast.ops.lora_qv on ViT-B's qkv (D 768, 12 heads of 64) at rank 4 and 64; x = rows. CPU:
                  fp32; CUDA: bf16 tensors, and "amp" (qkv bf16, factors fp32, under bf16 autocast)
Providers: gist_fast (the public op: C++ on CPU, Triton on CUDA), eager (gist_fast.reference), compile
(torch.compile of the reference, static shapes, compiled during warm-up), liger (CUDA losses: Liger's
cross-entropy and KL ops composed into the same loss, when liger_kernel imports). On CUDA the memory
floor (bytes the op must move / the device-to-device copy bandwidth measured in the run) is a provider
of its own ("floor"), and the peak memory of a full call above its inputs is recorded. The compiled
reference runs in a second pass, so a --time-budget that runs out costs compile numbers first.
Expected: CPU about 5 minutes on 2 cores (most of it compiling); an H100 about 2 minutes.
"""
import dataclasses
import functools
import importlib.metadata
import importlib.util
import sys
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

import gist_fast
from gist_fast import bench_harness as harness
from gist_fast import bench_report, ops, reference
from gist_fast.bench_harness import Row, make_row
from gist_fast.ops import _backend

PROVIDERS = ("gist_fast", "eager", "compile", "liger")
PASSES = (("gist_fast", "eager", "liger"), ("compile",))
MODES = ("forward", "backward", "full")
TOKENS, DIM = 198, 768  # ViT-B/16 at 224: 196 patches + class + Gist token


@dataclasses.dataclass
class OpCase:
    forward: Callable[[], object]  # one call of the op on its inputs: a tensor or a tuple of tensors
    leaves: List[torch.Tensor]  # the inputs that take gradients
    floor_bytes: Dict[str, int]  # mode -> bytes any implementation must move at least


class NotApplicable(Exception):
    """A provider that has no implementation of an op (Liger has no adapter)."""


def _randn(g: torch.Generator, *shape, std=1.0, mean=0.0, dtype=torch.float32) -> torch.Tensor:
    return (torch.randn(*shape, device=g.device, generator=g) * std + mean).to(dtype).requires_grad_()


def _compiled(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=False)


def setup_adapter(provider: str, rows: int, config: Dict, device: torch.device) -> OpCase:
    """adapter_norm(x, ..., branch): the fused GIST block's adapter, its residuals and the next LayerNorm."""
    dim, rank, amp = int(config["D"]), int(config["rank"]), config["dtype"] == "amp"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "amp": torch.float32}[config["dtype"]]
    g = torch.Generator(device=device).manual_seed(rank)
    x, branch = _randn(g, rows, dim, dtype=dtype), _randn(g, rows, dim, dtype=torch.bfloat16 if amp else dtype)
    weights = [_randn(g, rank, dim, std=dim ** -0.5, dtype=dtype), _randn(g, rank, std=0.1, dtype=dtype),
               _randn(g, dim, rank, std=rank ** -0.5, dtype=dtype), _randn(g, dim, std=0.1, dtype=dtype),
               _randn(g, dim, std=0.1, mean=1.0, dtype=dtype), _randn(g, dim, std=0.1, dtype=dtype)]
    impl = {"gist_fast": ops.adapter_norm, "eager": reference.adapter_norm,
            "compile": _compiled(reference.adapter_norm)}.get(provider)
    if impl is None:
        raise NotApplicable(provider)

    def forward():
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            wd, bd, wu, bu, nw, nb = weights
            return impl(x, wd, bd, wu, bu, 0.1, nw, nb, 1e-6, branch=branch)

    out_bytes = rows * dim * torch.promote_types(x.dtype, branch.dtype).itemsize  # out and normed, each
    fwd = x.nbytes + branch.nbytes + 2 * out_bytes  # read x, branch; write out, normed
    bwd = 2 * out_bytes + x.nbytes + out_bytes + x.nbytes + branch.nbytes  # read both grads, x, out; write dx, dbranch
    return OpCase(forward, [x, branch, *weights], {"forward": fwd, "backward": bwd, "full": fwd + bwd})


def _liger_losses() -> Dict[str, Callable]:
    """GistLoss and DistillLoss("kl") from Liger-Kernel's cross-entropy and KL-divergence ops."""
    from liger_kernel.transformers import LigerCrossEntropyLoss, LigerKLDIVLoss

    # kl(log q, log p) = KL(p||q)
    ce, kl = LigerCrossEntropyLoss(), LigerKLDIVLoss(reduction="batchmean", log_target=True)
    gl, dl = gist_fast.GistLoss(), gist_fast.DistillLoss("kl")

    def log_soft(z, t):
        return F.log_softmax(z.float() / t, -1)

    # soft targets first: Liger's cross-entropy writes its gradient into the logits (its cost does not
    # depend on the values, so repeated calls time the same work)
    def gist(a, b, y):
        la, lb = log_soft(a, gl.temperature), log_soft(b, gl.temperature)
        return ce(a, y) + gl.gist_weight * ce(b, y) + gl.kl_weight * (kl(lb, la) + kl(la, lb))

    def distill(s, t, y):
        ls, lt = log_soft(s, dl.temperature), log_soft(t, dl.temperature)
        return ce(s, y) + ce(t, y) + kl(ls, lt)

    return {"gist_loss": gist, "distill_loss": distill}


LOSSES = {"gist_loss": (ops.gist_loss, reference.gist_loss),
          "distill_loss": (functools.partial(ops.distill_loss, kind="kl"),
                           functools.partial(reference.distill_loss, kind="kl"))}


def _setup_loss(op: str, provider: str, classes: int, config: Dict, device: torch.device) -> OpCase:
    batch, dtype = int(config["B"]), {"fp32": torch.float32, "bf16": torch.bfloat16}[config["dtype"]]
    g = torch.Generator(device=device).manual_seed(classes)
    a, b = _randn(g, batch, classes, std=3.0, dtype=dtype), _randn(g, batch, classes, std=3.0, dtype=dtype)
    y = torch.randint(0, classes, (batch,), device=device, generator=g)
    fused, ref = LOSSES[op]
    if provider == "liger":
        if device.type != "cuda" or _LIGER[0] is None:
            raise NotApplicable(provider)
        impl = _LIGER[0][op]
    else:
        impl = {"gist_fast": fused, "eager": ref, "compile": _compiled(ref)}[provider]
    io = a.nbytes + b.nbytes
    return OpCase(lambda: impl(a, b, y), [a, b], {"forward": io, "backward": io, "full": 2 * io})  # read; write grads


def setup_scale_shift(provider: str, rows: int, config: Dict, device: torch.device) -> OpCase:
    """scale_shift(x, γ, β, gelu): SSF at one site of a block."""
    dim, gelu, amp = int(config["D"]), bool(config["gelu"]), config["dtype"] == "amp"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "amp": torch.bfloat16}[config["dtype"]]
    g = torch.Generator(device=device).manual_seed(dim)
    x = _randn(g, rows, dim, dtype=dtype)
    params = [_randn(g, dim, std=0.02, mean=1.0, dtype=torch.float32 if amp else dtype),
              _randn(g, dim, std=0.02, dtype=torch.float32 if amp else dtype)]
    impl = {"gist_fast": ops.scale_shift, "eager": reference.scale_shift,
            "compile": _compiled(reference.scale_shift)}.get(provider)
    if impl is None:
        raise NotApplicable(provider)

    io = x.nbytes  # x read; out written in x's dtype
    return OpCase(lambda: impl(x, *params, gelu), [x, *params],
                  {"forward": 2 * io, "backward": 3 * io, "full": 5 * io})  # bwd: read g, x; write dx


def setup_lora_qv(provider: str, rows: int, config: Dict, device: torch.device) -> OpCase:
    """lora_qv(qkv, down_q, up_q, down_v, up_v, 1.0, heads): the per-head LoRA after a block's qkv Linear."""
    dim, heads, rank, amp = int(config["D"]), int(config["heads"]), int(config["rank"]), config["dtype"] == "amp"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "amp": torch.bfloat16}[config["dtype"]]
    head_dim, factor_dtype = dim // heads, torch.float32 if amp else dtype
    g = torch.Generator(device=device).manual_seed(rank)
    qkv = _randn(g, rows, 3 * dim, dtype=dtype)
    factors = [t for _ in "qv" for t in (_randn(g, rank, head_dim, std=head_dim ** -0.5, dtype=factor_dtype),
                                        _randn(g, head_dim, rank, std=rank ** -0.5, dtype=factor_dtype))]
    impl = {"gist_fast": ops.lora_qv, "eager": reference.lora_qv,
            "compile": _compiled(reference.lora_qv)}.get(provider)
    if impl is None:
        raise NotApplicable(provider)

    def forward():
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            return impl(qkv, *factors, 1.0, heads)

    io = qkv.nbytes  # qkv read; out written in qkv's layout and dtype
    return OpCase(forward, [qkv, *factors], {"forward": 2 * io, "backward": 3 * io, "full": 5 * io})


setup_gist_loss = functools.partial(_setup_loss, "gist_loss")
setup_distill_loss = functools.partial(_setup_loss, "distill_loss")
_LIGER: List[Optional[Dict[str, Callable]]] = [None, "not loaded"]  # (losses, version or why not)


@dataclasses.dataclass
class OpSpec:
    setup: Callable[[str, int, Dict, torch.device], OpCase]
    x_name: str
    xs: Dict[str, Sequence[int]]  # device type -> sizes swept
    configs: Dict[str, List[Dict]]  # device type -> configurations


OPS = {
    "adapter": OpSpec(setup_adapter, "rows", {"cpu": (8 * TOKENS, 32 * TOKENS), "cuda": (64 * TOKENS, 256 * TOKENS)},
                      {dev: [{"D": DIM, "rank": r, "dtype": d} for d in dtypes for r in (4, 64)]
                       for dev, dtypes in (("cpu", ("fp32", "bf16")), ("cuda", ("bf16", "amp")))}),
    "gist_loss": OpSpec(setup_gist_loss, "classes", {"cpu": (10, 100, 1000, 5000), "cuda": (10, 100, 1000, 50000)},
                        {"cpu": [{"B": 256, "dtype": "fp32"}], "cuda": [{"B": 256, "dtype": "bf16"}]}),
    "distill_loss": OpSpec(setup_distill_loss, "classes",
                           {"cpu": (10, 100, 1000, 5000), "cuda": (10, 100, 1000, 50000)},
                           {"cpu": [{"B": 256, "kind": "kl", "dtype": "fp32"}],
                            "cuda": [{"B": 256, "kind": "kl", "dtype": "bf16"}]}),
    "scale_shift": OpSpec(setup_scale_shift, "rows",
                          {"cpu": (8 * TOKENS, 32 * TOKENS), "cuda": (64 * TOKENS, 256 * TOKENS)},
                          {dev: [{"D": d, "gelu": gelu, "dtype": t} for t in dtypes
                                 for d, gelu in ((DIM, False), (4 * DIM, True))]
                           for dev, dtypes in (("cpu", ("fp32",)), ("cuda", ("bf16", "amp")))}),
    "lora_qv": OpSpec(setup_lora_qv, "rows", {"cpu": (8 * TOKENS, 32 * TOKENS), "cuda": (64 * TOKENS, 256 * TOKENS)},
                      {dev: [{"D": DIM, "heads": 12, "rank": r, "dtype": t} for t in dtypes for r in (4, 64)]
                       for dev, dtypes in (("cpu", ("fp32",)), ("cuda", ("bf16", "amp")))}),
}


def _as_tuple(outs) -> tuple:
    return outs if isinstance(outs, tuple) else (outs,)


def op_modes(case: OpCase) -> Dict[str, Callable[[], None]]:
    """forward, backward (through one retained graph) and full, as functions of no arguments."""
    kept = _as_tuple(case.forward())
    grads = [torch.ones_like(o) if o.dim() == 0 else torch.rand_like(o) + 0.5 for o in kept]

    def backward():
        torch.autograd.backward(kept, grads, retain_graph=True)

    def full():
        torch.autograd.backward(_as_tuple(case.forward()), grads)

    return {"forward": case.forward, "backward": backward, "full": full}


def _gist_fast_missing(device: torch.device) -> Optional[str]:
    """Why the gist_fast provider would not run a fused kernel here, or None."""
    if device.type == "cpu" and not _backend.HAS_CPP:
        return "skipped: gist_fast._C not built (the op would run its plain-torch contract)"
    if device.type == "cuda" and not _backend.HAS_TRITON:
        return "skipped: triton not installed (the op would run its plain-torch contract)"
    return None


@dataclasses.dataclass
class Plan:
    device: torch.device
    ops: List[str]
    providers: List[str]
    modes: List[str]
    xs: Optional[List[int]]  # None: each op's sweep for the device
    rep_ms: float
    deadline: harness.Deadline
    env: Dict[str, str]
    emit: Callable[[List[Row]], None]
    bandwidth: Optional[float] = None  # bytes / s of a device copy (CUDA: the floor's denominator)


def _error(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"error: {type(e).__name__}: {text}"[:240]


def _setups(plan: Plan, op: str, config: Dict, x: int, providers: Sequence[str]):
    """The providers' cases and modes, each run once (compilation, and a first backward) so a provider
    that fails is recorded and left out; (cases, modes, rows of those left out)."""
    spec, cases, modes, rows = OPS[op], {}, {}, []

    def note_rows(provider, note):
        return [make_row(plan.env, op, provider, mode, "ms", spec.x_name, x, config, None, note=note)
                for mode in plan.modes]

    for p in providers:
        missing = _gist_fast_missing(plan.device) if p == "gist_fast" else None
        if missing or not plan.deadline.allows():
            rows += note_rows(p, missing or "skipped: time budget")
            continue
        try:
            case = spec.setup(p, x, config, plan.device)
            m = op_modes(case)
            m["backward"]()
            m["full"]()
        except NotApplicable:
            continue
        except Exception as e:  # recorded: one failing provider does not cost the others
            rows += note_rows(p, _error(e))
            print(f"{op} {config} {x} {p}: {_error(e)}", flush=True)
            continue
        cases[p], modes[p] = case, m
    return cases, modes, rows


def _point(plan: Plan, op: str, config: Dict, x: int, providers: Sequence[str], with_floor: bool) -> List[Row]:
    """Every mode of one (op, config, x) for `providers`, timed side by side."""
    spec = OPS[op]
    cases, modes, rows = _setups(plan, op, config, x, providers)

    def row(provider, mode, metric, value, method="", note=""):
        return make_row(plan.env, op, provider, mode, metric, spec.x_name, x, config, value, method, note)

    for mode in plan.modes:
        if not cases:
            break
        if not plan.deadline.allows():
            rows += [row(p, mode, "ms", None, note="skipped: time budget") for p in cases]
            continue
        timings = harness.measure({p: m[mode] for p, m in modes.items()}, plan.device, rep_ms=plan.rep_ms,
                                  grad_to_none={p: c.leaves for p, c in cases.items()})
        for p, t in timings.items():
            rows.append(row(p, mode, "ms", t, note=f"liger-kernel {_LIGER[1]}" if p == "liger" else ""))
            print(f"{op:13s} {spec.x_name}={x:<6d} {harness.config_str(config):28s} {mode:8s} {p:9s} "
                  f"{t.p50:9.4f} ms", flush=True)
        if with_floor and plan.bandwidth:
            floor = next(iter(cases.values())).floor_bytes[mode]
            rows.append(row("floor", mode, "ms", floor / plan.bandwidth * 1e3,
                            f"{floor} bytes / {plan.bandwidth / 1e9:.0f} GB/s measured copy bandwidth"))
        if mode == "full" and plan.device.type == "cuda":
            for p, m in modes.items():
                peak, before = harness.peak_memory_mb(m["full"], plan.device)
                rows.append(row(p, mode, "peak_MB", peak - before, "torch.cuda.max_memory_allocated above the inputs"))
    return rows


def copy_bandwidth(device: torch.device) -> float:
    """Bytes read + written per second by a 256 MiB device-to-device copy."""
    src = torch.randn(64 * 2**20, device=device)
    dst = torch.empty_like(src)
    t = harness.measure({"copy": lambda: dst.copy_(src)}, device, rep_ms=100)["copy"]
    return 2 * src.nbytes / (t.p50 * 1e-3)


def run(plan: Plan) -> None:
    """Every (pass, op, config, x): the compiled reference in a second pass, after everything else."""
    dev = plan.device.type
    if plan.bandwidth:
        plan.emit([make_row(plan.env, "copy", "torch", "full", "GB_per_s", "MiB", 256, {},
                            plan.bandwidth / 1e9, "device-to-device copy, read + written bytes")])
    for names in PASSES:
        providers = [p for p in names if p in plan.providers]
        if not providers:
            continue
        for op in plan.ops:
            for config in OPS[op].configs[dev]:
                for x in plan.xs or OPS[op].xs[dev]:
                    torch._dynamo.reset()  # each case compiles afresh: static shapes, no recompilation limit
                    plan.emit(_point(plan, op, config, x, providers, with_floor=names is PASSES[0]))


def _choose(text: Optional[str], allowed: Sequence[str], option: str) -> List[str]:
    chosen = text.split(",") if text else list(allowed)
    unknown = [c for c in chosen if c not in allowed]
    if unknown:
        raise ValueError(f"{option} {','.join(unknown)}: choose from {','.join(allowed)}")
    return chosen


def _parse(argv: Optional[List[str]]):
    p = harness.Parser(prog="bench_ops.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--ops", default=None, help=f"comma list of {','.join(OPS)} (default: all)")
    p.add_argument("--providers", default=None, help=f"comma list of {','.join(PROVIDERS)} (default: all)")
    p.add_argument("--modes", default=None, help=f"comma list of {','.join(MODES)} (default: all)")
    p.add_argument("--xs", default=None, help="comma list of sizes replacing every op's sweep (smoke tests)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU (default: torch's; "
                   "1 is steadier on a loaded machine)")
    p.add_argument("--rep-ms", type=float, default=100.0, help="timed window per measurement (ms)")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="start no measurement after this many seconds; the rest are recorded as skipped")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results/<device>); "
                   "rows are appended to its results.csv")
    p.add_argument("--no-plots", action="store_true", help="write ops.md but no PNGs")
    return p.parse_args(argv)


def _plan(args, device: torch.device, emit) -> Plan:
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads {args.threads}: expected >= 1")
    xs = harness.positive_ints(args.xs, "--xs") if args.xs else None
    providers = _choose(args.providers, PROVIDERS, "--providers")
    if "liger" in providers and device.type == "cuda":
        try:
            _LIGER[:] = [_liger_losses(), importlib.metadata.version("liger-kernel")]
        except Exception as e:  # not installed, or not working with this torch / triton
            _LIGER[:] = [None, f"unavailable ({type(e).__name__})"]
            print(f"liger-kernel {_LIGER[1]}: {e}"[:300], flush=True)
    return Plan(device, _choose(args.ops, tuple(OPS), "--ops"), providers, _choose(args.modes, MODES, "--modes"), xs,
                args.rep_ms, harness.Deadline(args.time_budget), harness.environment(device), emit,
                copy_bandwidth(device) if device.type == "cuda" else None)


def main(argv: Optional[List[str]] = None) -> int:
    """0 when done; 2 (one line on stderr) on a bad option or --out."""
    return harness.run_cli("bench_ops.py", lambda: _main(argv))


def _main(argv: Optional[List[str]]) -> int:
    args = _parse(argv)
    device = harness.device(args.device)
    out = args.out or harness.results_dir(device)
    _, emit = bench_report.results_sink(out)
    plan = _plan(args, device, emit)
    if args.threads:
        torch.set_num_threads(args.threads)
        plan.env = harness.environment(device)  # the device name counts the threads
    run(plan)
    print("wrote " + ", ".join(bench_report.write_reports(out, plots=not args.no_plots)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
