"""GPU micro-benchmarks of the fused ops (triton.testing.do_bench medians), side by side with the
eager reference, torch.compile of the reference and, for the loss, Liger-Kernel's cross-entropy +
KL where liger_kernel is importable. Each fused time is also reported as a fraction of its
memory floor: bytes it must move / the copy bandwidth measured in the same run.

    python3 benchmarks/bench_gpu_ops.py --out benchmarks/results/<device>
"""
import argparse
import json
import os

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from gist_fast import ops, reference
from gist_fast.bench import device_slug, environment

ROWS, DIM = 128 * 198, 768  # ViT-B/16, batch 128


def _copy_bandwidth() -> float:
    src = torch.randn(256 * 2**20 // 4, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / (do_bench(lambda: dst.copy_(src), rep=200) * 1e-3)


def _fwd_bwd(fn, leaves, grads):
    def step():
        for t in leaves:
            t.grad = None
        outs = fn(*leaves)
        torch.autograd.backward(list(outs) if isinstance(outs, tuple) else [outs], grads)
    return step


def _time(step) -> float:
    for _ in range(3):  # warm-up: compilation and autotuning stay out of the timing
        step()
    return do_bench(step, rep=300)


def adapter_cases(dtype):
    for rank in (4, 64):
        g = torch.Generator(device="cuda").manual_seed(rank)
        rnd = lambda *s, std=1.0: (torch.randn(*s, device="cuda", generator=g) * std).to(dtype).requires_grad_()
        x, branch = rnd(ROWS, DIM), rnd(ROWS, DIM)
        wd, bd, wu, bu = rnd(rank, DIM, std=DIM ** -0.5), rnd(rank, std=0.1), rnd(DIM, rank, std=rank ** -0.5), rnd(DIM, std=0.1)
        nw, nb = rnd(DIM, std=0.1), rnd(DIM, std=0.1)
        leaves = [x, wd, bd, wu, bu, branch, nw, nb]
        grads = [torch.randn(ROWS, DIM, device="cuda", dtype=dtype) for _ in range(2)]
        fused = lambda *t: ops.adapter_norm(*t[:5], 0.1, t[6], t[7], 1e-6, branch=t[5])
        ref = lambda *t: reference.adapter_norm(*t[:5], 0.1, t[6], t[7], 1e-6, branch=t[5])
        # fwd reads x, branch and writes out, normed; bwd reads 2 grads, x, out and writes grad_x, grad_branch
        floor_bytes = 10 * ROWS * DIM * x.element_size()
        yield f"adapter+norm r{rank} {str(dtype)[6:]}", leaves, grads, {"fused": fused, "eager": ref,
                                                                       "compile": torch.compile(ref)}, floor_bytes


def _liger_gist_loss():
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss, LigerKLDIVLoss
    except ImportError:
        return None
    ce, kl = LigerCrossEntropyLoss(), LigerKLDIVLoss(reduction="batchmean", log_target=True)

    def loss(a, b, y, T=3.0):
        la, lb = F.log_softmax(a.float() / T, -1), F.log_softmax(b.float() / T, -1)
        return ce(a, y) + 0.5 * ce(b, y) + 0.75 * (kl(lb, la) + kl(la, lb))  # kl(input=log q, target=log p) = KL(p||q)
    return loss


def loss_cases(dtype):
    liger = _liger_gist_loss()
    for batch, classes in ((256, 1000), (256, 5000), (128, 32000)):
        a, b = (torch.randn(batch, classes, device="cuda").mul(3).to(dtype).requires_grad_() for _ in range(2))
        y = torch.randint(0, classes, (batch,), device="cuda")
        impls = {"fused": lambda a, b: ops.gist_loss(a, b, y), "eager": lambda a, b: reference.gist_loss(a, b, y)}
        impls["compile"] = torch.compile(impls["eager"])
        if liger is not None:
            impls["liger"] = lambda a, b: liger(a, b, y)
        floor_bytes = 4 * batch * classes * a.element_size()  # read both logit sets, write both gradients
        yield f"gist_loss B{batch} C{classes} {str(dtype)[6:]}", [a, b], [torch.tensor(1.3, device="cuda")], impls, floor_bytes


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device("cuda")
    out = args.out or os.path.join("benchmarks", "results", device_slug(device))
    os.makedirs(out, exist_ok=True)
    bandwidth = _copy_bandwidth()
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        for name, leaves, grads, impls, floor_bytes in [*adapter_cases(dtype), *loss_cases(dtype)]:
            ms = {impl: _time(_fwd_bwd(fn, leaves, grads)) for impl, fn in impls.items()}
            floor_ms = floor_bytes / bandwidth * 1e3
            rows.append({"case": name, "ms": ms, "floor_ms": floor_ms, "fraction_of_floor": floor_ms / ms["fused"],
                         **{f"speedup_vs_{k}": v / ms["fused"] for k, v in ms.items() if k != "fused"}})
            print(json.dumps(rows[-1]), flush=True)
    env = environment(device)
    with open(os.path.join(out, "bench_gpu_ops.json"), "w") as f:
        json.dump({"environment": env, "copy_bandwidth_GBps": bandwidth / 1e9, "rows": rows}, f, indent=1)
    lines = [f"# fused ops, forward + backward, {env['device']}: measured copy bandwidth {bandwidth / 1e9:.0f} GB/s",
             "", f"torch {env['torch']}, triton {env['triton']}, git {env['git_sha']}, {env['date']}; do_bench medians", "",
             "| case | fused ms | eager ms | compile ms | liger ms | vs eager | vs compile | of memory floor |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ms = {k: f"{r['ms'][k]:.3f}" if k in r["ms"] else "–" for k in ("fused", "eager", "compile", "liger")}
        lines.append(f"| {r['case']} | {' | '.join(ms.values())} | {r['speedup_vs_eager']:.2f}× | "
                     f"{r['speedup_vs_compile']:.2f}× | {100 * r['fraction_of_floor']:.0f}% |")
    with open(os.path.join(out, "bench_gpu_ops.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
