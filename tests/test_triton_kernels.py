"""Triton launchers beyond the shared op tests: code paths the default tiling does not reach (small chunks,
deterministic vs atomic weight-gradient reduction), mixed dtypes, determinism and extreme logits."""
import pytest
import torch

from backends import TRITON_RUNS, use_backend
from gist_fast import reference
from gist_fast.ops import _backend

pytestmark = pytest.mark.skipif(not TRITON_RUNS, reason="Triton needs CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if _backend.HAS_TRITON:
    from gist_fast.kernels._common import dot_operand  # a global, where @triton.jit test kernels look names up


def _adapter_case(rows, dim, rank, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(DEVICE)

    x = rnd(rows, dim) + 3.0  # an offset mean: the LayerNorm statistics must not cancel
    return (x.to(dtype), rnd(rank, dim, std=dim ** -0.5), rnd(rank, std=0.1), rnd(dim, rank, std=rank ** -0.5),
            rnd(dim, std=0.1), rnd(rows, dim).to(dtype), 1 + rnd(dim, std=0.1), rnd(dim, std=0.1))


def _reference_adapter(x, wd, bd, wu, bu, branch, nw, nb, scale, x_is_base, base=None):
    """float64 outputs and gradients of the adapter with a fused norm."""
    leaves = [t.double().detach().requires_grad_() for t in (x, wd, bd, wu, bu, branch, nw, nb)]
    x64, wd64, bd64, wu64, bu64, br64, nw64, nb64 = leaves
    out, normed = reference.adapter_norm(x64, wd64, bd64, wu64, bu64, scale, nw64, nb64, 1e-6,
                                         None if x_is_base else x64 * 0.5, br64)
    return out, normed, leaves


@pytest.mark.parametrize("rank,atomic", [(4, False), (4, True), (64, False), (64, True)])
@pytest.mark.parametrize("x_is_base", [True, False])
def test_adapter_small_chunks_and_both_reductions(rank, atomic, x_is_base):
    """D = 100 in chunks of 16 (7 chunks, the last one masked), 37 rows in blocks of 16: the chunked LayerNorm
    statistics, the partial-sum and the atomic weight-gradient paths against float64."""
    from gist_fast.kernels.adapter import adapter_bwd, adapter_fwd

    x, wd, bd, wu, bu, branch, nw, nb = _adapter_case(37, 100, rank)
    base = None if x_is_base else (x.double() * 0.5).to(x.dtype)
    out, normed, mean, rstd = adapter_fwd(x, wd.float(), bd.float(), wu.float(), bu.float(), 0.3, base, branch,
                                          nw.float(), nb.float(), 1e-6, block_m=16, block_d=16)
    ref_out, ref_normed, leaves = _reference_adapter(x, wd, bd, wu, bu, branch, nw, nb, 0.3, x_is_base)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(normed.double(), ref_normed, rtol=1e-5, atol=1e-5)
    go, gn = torch.randn_like(out), torch.randn_like(out)
    torch.autograd.backward([ref_out, ref_normed], [go.double(), gn.double()])
    grads = adapter_bwd(go, gn, x, wd.float(), bd.float(), wu.float(), 0.3, out, nw.float(), mean, rstd, x_is_base,
                        block_m=16, block_d=16, atomic=atomic)
    grad_x, grad_res, g_wd, g_bd, g_wu, g_bu, g_nw, g_nb = grads
    expected_x = leaves[0].grad
    for name, ours, exact in [("x", grad_x, expected_x), ("w_down", g_wd, leaves[1].grad),
                              ("b_down", g_bd, leaves[2].grad), ("w_up", g_wu, leaves[3].grad),
                              ("b_up", g_bu, leaves[4].grad), ("branch", grad_res, leaves[5].grad),
                              ("norm_w", g_nw, leaves[6].grad), ("norm_b", g_nb, leaves[7].grad)]:
        if name == "x" and not x_is_base:  # the reference's x also feeds base = 0.5 x; ours is the adapter path only
            exact = exact - 0.5 * leaves[5].grad
        torch.testing.assert_close(ours.double(), exact, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("rank", [4, 40])
def test_adapter_weight_gradients_are_deterministic_when_asked(rank):
    """Under torch.use_deterministic_algorithms the weight gradients come from per-program partials summed in a
    fixed order: the same bits as asking for that path directly, on every run."""
    from gist_fast.kernels.adapter import adapter_bwd

    x, wd, bd, wu, bu, *_ = _adapter_case(300, 96, rank)
    go = torch.randn_like(x)
    args = (go, None, x, wd.float(), bd.float(), wu.float(), 0.1, None, None, None, None, True)
    partials = adapter_bwd(*args, block_m=16, atomic=False)
    torch.use_deterministic_algorithms(True)
    try:
        runs = [adapter_bwd(*args, block_m=16) for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b, c in zip(partials, *runs):
        assert torch.equal(a, b) and torch.equal(b, c)


def test_adapter_launcher_refuses_strided_views():
    from gist_fast.kernels.adapter import adapter_fwd

    x, wd, bd, wu, bu, *_ = _adapter_case(32, 48, 4)
    with pytest.raises(ValueError, match="x must be a contiguous"):
        adapter_fwd(x.t().contiguous().t(), wd.float(), bd.float(), wu.float(), bu.float(), 0.1,
                    None, None, None, None, 0.0)
    with pytest.raises(ValueError, match="w_up must be a contiguous"):
        adapter_fwd(x, wd.float(), bd.float(), wd.float().t(), bu.float(), 0.1, None, None, None, None, 0.0)


def test_adapter_dots_run_at_the_autocast_precision_or_better():
    """The accuracy contract under torch.autocast(bf16): fp32 residual stream and weights, bf16 branch. Eager
    autocast runs both linears with bf16 operands; ours (bf16 operands, fp32 accumulation, fp32 GELU) must stay
    within twice eager autocast's error against float64, for the outputs and every gradient."""
    from gist_fast import ops
    from oracle import assert_oracle

    x, wd, bd, wu, bu, branch, nw, nb = _adapter_case(45, 80, 8)
    inputs = [x.float(), wd.float(), bd.float(), wu.float(), bu.float(), branch.bfloat16(), nw.float(), nb.float()]
    grads = [torch.randn(45, 80, device=DEVICE) for _ in range(2)]

    def run(fn, autocast, dtype=None):
        leaves = [(t.double() if dtype else t).detach().requires_grad_() for t in inputs]
        with torch.autocast(DEVICE, torch.bfloat16, enabled=autocast):
            out = fn(*leaves[:5], 0.1, leaves[6], leaves[7], 1e-6, branch=leaves[5])
        torch.autograd.backward(out, [g.to(o.dtype) for o, g in zip(out, grads)])
        return list(out) + [t.grad for t in leaves]

    with use_backend("triton"):
        ours = run(ops.adapter_norm, True)
    eager = run(reference.adapter_norm, True)
    exact = run(reference.adapter_norm, False, torch.float64)
    names = ["out", "normed", "x", "w_down", "b_down", "w_up", "b_up", "branch", "norm_w", "norm_b"]
    for name, o, r, e in zip(names, ours, eager, exact):
        assert_oracle(o.float(), r.float(), e, name, torch.bfloat16)


def test_adapter_promotes_mixed_dtypes_and_empty_norm_outputs():
    from gist_fast.kernels.adapter import adapter_fwd

    x, wd, bd, wu, bu, branch, _, _ = _adapter_case(20, 48, 2, torch.bfloat16)
    out, normed, mean, rstd = adapter_fwd(x, wd.float(), bd.float(), wu.float(), bu.float(), 1.0, None,
                                          branch.half(), None, None, 0.0)
    assert out.dtype == torch.float32 and normed.shape == mean.shape == rstd.shape == (0,)
    expected = reference.adapter(x.double(), wd, bd, wu, bu, 1.0, branch=branch.half().double())
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_adapter_nan_row_stays_in_its_row_with_norm():
    from gist_fast.kernels.adapter import adapter_fwd

    x, wd, bd, wu, bu, branch, nw, nb = (t.float() for t in _adapter_case(40, 64, 4))
    x[17, 3] = float("nan")
    out, normed, mean, rstd = adapter_fwd(x, wd, bd, wu, bu, 0.1, None, None, nw, nb, 1e-6, block_m=16, block_d=16)
    assert normed[17].isnan().all() and mean[17].isnan()
    rest = torch.ones(40, dtype=torch.bool)
    rest[17] = False
    assert normed[rest].isfinite().all()


def _pair_rows(kind, a, b, target, temperature):
    if kind == "gist":
        return reference.gist_loss(a, b, target, 0.5, 0.75, temperature, reduction="none")
    return reference.distill_loss(a, b, target, kind, temperature, reduction="none")


def _launch(kind, a, b, target, temperature, compute_grad=True, reduction="none"):
    from gist_fast.kernels.losses import pair_loss_fwd

    return pair_loss_fwd(a, b, target, kind, 0.5, 0.75, temperature, -100, reduction, compute_grad)[:3]


@pytest.mark.parametrize("kind", ["gist", "kl", "mse"])
def test_losses_extreme_logits_and_long_rows(kind):
    """±1e4 and -inf logits (never the target), an ignored row and one row of 70,000 classes (17 chunks)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 70_000, generator=g, dtype=torch.float64) * 3
    b = torch.randn(3, 70_000, generator=g, dtype=torch.float64) * 3
    a[0, :5], b[0, 5:10] = 1e4, -1e4
    target = torch.tensor([7, -100, 12])
    if kind != "mse":  # the squared gap of two -inf logits is NaN by definition
        a[2, 100:200], b[2, 100:200] = float("-inf"), float("-inf")
    a64, b64 = a.clone().requires_grad_(), b.clone().requires_grad_()
    rows64 = _pair_rows(kind, a64, b64, target, 3.0)
    rows64.sum().backward()
    rows, ga, gb = _launch(kind, a.float().to(DEVICE), b.float().to(DEVICE), target.to(DEVICE), 3.0)
    torch.testing.assert_close(rows.double().cpu(), rows64.detach(), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(ga.double().cpu(), a64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gb.double().cpu(), b64.grad, rtol=1e-4, atol=1e-5)
    assert rows[1] == 0 and not ga[1].any() and not gb[1].any()


@pytest.mark.parametrize("kind", ["gist", "kl", "mse"])
def test_losses_target_at_minus_inf_is_infinite_and_no_grad_is_empty(kind):
    a = torch.randn(2, 10, device=DEVICE)
    b = torch.randn(2, 10, device=DEVICE)
    a[0, 3] = float("-inf")
    rows, ga, gb = _launch(kind, a, b, torch.tensor([3, 4], device=DEVICE), 2.0, compute_grad=False)
    assert rows[0] == float("inf") and rows[1].isfinite()
    assert ga.shape == gb.shape == (0,)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_reduction_in_the_forward_launch_is_deterministic(reduction):
    """The last program reduces the rows in a fixed order: bitwise equal on every call, equal to the rows'
    mean / sum, ignored rows left out of the count."""
    from gist_fast.kernels.losses import pair_loss_fwd

    a, b = torch.randn(300, 37, device=DEVICE), torch.randn(300, 37, device=DEVICE)
    target = torch.randint(0, 37, (300,), device=DEVICE)
    target[::7] = -100
    runs = [pair_loss_fwd(a, b, target, "gist", 0.5, 0.75, 3.0, -100, reduction, False) for _ in range(3)]
    assert all(torch.equal(runs[0][0], r[0]) for r in runs)
    rows = reference.gist_loss(a, b, target, reduction="none")
    expected = rows.sum() / (target != -100).sum() if reduction == "mean" else rows.sum()
    torch.testing.assert_close(runs[0][0], expected, rtol=1e-5, atol=1e-5)
    assert runs[0][3].item() == (target != -100).sum().item()


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_loss_backward_scales_both_gradients_in_storage_dtype(reduction):
    from gist_fast.kernels.losses import pair_loss_bwd

    grad_a, grad_b = (torch.randn(5, 3000, device=DEVICE).bfloat16() for _ in range(2))
    n_valid = torch.tensor(4.0, device=DEVICE)
    upstream = torch.rand(5, device=DEVICE) + 0.5 if reduction == "none" else torch.tensor(1.7, device=DEVICE)
    out_a, out_b = pair_loss_bwd(upstream, grad_a, grad_b, n_valid, reduction)
    scale = upstream[:, None] if reduction == "none" else upstream / (n_valid if reduction == "mean" else 1.0)
    # exact on a GPU; the interpreter truncates fp32 -> bf16 instead of rounding to nearest (1 ulp)
    tol = 0 if torch.cuda.is_available() else 2 ** -7
    for ours, g in ((out_a, grad_a), (out_b, grad_b)):
        assert ours.dtype == torch.bfloat16
        torch.testing.assert_close(ours, (g.float() * scale).bfloat16(), rtol=tol, atol=0)
    expanded = torch.tensor(2.0, device=DEVICE).expand(5)  # stride 0, as autograd hands a broadcast gradient
    torch.testing.assert_close(pair_loss_bwd(expanded, grad_a, grad_b, n_valid, "none")[0],
                               (grad_a.float() * 2).bfloat16(), rtol=tol, atol=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA a device-side assert ends the process, as torch's CE")
def test_loss_kernel_checks_labels_itself(monkeypatch):
    """The launcher compiles the kernel with debug=True, which the interpreter ignores: turn it on there."""
    from triton.runtime import interpreter
    from triton.runtime.errors import InterpreterError

    from gist_fast.kernels.losses import pair_loss_fwd

    monkeypatch.setattr(interpreter.interpreter_builder, "options",
                        interpreter.InterpreterOptions(debug=True, sanitize_overflow=False))
    a = torch.randn(3, 10)
    with pytest.raises((AssertionError, InterpreterError), match="outside \\[0, classes\\)"):
        pair_loss_fwd(a, a.clone(), torch.tensor([1, 10, 2]), "gist", 0.5, 0.75, 3.0, -100, "mean", True)


def test_dot_operands_are_16_bit_only_where_eager_runs_16_bit_linears():
    """The interpreter ignores operand precision, so this is the only guard against rounding fp32 weights."""
    import triton.language as tl

    from gist_fast.kernels._common import dot_config

    assert dot_config(torch.bfloat16) == (tl.bfloat16, "tf32")
    assert dot_config(torch.float32, torch.bfloat16) == (tl.bfloat16, "tf32")  # autocast
    assert dot_config(torch.float32, torch.float16)[0] == tl.float16
    assert dot_config(torch.float32) == (tl.float32, "tf32x3")
    assert dot_config(torch.float64) == (tl.float32, "tf32x3")


def test_dot_operands_round_to_nearest_even():
    """bf16 dot operands are rounded as a GPU rounds them (the interpreter's own cast truncates)."""
    import triton
    import triton.language as tl

    @triton.jit
    def round_kernel(x_ptr, y_ptr, N: tl.constexpr):
        offs = tl.arange(0, N)
        tl.store(y_ptr + offs, dot_operand(tl.load(x_ptr + offs), tl.bfloat16).to(tl.float32))

    x = torch.randn(4096, device=DEVICE) * 10
    y = torch.empty_like(x)
    round_kernel[(1,)](x, y, N=4096)
    assert torch.equal(y, x.bfloat16().float())
