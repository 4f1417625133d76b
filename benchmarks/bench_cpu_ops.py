"""CPU micro-benchmarks: the C++ ops of gist_fast._C against gist_fast.reference (eager autograd).

    .venv/bin/python -m pytest benchmarks/bench_cpu_ops.py --benchmark-enable -q \
        [--benchmark-json=benchmarks/results/cpu/ops.json]
    .venv/bin/python benchmarks/ops_table.py benchmarks/results/cpu/ops.json   (markdown table with the ratios)
    GIST_FAST_BENCH_COMPILE=1 ...   also times torch.compile(reference) (compiled during warm-up)
    GIST_FAST_BENCH_THREADS=1 ...   pins torch's intra-op threads (on a loaded shared host, 1 is steadier)

Every case times forward + backward with random non-zero inputs and upstream gradients; groups are
per shape, so pytest-benchmark's table compares the implementations side by side (read the ratios
from the medians). Nothing is compiled inside the timed region.
"""
import os

import pytest
import torch

from gist_fast import ops
from gist_fast.ops import _backend

COMPILE = os.environ.get("GIST_FAST_BENCH_COMPILE", "0") == "1"
if os.environ.get("GIST_FAST_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["GIST_FAST_BENCH_THREADS"]))
IMPLS = ["cpp", "reference"] + (["compiled"] if COMPILE else [])
ADAPTER_SHAPES = [(32 * 198, 768, 4), (32 * 198, 768, 64)]  # rows = batch 32 x 198 tokens, D, rank
LOSS_SHAPES = [(64, 100), (64, 1000), (256, 1000), (256, 5000)]
_compiled = {}


def _runner(impl, fn):
    """fn run on the chosen implementation: the C++ op, eager reference, or torch.compile(reference)."""
    if impl == "cpp":
        if not _backend.HAS_CPP:
            pytest.skip("gist_fast._C not built")

        def run(*args):
            with _backend.force("cpp"):
                return fn(*args)

        return run
    if impl == "compiled":
        return _compiled.setdefault(fn, torch.compile(fn))
    def run(*args):
        with _backend.force("reference"):
            return fn(*args)

    return run


def _fwd_bwd(run, leaves, grads):
    def step():
        for t in leaves:
            t.grad = None
        outs = run(*leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.backward(list(outs), grads)

    for _ in range(3):  # warm-up (and compilation for torch.compile)
        step()
    return step


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", ADAPTER_SHAPES, ids=lambda s: "rows{}-D{}-r{}".format(*s))
def test_adapter_gist_fwd_bwd(benchmark, impl, dtype, shape):
    """The GIST block's x + attn + A(x): adapter with the attention output as branch."""
    rows, dim, rank = shape
    benchmark.group = f"adapter {dtype} rows={rows} D={dim} r={rank}"
    g = torch.Generator().manual_seed(0)
    x, branch, grad = (torch.randn(rows, dim, generator=g).to(dtype) for _ in range(3))
    weights = [torch.randn(rank, dim, generator=g) * 0.02, torch.randn(rank, generator=g) * 0.1,
               torch.randn(dim, rank, generator=g) * 0.02, torch.randn(dim, generator=g) * 0.1]
    leaves = [x.requires_grad_()] + [w.to(dtype).requires_grad_() for w in weights]
    run = _runner(impl, lambda x, wd, bd, wu, bu: ops.adapter(x, wd, bd, wu, bu, 0.1, branch=branch))
    benchmark(_fwd_bwd(run, leaves, [grad]))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", LOSS_SHAPES, ids=lambda s: "B{}-C{}".format(*s))
@pytest.mark.parametrize("loss", ["gist", "distill-kl"])
def test_loss_fwd_bwd(benchmark, impl, shape, loss):
    batch, classes = shape
    benchmark.group = f"{loss} loss fp32 B={batch} C={classes}"
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(batch, classes, generator=g) * 2 for _ in range(2))
    target = torch.randint(0, classes, (batch,), generator=g)
    if loss == "gist":
        fn = lambda a, b: ops.gist_loss(a, b, target)  # noqa: E731
    else:
        fn = lambda a, b: ops.distill_loss(a, b, target, "kl", 5.0)  # noqa: E731
    run = _runner(impl, fn)
    benchmark(_fwd_bwd(run, [a.requires_grad_(), b.requires_grad_()], [torch.tensor(1.3)]))
