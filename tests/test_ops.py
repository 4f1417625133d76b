"""Fused ops against gist_fast.reference (same dtype and float64), on every implementation this machine has."""
import contextlib
import subprocess
import sys

import pytest
import torch

from backends import BACKENDS, CPP_OPS, OPS, has_kernel, use_backend
from backends import device as _device
from gist_fast import ops, reference
from gist_fast.ops import _backend
from oracle import assert_oracle

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _run(fn, inputs, grads, backend=None):
    """Forward + backward with the given upstream gradients; returns outputs and input gradients."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) if t is not None else None for t in inputs]
    with use_backend(backend) if backend else contextlib.nullcontext():  # the backward too runs on `backend`
        outs = fn(*leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.backward(list(outs), [g.to(o.dtype) for o, g in zip(outs, grads)])
    return [o.detach() for o in outs], [t.grad if t is not None and t.requires_grad else None for t in leaves]


def _check_against_reference(ours_fn, ref_fn, inputs, grads, backend, dtype, names):
    ours = _run(ours_fn, inputs, grads, backend)
    ref = _run(ref_fn, inputs, grads)
    exact = _run(ref_fn, [t.double() if t is not None and t.is_floating_point() else t for t in inputs],
                 [g.double() for g in grads])
    for kind, (o_list, r_list, e_list) in (("out", (ours[0], ref[0], exact[0])), ("grad", (ours[1], ref[1], exact[1]))):
        for i, (o, r, e) in enumerate(zip(o_list, r_list, e_list)):
            if e is None:
                continue
            assert o is not None, f"{kind} {names[kind][i]} missing"
            assert_oracle(o, r, e, f"{backend} {dtype} {kind} {names[kind][i]}", dtype)


# ---------------------------------------------------------------- adapter
ADAPTER_SHAPES = [(1, 32, 1), (198, 384, 4), (37, 1000, 8), (65, 768, 64)]
ADAPTER_SHAPES_LARGE = [(3001, 768, 4), (129, 8192, 16)]
VARIANTS = ["seq", "gist", "base", "norm"]
ADAPTER_NAMES = {"out": ["out", "normed"],
                 "grad": ["x", "w_down", "b_down", "w_up", "b_up", "base", "branch", "norm_w", "norm_b"]}


def _adapter_inputs(rows, dim, rank, dtype, variant, device, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dtype)

    x = rnd(2, rows, dim) if rows > 1 else rnd(rows, dim)  # a leading batch dim when there is room
    base = rnd(*x.shape) if variant == "base" else None
    branch = rnd(*x.shape) if variant in ("gist", "base", "norm") else None
    norm = (1 + rnd(dim, std=0.1), rnd(dim, std=0.1)) if variant == "norm" else (None, None)
    return [x, rnd(rank, dim, std=dim ** -0.5), rnd(rank, std=0.1), rnd(dim, rank, std=rank ** -0.5), rnd(dim, std=0.1),
            base, branch, *norm]


def _adapter_fns(variant, scale=0.1, eps=1e-6):
    if variant == "norm":
        return (lambda x, wd, bd, wu, bu, base, br, nw, nb:
                    ops.adapter_norm(x, wd, bd, wu, bu, scale, nw, nb, eps, base, br),
                lambda x, wd, bd, wu, bu, base, br, nw, nb:
                    reference.adapter_norm(x, wd, bd, wu, bu, scale, nw, nb, eps, base, br))
    return (lambda x, wd, bd, wu, bu, base, br, nw, nb: ops.adapter(x, wd, bd, wu, bu, scale, base, br),
            lambda x, wd, bd, wu, bu, base, br, nw, nb: reference.adapter(x, wd, bd, wu, bu, scale, base, br))


def _check_adapter(backend, dtype, shape, variant):
    inputs = _adapter_inputs(*shape, dtype, variant, _device(backend))
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(inputs[0].shape, generator=g).to(inputs[0].device)
             for _ in range(2 if variant == "norm" else 1)]
    ours, ref = _adapter_fns(variant)
    _check_against_reference(ours, ref, inputs, grads, backend, dtype, ADAPTER_NAMES)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ADAPTER_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("variant", VARIANTS)
def test_adapter_matches_reference(backend, dtype, shape, variant):
    _check_adapter(backend, dtype, shape, variant)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", ADAPTER_SHAPES_LARGE, ids=lambda s: "x".join(map(str, s)))
def test_adapter_large_shapes(backend, shape):
    _check_adapter(backend, torch.bfloat16, shape, "norm")


@pytest.mark.parametrize("backend", BACKENDS)
def test_adapter_mixed_dtypes_as_under_autocast(backend):
    """x fp32 (the residual stream), branch bf16 (a sub-layer output), weights fp32."""
    device = _device(backend)
    x, wd, bd, wu, bu, _, _, _, _ = _adapter_inputs(50, 96, 4, torch.float32, "seq", device)
    branch = torch.randn_like(x).bfloat16()
    ours = _run(lambda *t: ops.adapter(*t[:5], 0.1, branch=t[5]),
                [x, wd, bd, wu, bu, branch], [torch.randn_like(x)], backend)
    ref = _run(lambda *t: reference.adapter(*t[:5], 0.1, branch=t[5].float()),
               [x, wd, bd, wu, bu, branch], [torch.randn_like(x)])
    assert ours[0][0].dtype == torch.float32
    assert ours[1][5].dtype == torch.bfloat16
    torch.testing.assert_close(ours[0][0], ref[0][0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_adapter_nan_in_nan_out(backend):
    inputs = _adapter_inputs(8, 32, 4, torch.float32, "seq", _device(backend))
    inputs[0][0, 3, 5] = float("nan")
    with use_backend(backend):
        out = ops.adapter(*inputs[:5], 0.1)
    assert out[0, 3].isnan().all() and not out[1].isnan().any()


# ---------------------------------------------------------------- losses
LOSS_SHAPES = [(1, 2), (7, 10), (33, 397), (16, 5000)]
LOSS_NAMES = {"out": ["loss"], "grad": ["logits", "other_logits", "target"]}


def _logits(batch, classes, dtype, device, seed=0, extreme=False, masked=False):
    g = torch.Generator().manual_seed(seed)
    a, b = (torch.randn(batch, classes, generator=g) * (3e3 if extreme else 2.0) for _ in range(2))
    target = torch.randint(0, classes, (batch,), generator=g)
    if batch > 2:
        target[1] = -100  # an ignored row
    if masked and classes > 4:
        cols = torch.arange(classes)
        drop = (cols % 3 == 1) & (cols != target.clamp(min=0)[:, None])  # masked classes, never the target
        a, b = a.masked_fill(drop, float("-inf")), b.masked_fill(drop, float("-inf"))
    return a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype), target.to(device)


LOSSES = {
    "gist": (lambda a, b, t, red: ops.gist_loss(a, b, t, 0.5, 0.75, 3.0, reduction=red),
             lambda a, b, t, red: reference.gist_loss(a, b, t, 0.5, 0.75, 3.0, reduction=red)),
    "distill-kl": (lambda a, b, t, red: ops.distill_loss(a, b, t, "kl", 5.0, reduction=red),
                   lambda a, b, t, red: reference.distill_loss(a, b, t, "kl", 5.0, reduction=red)),
    "distill-mse": (lambda a, b, t, red: ops.distill_loss(a, b, t, "mse", 5.0, reduction=red),
                    lambda a, b, t, red: reference.distill_loss(a, b, t, "mse", 5.0, reduction=red)),
}


def _check_loss(backend, dtype, shape, loss, reduction="mean", **logit_kw):
    a, b, target = _logits(*shape, dtype, _device(backend), **logit_kw)
    if reduction == "none":
        grads = [torch.rand(shape[0], generator=torch.Generator().manual_seed(2)).to(a.device) + 0.5]
    else:
        grads = [torch.tensor(1.7, device=a.device)]
    ours, ref = LOSSES[loss]
    _check_against_reference(lambda a, b, t: ours(a, b, t, reduction), lambda a, b, t: ref(a, b, t, reduction),
                             [a, b, target], grads, backend, dtype, LOSS_NAMES)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LOSS_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("loss", LOSSES)
def test_loss_matches_reference(backend, dtype, shape, loss):
    _check_loss(backend, dtype, shape, loss)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("loss", LOSSES)
def test_loss_reductions(backend, reduction, loss):
    _check_loss(backend, torch.float32, (9, 37), loss, reduction)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("case", ["extreme", "masked"])
def test_loss_extreme_and_masked_logits(backend, loss, case):
    _check_loss(backend, torch.float32, (6, 300), loss, extreme=case == "extreme", masked=case == "masked")


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["gist", "distill-kl"])
def test_loss_large_vocabulary(backend, loss):
    _check_loss(backend, torch.bfloat16, (3, 262_144), loss)


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_nan_in_nan_out(backend):
    a, b, target = _logits(4, 10, torch.float32, _device(backend))
    a[2, 3] = float("nan")
    with use_backend(backend):
        rows = ops.gist_loss(a, b, target, reduction="none")
    assert rows[2].isnan() and rows[[0, 3]].isfinite().all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_all_rows_ignored_is_nan_like_torch(backend):
    a, b, _ = _logits(3, 10, torch.float32, _device(backend))
    target = torch.full((3,), -100, device=a.device)
    a.requires_grad_(True), b.requires_grad_(True)
    with use_backend(backend):
        loss = ops.gist_loss(a, b, target)
        loss.backward()
    assert loss.isnan()
    assert (a.grad == 0).all() and (b.grad == 0).all()  # as torch's cross-entropy: NaN mean, zero gradient


# ---------------------------------------------------------------- registration
def _opcheck_cases(device):
    """Every op with and without its optional parts, forward ops with gradients wanted (opcheck runs their
    backward through the autograd formula too)."""
    x, wd, bd, wu, bu, base, branch, nw, nb = _adapter_inputs(6, 40, 4, torch.float32, "norm", device)
    x2, br2 = x.reshape(-1, 40), branch.reshape(-1, 40)
    a, b, t = _logits(5, 11, torch.float32, device)
    for leaf in (x2, wd, bd, wu, bu, br2, nw, nb, a, b):
        leaf.requires_grad_(True)
    gist = torch.ops.gist_fast
    out, _, mean, rstd = gist.adapter_fwd(x2, wd, bd, wu, bu, 0.1, None, br2, nw, nb, 1e-6)
    go, gn = torch.randn_like(x2), torch.randn_like(x2)
    _, grad_a, grad_b, n_valid = gist.pair_loss(a, b, t, "gist", 0.5, 0.75, 3.0, -100, "mean", True)
    detached = [v.detach() for v in (out, mean, rstd, x2, wd, bd, wu, nw, grad_a, grad_b, n_valid)]
    out, mean, rstd, xd, wdd, bdd, wud, nwd, grad_a, grad_b, n_valid = detached
    return [
        (gist.adapter_fwd.default, (x2, wd, bd, wu, bu, 0.1, None, br2, nw, nb, 1e-6)),
        (gist.adapter_fwd.default, (x2, wd, bd, wu, bu, 0.1, None, None, None, None, 0.0)),
        (gist.adapter_fwd.default, (x2, wd, bd, wu, bu, 0.1, None, br2, nw, nb, 1e-6, torch.bfloat16)),
        (gist.adapter_bwd.default, (go, gn, xd, wdd, bdd, wud, 0.1, out, nwd, mean, rstd, True)),
        (gist.adapter_bwd.default, (go, None, xd, wdd, bdd, wud, 0.1, None, None, None, None, False)),
    ] + [(gist.pair_loss.default, (a, b, t, mode, 0.5, 0.75, 3.0, -100, reduction, True))
         for mode in ("gist", "kl", "mse") for reduction in ("mean", "none")] + [
        (gist.pair_loss.default, (a.detach(), b.detach(), t, "gist", 0.5, 0.75, 3.0, -100, "sum", False)),
        (gist.pair_loss_bwd.default, (torch.tensor(1.7, device=device), grad_a, grad_b, n_valid, "mean")),
        (gist.pair_loss_bwd.default, (torch.rand(5, device=device), grad_a, grad_b, n_valid, "none")),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    """Schema, fake, autograd registration and torch.compile tracing of every op, on each implementation here:
    the C++ kernels, the Triton launchers (interpreted on CPU; on CUDA where there is a GPU) and the plain-torch
    default."""
    from torch.library import opcheck

    with use_backend(backend):
        for op, args in _opcheck_cases(_device(backend)):
            opcheck(op, args)


def test_each_op_is_defined_once_with_a_kernel_per_device():
    """The schema, fake, autograd formula and plain-torch default come from Python; C++ adds only the CPU kernel
    (where built) and the Triton launchers only the CUDA one (where triton is installed)."""
    for op in OPS:
        name = f"gist_fast::{op}"
        for key in ("CompositeExplicitAutograd", "Autograd", "Meta"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(name, key), (op, key)
        assert has_kernel(op, "cpu") == (_backend.HAS_CPP and op in CPP_OPS), op
        assert has_kernel(op, "cuda") == _backend.HAS_TRITON, op
        if _backend.HAS_CPP and op in CPP_OPS:
            assert f"csrc/{'adapter' if op.startswith('adapter') else 'losses'}.cpp" in _cpu_kernel(op)


def _cpu_kernel(op):
    return next((line for line in torch._C._dispatch_dump(f"gist_fast::{op}").splitlines()
                 if line.startswith("CPU:")), "")


def test_use_backend_restores_the_previous_cpu_kernel():
    before = {op: _cpu_kernel(op) for op in OPS}
    with use_backend("torch"):
        assert all(_cpu_kernel(op) != before[op] for op in OPS)
    assert {op: _cpu_kernel(op) for op in OPS} == before


_LATE_CPP = """
import glob, os, sys
import torch
sys.modules["gist_fast._C"] = None  # the package defines its ops without the extension...
import gist_fast
from gist_fast import ops, reference
from gist_fast.ops import _backend
assert not _backend.HAS_CPP and not torch._C._dispatch_has_kernel_for_dispatch_key("gist_fast::adapter_fwd", "CPU")
del sys.modules["gist_fast._C"]  # ...and loads it afterwards: the C++ kernels register for defined ops
torch.ops.load_library(glob.glob(os.path.join(os.path.dirname(gist_fast.__file__), "_C*.so"))[0])
assert "csrc/adapter.cpp" in torch._C._dispatch_dump("gist_fast::adapter_fwd")
x, wd, bd, wu, bu = torch.randn(5, 16), torch.randn(4, 16), torch.randn(4), torch.randn(16, 4), torch.randn(16)
torch.testing.assert_close(ops.adapter(x, wd, bd, wu, bu, 0.1), reference.adapter(x, wd, bd, wu, bu, 0.1))
a, b, t = torch.randn(3, 7), torch.randn(3, 7), torch.tensor([1, 2, 3])
torch.testing.assert_close(ops.gist_loss(a, b, t), reference.gist_loss(a, b, t))
"""


@pytest.mark.skipif(not _backend.HAS_CPP, reason="gist_fast._C not built")
def test_cpp_kernels_may_also_register_after_the_schemas():
    """The package loads gist_fast._C before it defines the ops (see gist_fast/ops/_backend.py); the other order
    registers the same kernels too."""
    subprocess.run([sys.executable, "-c", _LATE_CPP], check=True, timeout=300)


def test_bad_inputs_raise_clear_errors():
    x, wd, bd, wu, bu, *_ = _adapter_inputs(4, 32, 4, torch.float32, "seq", "cpu")
    with pytest.raises(ValueError, match="w_down"):
        ops.adapter(x, wu, bd, wu, bu, 0.1)
    with pytest.raises(ValueError, match="branch must have x's shape"):
        ops.adapter(x, wd, bd, wu, bu, 0.1, branch=x[:, :2])
    a, b, t = _logits(4, 10, torch.float32, "cpu")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        ops.gist_loss(a, b, t, temperature=0.0)
    with pytest.raises(ValueError, match="both be"):
        ops.gist_loss(a, b[:, :5], t)
    with pytest.raises(ValueError, match="target must be integer"):
        ops.gist_loss(a, b, t.float())
    with pytest.raises(RuntimeError, match=r"must lie in \[0, 10\)"):
        ops.gist_loss(a, b, torch.tensor([0, 1, 10, 2]))
    with pytest.raises(ValueError, match="distill kind"):
        ops.distill_loss(a, b, t, kind="l2")
    with pytest.raises(ValueError, match="reduction"):
        ops.distill_loss(a, b, t, reduction="avg")


def test_float64_takes_the_reference_path():
    """The kernels compute in fp32 at most: float64 (a user's double-precision check) runs the reference, exactly."""
    x, wd, bd, wu, bu, base, branch, nw, nb = (t.double() if t is not None else None
                                               for t in _adapter_inputs(4, 32, 4, torch.float32, "norm", "cpu"))
    torch.testing.assert_close(ops.adapter(x, wd, bd, wu, bu, 0.1, branch=branch),
                               reference.adapter(x, wd, bd, wu, bu, 0.1, branch=branch), rtol=0, atol=0)
    torch.testing.assert_close(ops.adapter_norm(x, wd, bd, wu, bu, 0.1, nw, nb, branch=branch),
                               reference.adapter_norm(x, wd, bd, wu, bu, 0.1, nw, nb, branch=branch), rtol=0, atol=0)
    a, b, t = (v.double() if v.is_floating_point() else v for v in _logits(5, 11, torch.float32, "cpu"))
    torch.testing.assert_close(ops.gist_loss(a, b, t), reference.gist_loss(a, b, t), rtol=0, atol=0)
    torch.testing.assert_close(ops.distill_loss(a, b, t, "mse"), reference.distill_loss(a, b, t, "mse"), rtol=0, atol=0)


def test_reference_fallback_when_no_backend():
    """With no kernel of its own for the device the op runs its plain-torch body, which in fp32 is the reference."""
    x, wd, bd, wu, bu, *_ = _adapter_inputs(4, 32, 4, torch.float32, "seq", "cpu")
    with use_backend("torch"):
        torch.testing.assert_close(ops.adapter(x, wd, bd, wu, bu, 0.1), reference.adapter(x, wd, bd, wu, bu, 0.1),
                                   rtol=0, atol=0)
