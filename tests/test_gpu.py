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

    def rnd(*s, std=1.0):
        return torch.randn(*s, device="cuda", generator=g) * std

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
    for fn, dtype in ((ops.gist_loss, torch.bfloat16), (reference.gist_loss, torch.bfloat16),
                      (reference.gist_loss, torch.float64)):
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


@pytest.mark.parametrize("loss_fn", ["gist", "distill"])
def test_loss_is_one_launch_each_way(loss_fn):
    """Forward + backward of the fused loss: our two kernels, nothing else but autograd's seed gradient."""
    fn = ops.gist_loss if loss_fn == "gist" else ops.distill_loss
    a, b = (torch.randn(256, 1000, device="cuda", requires_grad=True) for _ in range(2))
    y = torch.randint(0, 1000, (256,), device="cuda")
    fn(a, b, y).backward()  # compile first
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn(a, b, y).backward()
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    ours = [k for k in kernels if "pair_loss" in k]
    others = [k for k in kernels if "pair_loss" not in k and "fill" not in k.lower()]
    assert len(ours) == 2 and not others, kernels


def test_loss_captures_and_replays_in_a_cuda_graph():
    a, b = (torch.randn(256, 100, device="cuda", requires_grad=True) for _ in range(2))
    y = torch.randint(0, 100, (256,), device="cuda")
    y[::9] = -100
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compilation) outside the capture
        for _ in range(2):
            a.grad = b.grad = None
            ops.gist_loss(a, b, y).backward()
    torch.cuda.current_stream().wait_stream(side)
    a.grad = b.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = ops.gist_loss(a, b, y)
        loss.backward()
    for _ in range(3):
        with torch.no_grad():
            a.copy_(torch.randn_like(a) * 3)
            b.copy_(torch.randn_like(b) * 3)
        graph.replay()
        torch.cuda.synchronize()
        a64, b64 = (t.detach().double().requires_grad_() for t in (a, b))
        ref = reference.gist_loss(a64, b64, y)
        ref.backward()
        torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.grad.double(), a64.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(b.grad.double(), b64.grad, rtol=1e-4, atol=1e-6)


def test_adapter_weight_gradients_deterministic_on_request():
    from gist_fast.ops.adapter import adapter_bwd

    rows, dim, rank = 128 * 198, 768, 64
    x, go = torch.randn(rows, dim, device="cuda"), torch.randn(rows, dim, device="cuda")
    wd, bd = torch.randn(rank, dim, device="cuda") * dim ** -0.5, torch.zeros(rank, device="cuda")
    wu = torch.randn(dim, rank, device="cuda") * rank ** -0.5
    args = (go, None, x, wd, bd, wu, 0.1, None, None, None, None, True)
    torch.use_deterministic_algorithms(True)
    try:
        first, second = (adapter_bwd(*args) for _ in range(2))
    finally:
        torch.use_deterministic_algorithms(False)
    assert all(torch.equal(p, q) for p, q in zip(first, second))


@pytest.mark.parametrize("memory", [None, "lean"])
@pytest.mark.parametrize("kind", ["vpt", "lora", "qkv-lora", "ssf"])
def test_vit_base_new_kinds_step_matches_reference_under_bf16_autocast(kind, memory):
    """GIST over vpt, lora, qkv-lora and ssf on ViT-B/16: the fused ops (Triton) and the lean blocks against the
    plain-PyTorch reference in one bf16-autocast step: the loss, and every PEFT gradient's direction."""
    import timm

    base = timm.create_model("vit_base_patch16_224", num_classes=100).cuda()
    fused = gist_fast.patch(copy.deepcopy(base), peft=kind, memory=memory, verbose=False).train()
    ref = gist_fast.patch(copy.deepcopy(base), peft=kind, fused=False, verbose=False).train()
    with torch.no_grad():  # never zeros (LoRA's zero-initialised factor)
        for p in fused.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    ref.load_state_dict(fused.state_dict())
    x, y = torch.randn(16, 3, 224, 224, device="cuda"), torch.randint(0, 100, (16,), device="cuda")
    losses = []
    for model in (fused, ref):
        torch.manual_seed(0)  # the same dropout masks (gist token, prompts)
        with torch.autocast("cuda", torch.bfloat16):
            loss = gist_fast.GistLoss()(model(x), y)
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) < 2e-2 * abs(losses[1])
    grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    for n, p in fused.named_parameters():
        if p.requires_grad:
            cos = torch.nn.functional.cosine_similarity(p.grad.flatten().float(), grads[n].flatten().float(), dim=0)
            assert cos > 0.98, (n, cos.item())
