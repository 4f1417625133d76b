"""Model-level checks of the fused path: same training trajectory as the reference, and traceable
by torch.compile(fullgraph=True) with no graph break."""
import copy

import torch

import gist_fast
from backends import fused_kernel_runs
from tiny import images, tiny_vit


def _train(model, steps, seed=0):
    torch.manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss_fn = gist_fast.GistLoss(fused=model.blocks[0].adapter.fused)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x, y = images(8, seed=int(torch.randint(0, 10**6, (1,), generator=g))), torch.randint(0, 5, (8,), generator=g)
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_thirty_steps_fused_equal_reference():
    base = tiny_vit(seed=4)
    ref = gist_fast.patch(copy.deepcopy(base), fused=False, verbose=False).train()
    fused = gist_fast.patch(copy.deepcopy(base), fused="auto", verbose=False).train()
    with torch.no_grad():
        fused.gist_token.copy_(ref.gist_token)
        for a, b in zip(fused.blocks, ref.blocks):
            a.adapter.load_state_dict(b.adapter.state_dict())
    assert fused_kernel_runs(images())  # the fused path really runs here
    ref_losses, fused_losses = _train(ref, 30), _train(fused, 30)
    assert max(abs(a - b) for a, b in zip(ref_losses, fused_losses)) < 1e-4
    assert ref_losses[-1] < ref_losses[0]
    for (name, p), q in zip(ref.named_parameters(), fused.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q, p, rtol=1e-3, atol=1e-4, msg=name)


def test_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    model = gist_fast.patch(tiny_vit(seed=5), verbose=False).train()
    model.gist_drop.p = 0.0
    loss_fn = gist_fast.GistLoss()
    x, y = images(4), torch.tensor([0, 1, 2, 3])

    def step(x, y):
        return loss_fn(model(x), y)

    compiled = torch.compile(step, fullgraph=True)
    eager_loss = step(x, y)
    eager_grads = torch.autograd.grad(eager_loss, [model.gist_token, model.blocks[0].adapter.down.weight])
    loss = compiled(x, y)
    grads = torch.autograd.grad(loss, [model.gist_token, model.blocks[0].adapter.down.weight])
    torch.testing.assert_close(loss, eager_loss, rtol=1e-4, atol=1e-5)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-5)
