"""gist_fast.activation_bytes and gradient accumulation (accumulate_backward / fit_micro_batch)."""
import copy

import pytest
import torch

import gist_fast
from gist_fast.memory import parse_bytes
from tiny import images, tiny_vit


def _model(**kw):
    return gist_fast.patch(tiny_vit(seed=2, img_size=40), verbose=False, **kw).train()


def test_counts_each_storage_once_and_skips_parameters():
    lin = torch.nn.Linear(8, 8)

    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            h = self.lin(x)               # saves x (input of a trainable linear)
            return (h * x * x).sum(-1)    # saves x twice more (x needs no grad, so h is not saved)

    x = torch.randn(4, 8)
    rep = gist_fast.activation_bytes(Twice(), x, loss_fn=lambda out: out.sum())
    # per image: x's 8 floats, counted once although saved three times; the weights do not count
    assert rep.per_image == pytest.approx(8 * 4)
    assert rep.fixed == pytest.approx(0)


def test_lean_and_min_save_less_than_eager():
    x = images(4, size=40)
    eager = gist_fast.activation_bytes(_model(fused=False), x)
    lean = gist_fast.activation_bytes(_model(memory="lean"), x)
    tight = gist_fast.activation_bytes(_model(memory="min"), x)
    ckpt_model = _model(fused=False)
    ckpt_model.set_grad_checkpointing()
    ckpt = gist_fast.activation_bytes(ckpt_model, x)
    assert tight.per_image < lean.per_image < eager.per_image
    assert ckpt.per_image < eager.per_image
    amp = gist_fast.activation_bytes(_model(memory="lean"), x, autocast_dtype=torch.bfloat16)
    assert amp.per_image < 0.6 * lean.per_image  # bf16 copies instead of fp32
    assert "blocks" in lean.by_module


def test_auto_memory_is_lean_on_cuda_only():
    """The default memory="auto" keeps the eager block (fused ops, nothing recomputed) on CPU."""
    x = images(4, size=40)
    auto = gist_fast.activation_bytes(_model(), x)
    assert auto.per_image == gist_fast.activation_bytes(_model(memory=None), x).per_image
    assert auto.per_image > gist_fast.activation_bytes(_model(memory="lean"), x).per_image


def test_parse_bytes():
    assert parse_bytes("16GiB") == 16 * 2**30
    assert parse_bytes("800MB") == 800 * 10**6
    assert parse_bytes(1234) == 1234
    assert parse_bytes("2g") == 2 * 2**30


@pytest.mark.parametrize("memory", ["lean", None])
def test_accumulation_equals_full_batch(memory):
    base = _model(memory=memory)
    base.gist_drop.p = 0.0
    x, y = images(10, size=40), torch.tensor([0, 1, 2, 3, 4, -100, 1, -100, 3, 2])
    models, losses = [], []
    for micro in (10, 3):
        m = copy.deepcopy(base)
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
        losses.append(gist_fast.step_with_budget(m, opt, gist_fast.GistLoss(fused=False), x, y, micro))
        models.append(m)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-6)
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-6, msg=name)


def test_fit_micro_batch_estimate():
    model = _model()
    sample = images(4, size=40)
    rep = gist_fast.activation_bytes(model, sample)
    state = gist_fast.memory.training_state_bytes(model)
    budget = lambda n: (state + max(rep.fixed, 0) + n * rep.per_image) / 0.85 + 1  # noqa: E731
    assert gist_fast.fit_micro_batch(model, 64, budget(10), sample) == 10
    assert gist_fast.fit_micro_batch(model, 64, budget(25), sample) == 25
    assert gist_fast.fit_micro_batch(model, 64, 2**40, sample) == 64
    with pytest.warns(UserWarning, match="no room for one image"):
        assert gist_fast.fit_micro_batch(model, 64, 1, sample) == 1


@pytest.mark.parametrize("start", [1, 5, 16, 40, 100])
@pytest.mark.parametrize("largest", [0, 1, 7, 16, 33, 64])
def test_largest_batch_finds_the_threshold(start, largest):
    calls = []

    def fits(n):
        calls.append(n)
        return n <= largest

    found = gist_fast.memory.largest_batch(fits, start, limit=64)
    assert all(1 <= n <= 64 for n in calls)
    assert largest - largest // 16 <= found <= largest  # within 1/16 below the answer, never above it


def test_backward_in_parts_is_the_mean_however_split():
    w = torch.randn(5, 3, requires_grad=True)
    x, t = torch.randn(11, 5), torch.tensor([0, 1, 2, -100, 1, 0, 2, -100, 1, 1, 0])
    loss_sum = lambda x, t: torch.nn.functional.cross_entropy(x @ w, t, reduction="sum")  # noqa: E731
    whole = torch.nn.functional.cross_entropy(x @ w, t)
    (expected,) = torch.autograd.grad(whole, w)
    for micro in (1, 4, 11):
        w.grad = None
        total = gist_fast.memory.backward_in_parts(loss_sum, x, t, micro, divisor=9)
        torch.testing.assert_close(total / 9, whole.detach())
        torch.testing.assert_close(w.grad, expected)


def test_activation_bytes_counts_the_given_loss_too():
    model, x = _model(), images(4, size=40)
    plain = gist_fast.activation_bytes(model, x)  # sum_of_outputs: the model's own activations
    loss = lambda out: gist_fast.GistLoss(fused=False)(out, torch.zeros(len(out[0]), dtype=torch.long))  # noqa: E731
    with_loss = gist_fast.activation_bytes(model, x, loss_fn=loss)
    assert 0 < plain.per_image < with_loss.per_image < 1.1 * plain.per_image
