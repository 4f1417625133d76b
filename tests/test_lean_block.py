"""The lean block path (gist_fast.lean_block) against the eager reference block: forward and every
gradient, fp32 and bf16 autocast, odd token counts, upstream gradients != 1, DropPath, fallbacks."""
import copy
import functools

import pytest
import torch
from torch import nn

import gist_fast
from gist_fast import lean_block
from gist_fast.peft.adapter import gist_adapter_forward
from oracle import assert_oracle
from tiny import images, tiny_vit

# img 40 / patch 8: 25 patches + CLS + gist = 27 tokens (odd)
KW = dict(img_size=40, drop_path_rate=0.0)


def _pair(peft="adapter", memory="lean", gist=True, seed=3, dtype=torch.float32, **kw):
    base = tiny_vit(seed=seed, **{**KW, **kw})
    ref = gist_fast.patch(copy.deepcopy(base), peft=peft, gist=gist, fused=False, verbose=False)
    lean = gist_fast.patch(copy.deepcopy(base), peft=peft, gist=gist, fused="auto", memory=memory, verbose=False)
    lean.load_state_dict(ref.state_dict())
    for m in (ref, lean):
        m.to(dtype).train()
        if gist:
            m.gist_drop.p = 0.0
    return ref, lean


def _grads(model, x, target, amp, weight):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", torch.bfloat16, enabled=amp):
        out = model(x)
        logits = torch.cat(list(out), 1) if isinstance(out, tuple) else out
        loss = (logits.float() * weight).sum() + gist_fast.GistLoss(fused=False)(out, target) \
            if isinstance(out, tuple) else (logits.float() * weight).sum()
    loss.backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
    grads["input"] = x.grad.float().clone()
    return logits.detach().float(), grads


def _check(ref, lean, amp, oracle=None):
    x, target = images(4, size=40), torch.tensor([0, 1, 2, 3])
    n_out = 10 if ref.gist_fast_config.gist else 5
    weight = torch.randn(4, n_out, generator=torch.Generator().manual_seed(7))  # upstream gradients != 1
    out_ref, g_ref = _grads(ref, x, target, amp, weight)
    out_lean, g_lean = _grads(lean, x, target, amp, weight)
    if oracle is None:
        torch.testing.assert_close(out_lean, out_ref, rtol=1e-5, atol=1e-5)
        for name in g_ref:
            torch.testing.assert_close(g_lean[name], g_ref[name], rtol=1e-4, atol=1e-5, msg=name)
        return
    out_64, g_64 = oracle  # DESIGN rule 7: within twice the reference's own error against float64
    assert_oracle(out_lean, out_ref, out_64, "logits")
    for name in g_ref:
        assert_oracle(g_lean[name], g_ref[name], g_64[name], name)


@pytest.mark.parametrize("memory", ["lean", "min"])
@pytest.mark.parametrize("peft", ["adapter", "adaptformer"])
def test_fp32_matches_reference(peft, memory):
    ref, lean = _pair(peft, memory)
    _check(ref, lean, amp=False)


@pytest.mark.parametrize("memory", ["lean", "min"])
def test_no_gist_and_layerscale(memory):
    ref, lean = _pair("adapter", memory, gist=False, init_values=0.5)
    _check(ref, lean, amp=False)


@pytest.mark.parametrize("memory", ["lean", "min"])
@pytest.mark.parametrize("peft", ["adapter", "adaptformer"])
def test_bf16_autocast_within_twice_reference_error(peft, memory):
    ref, lean = _pair(peft, memory)
    ref64 = copy.deepcopy(ref).double()
    x, target = images(4, size=40), torch.tensor([0, 1, 2, 3])
    weight = torch.randn(4, 10, generator=torch.Generator().manual_seed(7))
    ref64.zero_grad()
    x64 = x.double().requires_grad_()
    out = ref64(x64)
    loss = (torch.cat(list(out), 1) * weight.double()).sum() + gist_fast.GistLoss(fused=False)(out, target)
    loss.backward()
    g64 = {n: p.grad for n, p in ref64.named_parameters() if p.requires_grad}
    g64["input"] = x64.grad
    _check(ref, lean, amp=True, oracle=(torch.cat(list(out), 1).detach(), g64))


def test_bf16_model_runs_and_matches_reference():
    ref, lean = _pair("adapter", "lean", dtype=torch.bfloat16)
    x = images(4, size=40).bfloat16()
    torch.testing.assert_close(lean(x).logits, ref(x).logits, rtol=5e-2, atol=5e-2)


def test_trainable_layernorms_get_gradients():
    ref, lean = _pair("adapter", "lean")
    for m in (ref, lean):
        for b in m.blocks:
            for n in (b.norm1, b.norm2):
                n.weight.requires_grad_(True)
                n.bias.requires_grad_(True)
    _check(ref, lean, amp=False)


def test_drop_path_same_masks_as_timm():
    ref, lean = _pair("adapter", "lean", drop_path_rate=0.3)
    assert lean_block.unsupported_reason(lean.blocks[1]) is None
    x, target = images(6, size=40), torch.tensor([0, 1, 2, 3, 4, 0])
    results = []
    for m in (ref, lean):
        torch.manual_seed(11)
        m.zero_grad()
        out = m(x)
        gist_fast.GistLoss(fused=False)(out, target).backward()
        results.append((out.logits.detach(), m.blocks[0].adapter.down.weight.grad.clone()))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # the masks really drop something
        torch.manual_seed(12)
        a = lean(x).logits
        torch.manual_seed(13)
        assert not torch.allclose(a, lean(x).logits)


def test_eval_and_no_grad_match():
    ref, lean = _pair("adapter", "lean")
    ref.eval(), lean.eval()
    x = images(3, size=40)
    with torch.no_grad():
        torch.testing.assert_close(lean(x), ref(x), rtol=1e-5, atol=1e-5)


@pytest.fixture
def lean_calls(monkeypatch):
    """One entry per block forward that ran the lean autograd Function."""
    calls, orig = [], lean_block._LeanBlock.apply

    def spy(*a):
        calls.append(1)
        return orig(*a)

    monkeypatch.setattr(lean_block._LeanBlock, "apply", spy)
    return calls


def test_falls_back_on_attention_dropout(lean_calls):
    ref, lean = _pair("adapter", "lean", attn_drop_rate=0.1)
    x = images(2, size=40)
    lean.train()
    gist_fast.GistLoss(fused=False)(lean(x), torch.tensor([0, 1])).backward()
    assert not lean_calls  # training with attention dropout: the eager block
    lean.blocks[0].attn.attn_drop.p = 0.0
    lean.blocks[1].attn.attn_drop.p = 0.0
    gist_fast.GistLoss(fused=False)(lean(x), torch.tensor([0, 1])).backward()
    assert len(lean_calls) == 2


@pytest.mark.parametrize("kw,why", [
    (dict(qk_norm=True), "qk-norm"),
    (dict(norm_layer=functools.partial(nn.LayerNorm, elementwise_affine=False)), "affine LayerNorms"),
    (dict(norm_layer=functools.partial(nn.LayerNorm, bias=False)), "with weight and bias"),
])
def test_patch_keeps_the_eager_block_where_lean_cannot_serve(kw, why, capsys, lean_calls):
    """The block's structure is judged once, by patch(), which says why a block keeps the eager forward."""
    gist_fast.patch(tiny_vit(**KW, **kw), memory="lean")
    out = capsys.readouterr().out
    assert "blocks=eager (not lean: " in out and why in out
    ref, lean = _pair("adapter", "lean", **kw)
    assert all(b.forward.func is gist_adapter_forward for b in lean.blocks)
    _check(ref, lean, amp=False)
    assert not lean_calls


def test_served_blocks_are_not_rechecked_per_call(monkeypatch, lean_calls):
    ref, lean = _pair("adaptformer", "min")
    monkeypatch.setattr(lean_block, "unsupported_reason", lambda block: pytest.fail("structure re-checked per call"))
    _check(ref, lean, amp=False)
    assert len(lean_calls) == 2


def test_backbone_weight_unfrozen_after_patch_gets_its_gradient(lean_calls):
    """requires_grad stays a per-call check: the lean path would leave an unfrozen weight without a gradient."""
    ref, lean = _pair("adapter", "lean")
    for m in (ref, lean):
        m.blocks[0].mlp.fc1.weight.requires_grad_(True)
    _check(ref, lean, amp=False)  # compares blocks.0.mlp.fc1.weight's gradient too
    assert len(lean_calls) == 1  # block 1 stays lean


def test_auto_memory_is_resolved_from_the_input_device(lean_calls):
    """memory="auto" stays "auto" in the bound forward (a model may move to CUDA after patch()); on a CPU input it
    is the eager block with the fused ops."""
    model = gist_fast.patch(tiny_vit(**KW), verbose=False).train()
    assert {b.forward.keywords["mode"] for b in model.blocks} == {"auto"}
    model(images(2, size=40)).logits.sum().backward()
    assert not lean_calls


def test_adapter_contract_matches_reference():
    """The fused op's contract in plain torch (its backend on other devices)."""
    from gist_fast import reference
    from gist_fast.ops import adapter_torch

    torch.manual_seed(0)
    M, D, r = 27, 24, 4
    x, br = (torch.randn(M, D, dtype=torch.float64, requires_grad=True),
             torch.randn(M, D, dtype=torch.float64, requires_grad=True))
    wd, bd = ((torch.randn(r, D, dtype=torch.float64) * 0.3).requires_grad_(),
              torch.randn(r, dtype=torch.float64).requires_grad_())
    wu, bu = ((torch.randn(D, r, dtype=torch.float64) * 0.3).requires_grad_(),
              torch.randn(D, dtype=torch.float64).requires_grad_())
    nw, nb = torch.randn(D, dtype=torch.float64).requires_grad_(), torch.randn(D, dtype=torch.float64).requires_grad_()
    out, normed = reference.adapter_norm(x, wd, bd, wu, bu, 0.1, nw, nb, 1e-6, branch=br)
    go, gn = torch.randn_like(out), torch.randn_like(out)
    want = torch.autograd.grad([out, normed], [x, br, wd, bd, wu, bu, nw, nb], [go, gn])
    o, n, mean, rstd = adapter_torch.adapter_fwd(x.detach(), wd.detach(), bd.detach(), wu.detach(), bu.detach(), 0.1,
                                                     None, br.detach(), nw.detach(), nb.detach(), 1e-6)
    torch.testing.assert_close(o, out.detach())
    torch.testing.assert_close(n, normed.detach())
    got = adapter_torch.adapter_bwd(go, gn, x.detach(), wd.detach(), bd.detach(), wu.detach(), 0.1, o, nw.detach(),
                                        mean, rstd, True)
    for g, w in zip(got[:1] + got[1:2] + got[2:], want):
        torch.testing.assert_close(g.double(), w, rtol=1e-6, atol=1e-8)


def test_patch_memory_argument():
    with pytest.raises(ValueError, match="memory must be"):
        gist_fast.patch(tiny_vit(), memory="tiny", verbose=False)
    assert gist_fast.patch(tiny_vit(), fused=False, verbose=False).gist_fast_config.memory is None
    assert gist_fast.patch(tiny_vit(), peft="ln", verbose=False).gist_fast_config.memory is None
    assert gist_fast.patch(tiny_vit(), memory="min", verbose=False).gist_fast_config.memory == "min"
    assert gist_fast.patch(tiny_vit(), verbose=False).gist_fast_config.memory == "auto"


def test_float64_takes_the_eager_block(lean_calls):
    """The op computes fp32 / bf16 / fp16: a float64 model (an oracle run) takes the eager block, whose ops take
    the reference, instead of failing in the op."""
    ref, lean = _pair("adapter", "lean", dtype=torch.float64)
    x = images(2, size=40).double()
    for m in (ref, lean):
        out = m(x)
        (out.logits.sum() + 0.5 * out.gist_logits.sum()).backward()
    torch.testing.assert_close(lean(x).logits, ref(x).logits, rtol=1e-12, atol=1e-12)
    for (name, p), q in zip(ref.named_parameters(), lean.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-12, atol=1e-12, msg=name)
    assert not lean_calls
