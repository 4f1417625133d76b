"""CUDA-only checks at real sizes (skipped without a GPU): the Triton kernels compiled for real."""
import copy

import pytest
import torch

import gist_fast
from gist_fast import ops, reference
from oracle import assert_oracle

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("rows,dim,rank", [(128 * 198, 768, 4), (128 * 198, 768, 64), (4099, 8192, 16)])
def test_adapter_norm_at_vit_sizes(rows, dim, rank):
    g = torch.Generator(device="cuda").manual_seed(0)
    rnd = lambda *s, std=1.0: torch.randn(*s, device="cuda", generator=g) * std
    inputs = [rnd(rows, dim), rnd(rank, dim, std=dim ** -0.5), rnd(rank, std=0.1), rnd(dim, rank, std=rank ** -0.5),
              rnd(dim, std=0.1), rnd(rows, dim), 1 + rnd(dim, std=0.1), rnd(dim, std=0.1)]
    grads = [rnd(rows, dim), rnd(rows, dim)]

    def run(fn, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in inputs]
        out = fn(*leaves[:5], 0.1, leaves[6], leaves[7], 1e-6, branch=leaves[5])
        torch.autograd.backward(out, [g.to(dtype) for g in grads])
        return list(out) + [t.grad for t in leaves]

    exact = run(reference.adapter_norm, torch.float64)
    ref = run(reference.adapter_norm, torch.bfloat16)
    for i, (o, r, e) in enumerate(zip(run(ops.adapter_norm, torch.bfloat16), ref, exact)):
        assert_oracle(o, r, e, f"tensor {i}", torch.bfloat16)


def test_gist_loss_large_vocabulary():
    a, b = (torch.randn(64, 262_144, device="cuda") * 3 for _ in range(2))
    y = torch.randint(0, 262_144, (64,), device="cuda")
    outs = []
    for fn, dtype in ((ops.gist_loss, torch.bfloat16), (reference.gist_loss, torch.bfloat16), (reference.gist_loss, torch.float64)):
        la, lb = a.to(dtype).requires_grad_(), b.to(dtype).requires_grad_()
        loss = fn(la, lb, y)
        (loss * 1.3).backward()
        outs.append([loss.detach(), la.grad, lb.grad])
    for name, o, r, e in zip(("loss", "grad", "gist grad"), *outs):
        assert_oracle(o, r, e, name, torch.bfloat16)


def test_vit_base_gist_step_matches_reference_under_bf16_autocast():
    import timm

    base = timm.create_model("vit_base_patch16_224", num_classes=100).cuda()
    fused = gist_fast.patch(copy.deepcopy(base), verbose=False).train()
    ref = gist_fast.patch(copy.deepcopy(base), fused=False, verbose=False).train()
    ref.load_state_dict(fused.state_dict())
    x, y = torch.randn(16, 3, 224, 224, device="cuda"), torch.randint(0, 100, (16,), device="cuda")
    losses = []
    for model in (fused, ref):
        model.gist_drop.p = 0.0
        with torch.autocast("cuda", torch.bfloat16):
            loss = gist_fast.GistLoss()(model(x), y)
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) < 2e-2 * abs(losses[1])
    cos = torch.nn.functional.cosine_similarity(fused.gist_token.grad.flatten(), ref.gist_token.grad.flatten(), dim=0)
    assert cos > 0.99
