"""Triton launchers beyond the shared op tests: code paths the default tiling does not reach (small chunks,
deterministic vs atomic weight-gradient reduction), mixed dtypes, determinism and extreme logits."""
import pytest
import torch

from gist_fast import reference
from gist_fast.ops import _backend

pytestmark = pytest.mark.skipif(
    not _backend.HAS_TRITON or not (torch.cuda.is_available() or _backend.TRITON_INTERPRET),
    reason="Triton needs CUDA or TRITON_INTERPRET=1",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


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
    for name, ours, exact in [("x", grad_x, expected_x), ("w_down", g_wd, leaves[1].grad), ("b_down", g_bd, leaves[2].grad),
                              ("w_up", g_wu, leaves[3].grad), ("b_up", g_bu, leaves[4].grad), ("branch", grad_res, leaves[5].grad),
                              ("norm_w", g_nw, leaves[6].grad), ("norm_b", g_nb, leaves[7].grad)]:
        if name == "x" and not x_is_base:  # the reference's x also feeds base = 0.5 x; ours is the adapter path only
            exact = exact - 0.5 * leaves[5].grad
        torch.testing.assert_close(ours.double(), exact, rtol=1e-4, atol=1e-4, msg=name)


def test_adapter_weight_gradients_are_deterministic():
    from gist_fast.kernels.adapter import adapter_bwd

    x, wd, bd, wu, bu, *_ = _adapter_case(300, 96, 4)
    go = torch.randn_like(x)
    runs = [adapter_bwd(go, None, x, wd.float(), bd.float(), wu.float(), 0.1, None, None, None, None, True, block_m=16)
            for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


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


def _launch(kind, a, b, target, temperature, compute_grad=True):
    from gist_fast.kernels.distill_loss import distill_loss_fwd
    from gist_fast.kernels.gist_loss import gist_loss_fwd

    if kind == "gist":
        return gist_loss_fwd(a, b, target, 0.5, 0.75, temperature, -100, compute_grad)
    return distill_loss_fwd(a, b, target, ("kl", "mse").index(kind), temperature, -100, compute_grad)


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


def test_scale_rows_fp32_math_in_storage_dtype():
    from gist_fast.kernels.gist_loss import scale_rows

    grad = torch.randn(5, 3000, device=DEVICE).bfloat16()
    scale = torch.rand(5, device=DEVICE) + 0.5
    out = scale_rows(grad, scale)
    assert out.dtype == torch.bfloat16
    # exact on a GPU; the interpreter truncates fp32 -> bf16 instead of rounding to nearest (1 ulp)
    tol = 0 if torch.cuda.is_available() else 2 ** -7
    torch.testing.assert_close(out, (grad.float() * scale[:, None]).bfloat16(), rtol=tol, atol=0)


def test_dot_precision_is_tf32_only_when_every_operand_is_16_bit():
    """The interpreter ignores input_precision, so this is the only guard against tf32-rounding fp32 weights."""
    from gist_fast.kernels._common import dot_precision

    assert dot_precision(torch.bfloat16, torch.float16) == "tf32"
    assert dot_precision(torch.bfloat16, torch.bfloat16, torch.float32, torch.float32) == "tf32x3"
    assert dot_precision(torch.float32) == "tf32x3"
    assert dot_precision(torch.float64) == "tf32x3"
