"""GPU micro-benchmarks of the fused ops, forward + backward, against the eager reference,
torch.compile of it and Liger-Kernel, each beside its memory floor.

    python3 benchmarks/bench_gpu_ops.py [--out DIR] [--time-budget SECONDS] [--rep-ms MS]

Cases (the adapter at ViT-B/16, batch 128: rows 128*198, D 768; the losses at batch 256):
    adapter r4|r64 bf16   ops.adapter_norm with a branch, every tensor bf16
    adapter r4|r64 amp    a timm block under autocast: x (the residual stream without the branch) and
                          the weights fp32, the branch bf16, run under torch.autocast("cuda", bf16)
    gist|distill-kl C10|C100|C1000|C50000   ops.gist_loss, ops.distill_loss(kind="kl"), bf16 logits
Implementations: fused (gist_fast.ops), eager (gist_fast.reference, under the same autocast),
compile (torch.compile of the reference, static shapes) and, for the losses where liger_kernel
imports, liger (its cross-entropy and KL-divergence ops composed into the same loss).

Times are triton.testing.do_bench medians after warm-up steps (compilation and autotuning are
never timed) on random non-zero data. The floor is the bytes a case must move at least over the
copy bandwidth measured in the same run; every time is also given as floor / time.
bench_gpu_ops.json and bench_gpu_ops.md are rewritten in --out after every measurement. The
compiled reference is timed in a second pass, after everything else, so a --time-budget that runs
out costs compile numbers first. Expected on an H100, about 2 minutes: start-up ~15 s, Triton JIT of
the fused and Liger kernels ~20 s, 12 compilations (~15 s for the first, ~5 s each after), ~50
timings of ~0.2 s at --rep-ms 50.
"""
import argparse
import functools
import importlib.metadata
import json
import os
from typing import Callable, Dict, List, NamedTuple

import torch
import torch.nn.functional as F

import gist_fast
from gist_fast import ops, reference
from gist_fast.bench import Deadline, device_slug, environment, write_text_atomic

DEVICE = "cuda"
ROWS, DIM, RANKS = 128 * 198, 768, (4, 64)
LOSS_BATCH, CLASSES = 256, (10, 100, 1000, 50000)
IMPLS = ("fused", "eager", "compile", "liger")
PASSES = (("fused", "eager", "liger"), ("compile",))  # liger last: its cross-entropy overwrites the logits


class Case(NamedTuple):
    name: str
    leaves: List[torch.Tensor]
    impls: Dict[str, Callable]  # fn(*leaves) -> output or tuple of outputs
    autocast: bool
    floor_bytes: Callable  # eager outputs -> bytes the case must move at least


def _adapter(rank: int, amp: bool) -> Case:
    g = torch.Generator(device=DEVICE).manual_seed(rank)
    wide = torch.float32 if amp else torch.bfloat16

    def rnd(*shape, std=1.0, mean=0.0, dtype=wide):
        return (torch.randn(*shape, device=DEVICE, generator=g) * std + mean).to(dtype).requires_grad_()

    x, branch = rnd(ROWS, DIM), rnd(ROWS, DIM, dtype=torch.bfloat16)  # the branch: attention's bf16 output
    leaves = [x, rnd(rank, DIM, std=DIM ** -0.5), rnd(rank, std=0.1), rnd(DIM, rank, std=rank ** -0.5),
              rnd(DIM, std=0.1), rnd(DIM, std=0.1, mean=1.0), rnd(DIM, std=0.1), branch]

    def call(fn):
        return lambda x, wd, bd, wu, bu, nw, nb, branch: fn(x, wd, bd, wu, bu, 0.1, nw, nb, 1e-6, branch=branch)

    def floor_bytes(outs):
        out, normed = outs
        # forward reads x, branch and writes out, normed; backward reads both output gradients, x and
        # out, and writes grad x and grad branch
        return 3 * x.nbytes + 2 * branch.nbytes + 3 * out.nbytes + 2 * normed.nbytes

    eager = call(reference.adapter_norm)
    return Case(f"adapter r{rank} {'amp' if amp else 'bf16'}", leaves,
                {"fused": call(ops.adapter_norm), "eager": eager, "compile": torch.compile(eager, dynamic=False)},
                amp, floor_bytes)


LOSSES = {"gist": (ops.gist_loss, reference.gist_loss),
          "distill-kl": (functools.partial(ops.distill_loss, kind="kl"),
                         functools.partial(reference.distill_loss, kind="kl"))}


def _liger_losses():
    """GistLoss and DistillLoss("kl") from Liger-Kernel's building blocks."""
    from liger_kernel.transformers import LigerCrossEntropyLoss, LigerKLDIVLoss

    # kl(log q, log p) = KL(p||q)
    ce, kl = LigerCrossEntropyLoss(), LigerKLDIVLoss(reduction="batchmean", log_target=True)
    gl, dl = gist_fast.GistLoss(), gist_fast.DistillLoss("kl")

    def log_soft(z, t):
        return F.log_softmax(z.float() / t, -1)

    # the soft targets are taken first: Liger's cross-entropy writes its gradient into the logits
    # (its cost does not depend on the values, so repeated steps still time the same work)
    def gist(a, b, y):
        la, lb = log_soft(a, gl.temperature), log_soft(b, gl.temperature)
        return ce(a, y) + gl.gist_weight * ce(b, y) + gl.kl_weight * (kl(lb, la) + kl(la, lb))

    def distill(s, t, y):
        ls, lt = log_soft(s, dl.temperature), log_soft(t, dl.temperature)
        return ce(s, y) + ce(t, y) + kl(ls, lt)

    return {"gist": gist, "distill-kl": distill}


def _loss(kind: str, classes: int, liger) -> Case:
    g = torch.Generator(device=DEVICE).manual_seed(classes)
    a, b = ((torch.randn(LOSS_BATCH, classes, device=DEVICE, generator=g) * 3).to(torch.bfloat16).requires_grad_()
            for _ in range(2))
    y = torch.randint(0, classes, (LOSS_BATCH,), device=DEVICE, generator=g)
    fused, ref = LOSSES[kind]
    eager = lambda a, b: ref(a, b, y)  # noqa: E731
    impls = {"fused": lambda a, b: fused(a, b, y), "eager": eager, "compile": torch.compile(eager, dynamic=False)}
    if liger is not None:
        impls["liger"] = lambda a, b: liger[kind](a, b, y)
    # read both logit sets, write both gradients
    return Case(f"{kind} C{classes} bf16", [a, b], impls, False, lambda outs: 2 * (a.nbytes + b.nbytes))


def _outputs(fn, case: Case):
    with torch.autocast(DEVICE, torch.bfloat16, enabled=case.autocast):
        outs = fn(*case.leaves)
    return outs if isinstance(outs, tuple) else (outs,)


def _time(fn, case: Case, grads, rep_ms: float) -> float:
    from triton.testing import do_bench

    grads = [g.to(o.dtype) for g, o in zip(grads, _outputs(fn, case))]  # an implementation may differ in output dtype

    def step():
        for t in case.leaves:
            t.grad = None
        torch.autograd.backward(_outputs(fn, case), grads)

    for _ in range(3):  # warm-up: compilation, autotuning and allocator growth stay out of the timing
        step()
    torch.cuda.synchronize()
    return do_bench(step, rep=rep_ms, return_mode="median")


def _copy_bandwidth() -> float:
    """Bytes read + written per second by a 256 MiB device-to-device copy."""
    from triton.testing import do_bench

    src = torch.randn(64 * 2**20, device=DEVICE)
    dst = torch.empty_like(src)
    return 2 * src.nbytes / (do_bench(lambda: dst.copy_(src), rep=100, return_mode="median") * 1e-3)


def _summarize(row: Dict) -> None:
    ms = row["ms"]
    row["fraction_of_floor"] = {k: row["floor_ms"] / v for k, v in ms.items()}
    row["fused_speedup"] = {k: v / ms["fused"] for k, v in ms.items() if k != "fused"} if "fused" in ms else {}


def markdown(report: Dict) -> str:
    env = report["environment"]
    lines = [f"# fused ops, forward + backward: {env['device']}", "",
             f"torch {env['torch']}, triton {env['triton']}, liger-kernel {env['liger_kernel']}, git {env['git_sha']}, "
             f"{env['date']}; triton.testing.do_bench medians (rep {report['settings']['rep_ms']} ms) after warm-up, "
             f"random data. Floor = bytes the case must move / copy bandwidth measured in this run "
             f"({report['copy_bandwidth_GBps']:.0f} GB/s); (n%) = floor / time. fused vs X = X ms / fused ms.", "",
             "| case | floor ms | " + " | ".join(f"{k} ms" for k in IMPLS)
             + " | fused vs eager | vs compile | vs liger |",
             "|---|---:|" + "---:|" * (len(IMPLS) + 3)]
    for row in report["rows"]:
        def cell(impl):
            if impl in row["ms"]:
                return f"{row['ms'][impl]:.3f} ({100 * row['fraction_of_floor'][impl]:.0f}%)"
            if impl in row["errors"]:
                return "error"
            return "skipped" if impl in row["skipped"] else "–"
        speed = [f"{row['fused_speedup'][k]:.2f}×" if k in row["fused_speedup"] else ""
                 for k in ("eager", "compile", "liger")]
        lines.append(f"| {row['case']} | {row['floor_ms']:.3f} | " + " | ".join(map(cell, IMPLS))
                     + f" | {' | '.join(speed)} |")
    errors = [f"- {row['case']} {impl}: {msg}" for row in report["rows"] for impl, msg in row["errors"].items()]
    return "\n".join(lines + ([""] + errors if errors else [])) + "\n"


def write(report: Dict, out: str) -> None:
    for row in report["rows"]:
        _summarize(row)
    write_text_atomic(os.path.join(out, "bench_gpu_ops.json"), json.dumps(report, indent=1))
    write_text_atomic(os.path.join(out, "bench_gpu_ops.md"), markdown(report))


def _measure(case: Case, names, row: Dict, deadline: Deadline, rep_ms: float, publish) -> None:
    """Time the implementations `names` of one case into row, publishing after each."""
    grads = [torch.rand_like(o) + 0.5 for o in _outputs(case.impls["eager"], case)]
    for impl in (n for n in names if n in case.impls):
        if not deadline.allows():
            row["skipped"].append(impl)
            continue
        try:
            row["ms"][impl] = _time(case.impls[impl], case, grads, rep_ms)
            print(f"{case.name:24s} {impl:8s} {row['ms'][impl]:.4f} ms", flush=True)
        except Exception as e:  # recorded: one failing implementation does not cost the others
            row["errors"][impl] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            print(f"{case.name:24s} {impl:8s} {row['errors'][impl]}", flush=True)
        publish()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="output folder (default benchmarks/results/<device>)")
    parser.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                        help="start no measurement after this many seconds; the rest are marked skipped")
    parser.add_argument("--rep-ms", type=float, default=50, help="do_bench's timed window per measurement")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu_ops.py times CUDA kernels and no CUDA device is visible here; "
                         "run it on the GPU machine (benchmarks/README.md)")
    deadline = Deadline(args.time_budget)
    device = torch.device(DEVICE)
    out = args.out or os.path.join("benchmarks", "results", device_slug(device))
    os.makedirs(out, exist_ok=True)
    try:
        liger, liger_version = _liger_losses(), importlib.metadata.version("liger-kernel")
    except Exception as e:  # not installed, or not working with this torch / triton
        liger, liger_version = None, f"unavailable ({type(e).__name__}: {e})"[:200]
    builders = [functools.partial(_adapter, rank, amp) for amp in (False, True) for rank in RANKS]
    builders += [functools.partial(_loss, kind, classes, liger) for kind in LOSSES for classes in CLASSES]
    bandwidth = _copy_bandwidth()
    report = {"environment": {**environment(device), "liger_kernel": liger_version},
              "copy_bandwidth_GBps": bandwidth / 1e9,
              "settings": {"rep_ms": args.rep_ms, "time_budget_s": args.time_budget}, "rows": []}
    rows: Dict[str, Dict] = {}
    for names in PASSES:
        for build in builders:
            torch._dynamo.reset()  # each case compiles afresh: static shapes, no recompilation limit
            case = build()
            if case.name not in rows:
                floor = case.floor_bytes(_outputs(case.impls["eager"], case))
                rows[case.name] = {"case": case.name, "floor_bytes": floor, "floor_ms": floor / bandwidth * 1e3,
                                   "ms": {}, "errors": {}, "skipped": []}
                report["rows"].append(rows[case.name])
            _measure(case, names, rows[case.name], deadline, args.rep_ms, lambda: write(report, out))
    write(report, out)
    print(markdown(report))


if __name__ == "__main__":
    main()
