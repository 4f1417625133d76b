"""GistLoss and DistillLoss against METHODS.md's formulas written out here, loss and both gradients."""
import pytest
import torch

import gist_fast
from gist_fast import GistOutput

DTYPE_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}
# the fused losses run Triton on CUDA, C++ on CPU; the error checks stay on CPU (a bad label is a
# device-side assert on CUDA, which would leave the process without a working CUDA context)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _softmax_T(z, T):
    e = torch.exp(z / T - (z / T).max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def _ce(z, y):
    return (torch.logsumexp(z, -1) - z.gather(1, y[:, None])[:, 0]).mean()


def _kl(p, q):
    return (p * (p.log() - q.log())).sum(-1).mean()


def _gist_formula(zc, zg, y, T=3.0):
    pc, pg = _softmax_T(zc, T), _softmax_T(zg, T)
    return _ce(zc, y) + 0.5 * _ce(zg, y) + 0.75 * _kl(pc, pg) + 0.75 * _kl(pg, pc)


def _distill_formula(zs, zt, y, kind, T=5.0):
    d = _kl(_softmax_T(zt, T), _softmax_T(zs, T)) if kind == "kl" else ((zs - zt) ** 2).mean()
    return _ce(zs, y) + _ce(zt, y) + d


def _pair(dtype, batch=6, classes=11, device="cpu"):
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(batch, classes, generator=g) * 2 for _ in range(2))
    return a.to(device, dtype), b.to(device, dtype), torch.randint(0, classes, (batch,), generator=g).to(device)


def _value_and_grads(fn, a, b):
    a, b = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    loss = fn(a, b)
    (loss * 2.5).backward()  # an upstream gradient != 1
    return loss.detach().float(), a.grad.float(), b.grad.float()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gist_loss_equals_formula(fused, dtype, device):
    a, b, y = _pair(dtype, device=device)
    ours = _value_and_grads(lambda a, b: gist_fast.GistLoss(fused=fused)(GistOutput(a, b), y), a, b)
    expected = _value_and_grads(lambda a, b: _gist_formula(a.double(), b.double(), y), a, b)
    for o, e in zip(ours, expected):
        torch.testing.assert_close(o, e.float(), **DTYPE_TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("kind", ["kl", "mse"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_distill_loss_equals_formula(fused, kind, dtype, device):
    s, t, y = _pair(dtype, device=device)
    ours = _value_and_grads(lambda s, t: gist_fast.DistillLoss(kind, fused=fused)(s, t, y), s, t)
    expected = _value_and_grads(lambda s, t: _distill_formula(s.double(), t.double(), y, kind), s, t)
    for o, e in zip(ours, expected):
        torch.testing.assert_close(o, e.float(), **DTYPE_TOL[dtype])
    assert ours[2].abs().sum() > 0  # the distillation term reaches the teacher too


def test_gist_loss_accepts_a_plain_pair_and_defaults_are_the_authors():
    loss = gist_fast.GistLoss()
    assert (loss.gist_weight, loss.kl_weight, loss.temperature) == (0.5, 0.75, 3.0)
    assert gist_fast.DistillLoss().temperature == 5.0
    a, b, y = _pair(torch.float32)
    torch.testing.assert_close(loss((a, b), y), loss(GistOutput(a, b), y))


@pytest.mark.parametrize("fused", [True, False])
def test_loss_errors(fused):
    a, b, y = _pair(torch.float32)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        gist_fast.GistLoss(temperature=-1.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        gist_fast.DistillLoss(temperature=0.0)
    with pytest.raises(ValueError, match="distill kind"):
        gist_fast.DistillLoss(kind="js")
    with pytest.raises(ValueError, match="must both be"):
        gist_fast.GistLoss(fused=fused)((a, b[:, :4]), y)
    with pytest.raises(ValueError, match="target must be integer class indices"):
        gist_fast.DistillLoss(fused=fused)(a, b, y[:3])
    with pytest.raises(RuntimeError, match=r"must lie in \[0, 11\)"):
        gist_fast.GistLoss(fused=fused)((a, b), torch.full_like(y, 11))
    with pytest.raises(RuntimeError, match=r"must lie in \[0, 11\)"):
        gist_fast.DistillLoss(fused=fused)(a, b, torch.full_like(y, -3))
