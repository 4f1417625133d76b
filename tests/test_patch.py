import copy
import functools

import pytest
import timm
import torch

import gist_fast
from gist_fast import GistOutput
from tiny import images, tiny_vit

ADAPTER_KINDS = ["adapter", "seq-adapter", "adaptformer"]


def _patched_copy(model, **kw):
    return gist_fast.patch(copy.deepcopy(model), verbose=False, **kw)


def _assert_same_outputs(model, expected_model):
    """Bit-equal outputs in train mode (the same dropout draws) and in eval mode."""
    x = images()
    for mode in (True, False):
        model.train(mode), expected_model.train(mode)
        torch.manual_seed(0)
        expected = expected_model(x)
        torch.manual_seed(0)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("peft", ADAPTER_KINDS + ["ln", "linear", "channels"])
@pytest.mark.parametrize("fused", [False, "auto"])
def test_zero_peft_without_gist_equals_timm(peft, fused):
    model = tiny_vit()
    channels = [[0, 5, 7], [1, 2, 40]] if peft == "channels" else None
    patched = _patched_copy(model, peft=peft, gist=False, fused=fused, channels=channels)
    with torch.no_grad():
        for block in patched.blocks:
            if hasattr(block, "adapter"):  # zero up-projection: the adapter outputs exactly zero
                block.adapter.up.weight.zero_(), block.adapter.up.bias.zero_()
            if hasattr(block, "channel_linear"):
                block.channel_linear.linear.weight.zero_(), block.channel_linear.linear.bias.zero_()
    x = images()
    for mode in (True, False):
        model.train(mode), patched.train(mode)
        torch.testing.assert_close(patched(x), model(x), rtol=1e-5, atol=1e-5)


def test_gist_token_position_and_outputs():
    model = gist_fast.patch(tiny_vit(num_classes=7), verbose=False)
    assert model.gist_token.shape == (1, 1, 48) and model.num_prefix_tokens == 2
    assert model.gist_token.abs().max() <= 0.5
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    model.eval()
    out = model(images(batch=2))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 7)
    stream = seen[-1]
    assert stream.shape == (2, 2 + 16, 48)  # [CLS, gist, 4x4 patches]
    torch.testing.assert_close(stream[:, 1], model.gist_token[0].expand(2, -1))  # no position embedding
    torch.testing.assert_close(stream[:, 0], (model.cls_token + model.pos_embed[:, :1])[0].expand(2, -1))
    feats = model.forward_features(images(batch=2))
    torch.testing.assert_close(out, model.head(feats[:, 0]))
    model.train()
    train_out = model(images(batch=2))
    assert isinstance(train_out, GistOutput)
    assert train_out.logits.shape == train_out.gist_logits.shape == (2, 7)


def test_gist_logits_use_final_norm_and_shared_head():
    model = gist_fast.patch(tiny_vit(), verbose=False).train()
    model.gist_drop.p = 0.0  # make train mode deterministic
    x = images()
    out = model(x)
    feats = model.forward_features(x)
    torch.testing.assert_close(out.gist_logits, model.head(feats[:, 1]))
    torch.testing.assert_close(out.logits, model.head(feats[:, 0]))


def test_gist_dropout_only_in_training():
    model = gist_fast.patch(tiny_vit(), verbose=False)
    x = images()
    model.train()
    assert not torch.equal(model(x).gist_logits, model(x).gist_logits)
    model.eval()
    assert torch.equal(model(x), model(x))


def test_average_pooling_skips_the_gist_token():
    model = gist_fast.patch(tiny_vit(global_pool="avg", fc_norm=False), verbose=False).eval()
    x = images()
    feats = model.forward_features(x)
    torch.testing.assert_close(model(x), model.head(feats[:, 2:].mean(1)))


@pytest.mark.parametrize("peft", ADAPTER_KINDS + ["ln", "channels"])
def test_only_trainable_parameters_get_gradients(peft):
    channels = [[0, 5, 7], [1, 2, 40]] if peft == "channels" else None
    model = gist_fast.patch(tiny_vit(), peft=peft, channels=channels, verbose=False).train()
    loss = gist_fast.GistLoss()(model(images()), torch.tensor([0, 3, 4]))
    loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"gist_token", "head.weight", "head.bias"} <= trainable
    assert not any(n.startswith(("patch_embed", "pos_embed", "cls_token")) for n in trainable)


@pytest.mark.parametrize("peft", ADAPTER_KINDS + ["channels"])
def test_fused_matches_reference_path(peft):
    channels = [[0, 5, 7], [1, 2, 40]] if peft == "channels" else None
    base = tiny_vit()
    ref = _patched_copy(base, peft=peft, fused=False, channels=channels).train()
    fused = copy.deepcopy(ref)
    for m in fused.modules():
        if hasattr(m, "fused"):
            m.fused = True
    for model in (ref, fused):
        model.gist_drop.p = 0.0
        loss = gist_fast.GistLoss()(model(images()), torch.tensor([0, 3, 4]))
        loss.backward()
    for (name, p), q in zip(ref.named_parameters(), fused.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("name,peft,gist,expected", [
    ("vit_base_patch16_224", "adapter", True, 82_992 + 768),
    ("vit_base_patch16_224", "seq-adapter", False, 82_992),
    ("vit_small_patch16_224", "seq-adapter", False, 41_520),
    ("vit_base_patch16_224", "ln", False, 38_400),
])
def test_parameter_counts(name, peft, gist, expected):
    classes = 100
    model = gist_fast.patch(timm.create_model(name, num_classes=classes), peft=peft, gist=gist, verbose=False)
    head = (model.embed_dim + 1) * classes
    assert gist_fast.parameter_summary(model).trainable == expected + head


def test_channels_parameter_count():
    model = timm.create_model("vit_base_patch16_224", num_classes=10)
    channels = [list(range(0, 768, 8))] * 12
    gist_fast.patch(model, peft="channels", gist=False, channels=channels, verbose=False)
    summary = gist_fast.parameter_summary(model)
    assert summary.by_group["channels"] == 111_744 and summary.by_group["layernorms"] == 38_400


def test_patch_prints_a_summary(capsys):
    gist_fast.patch(tiny_vit(), peft="adapter")
    assert "trainable params:" in capsys.readouterr().out


def test_clear_errors():
    with pytest.raises(TypeError, match="supports timm VisionTransformer"):
        gist_fast.patch(torch.nn.Linear(3, 3))
    with pytest.raises(TypeError, match="distillation token|VisionTransformerDistilled"):
        gist_fast.patch(timm.create_model("deit_tiny_distilled_patch16_224"))
    model = gist_fast.patch(tiny_vit(), verbose=False)
    with pytest.raises(RuntimeError, match="already patched"):
        gist_fast.patch(model)
    with pytest.raises(ValueError, match="unknown peft 'dora'"):
        gist_fast.patch(tiny_vit(), peft="dora")
    with pytest.raises(ValueError, match="needs channels="):
        gist_fast.patch(tiny_vit(), peft="channels")
    with pytest.raises(ValueError, match=r"distinct indices in \[0, 48\)"):
        gist_fast.patch(tiny_vit(), peft="channels", channels=[[0, 48], [1, 2]])
    with pytest.raises(ValueError, match="one index list per block"):
        gist_fast.patch(tiny_vit(), peft="channels", channels=[[0, 1]])
    with pytest.raises(ValueError, match="fused must be"):
        gist_fast.patch(tiny_vit(), fused="yes")
    with pytest.raises(TypeError, match="GistLoss needs"):
        gist_fast.GistLoss()(torch.zeros(2, 5), torch.tensor([0, 1]))


@pytest.mark.parametrize("peft,memory", [("adapter", "lean"), ("adapter", None), ("seq-adapter", None), ("ln", None)])
def test_whole_patched_model_saves_and_loads(tmp_path, peft, memory):
    """torch.save(model) of a patched model opens again with torch.load and computes the same."""
    model = gist_fast.patch(tiny_vit(num_classes=5), peft=peft, gist=peft == "adapter", memory=memory, verbose=False)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert loaded.gist_fast_config == model.gist_fast_config
    assert all(b.forward.args[0] is b for b in loaded.blocks if isinstance(b.forward, functools.partial))
    _assert_same_outputs(loaded, model)


def test_a_kind_is_one_registry_entry(monkeypatch):
    """A new PEFT kind: its module, its block forward and what trains come from its KINDS entry alone."""
    from torch import nn

    from gist_fast.peft import KINDS, PeftKind

    class Bias(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.bias = nn.Parameter(torch.zeros(dim))

    def forward(block, x, **attn_kwargs):
        return type(block).forward(block, x, **attn_kwargs) + block.shift.bias

    kind = PeftKind("shift", ("shift",), lambda config, block, i: {"shift": Bias(48)}, "shifts", forward)
    monkeypatch.setitem(KINDS, "shift", kind)
    model = gist_fast.patch(tiny_vit(num_classes=5), peft="shift", gist=True, verbose=False)
    summary = gist_fast.parameter_summary(model)
    assert summary.by_group["shifts"] == 2 * 48 and summary.trainable == 2 * 48 + 48 + 5 * 49
    with torch.no_grad():
        model.blocks[1].shift.bias.fill_(1.0)
    model.eval()
    x = images()
    with torch.no_grad():
        shifted = model.forward_features(x)
        model.blocks[1].shift.bias.zero_()
        plain = model.forward_features(x)
    assert not torch.allclose(shifted, plain)  # the kind's forward is the one bound
    loaded = gist_fast.load_trainable_state_dict(tiny_vit(num_classes=5), gist_fast.trainable_state_dict(model))
    assert gist_fast.patch_config(loaded) == gist_fast.patch_config(model)


@pytest.mark.parametrize("peft,gist,memory", [("adapter", True, "lean"), ("adapter", True, None),
                                              ("adaptformer", False, "min"), ("ln", False, None),
                                              ("channels", False, None)])
def test_unpatch_gives_back_the_timm_model(peft, gist, memory):
    """unpatch() after patch(): timm's outputs, structure and trainable set; patching again works."""
    model = tiny_vit(num_classes=5)
    model.pos_embed.requires_grad_(False)  # a user's own freezing comes back as it was
    timm_copy = copy.deepcopy(model)
    channels = [[0, 5, 7], [1, 2, 40]] if peft == "channels" else None
    patched = gist_fast.patch(model, peft=peft, gist=gist, memory=memory, channels=channels, verbose=False)
    assert gist_fast.unpatch(patched) is model
    assert not hasattr(model, "gist_fast_config") and not hasattr(model, "gist_token")
    assert model.state_dict().keys() == timm_copy.state_dict().keys()
    assert {n: p.requires_grad for n, p in model.named_parameters()} == \
        {n: p.requires_grad for n, p in timm_copy.named_parameters()}
    assert all("forward" not in b.__dict__ for b in model.blocks) and "forward" not in model.__dict__
    _assert_same_outputs(model, timm_copy)
    again = gist_fast.patch(model, peft=peft, gist=gist, memory=memory, channels=channels, verbose=False)
    assert again.gist_fast_config == _patched_copy(timm_copy, peft=peft, gist=gist, memory=memory,
                                                   channels=channels).gist_fast_config
    with pytest.raises(ValueError, match="not patched"):
        gist_fast.unpatch(gist_fast.unpatch(again))
