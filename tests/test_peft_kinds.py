"""GIST over VPT-shallow, LoRA (per-head q/v and qkv) and SSF: each kind against METHODS §6 written out here,
by hand, from the model's own tensors (outputs, loss, every gradient; fp64 and fp32), the parameter counts,
the init statistics, the order of the random draws, and the fused and memory-lean paths."""
import copy
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import gist_fast
from oracle import assert_oracle
from tiny import images, tiny_vit

KINDS = ["vpt", "lora", "qkv-lora", "ssf"]
OPTIONS = {"vpt": dict(prompts=5), "lora": dict(rank=3, alpha=0.7), "qkv-lora": dict(rank=3, alpha=5.0), "ssf": {}}
T, LAM = 10.0, 0.75  # the authors' gistb loss (METHODS §6)


# ---------------------------------------------------------------------------------------------
# METHODS §6, written out

def _ln(x, norm):
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _ssf(u, m, site):
    s = getattr(m, f"ssf_{site}", None)
    return u if s is None else u * s.scale + s.shift


def _drop(t, p, training):
    return F.dropout(t, p, training) if training and p > 0 else t


def _drop_path(t, dp, training):
    keep = 1.0 - getattr(dp, "drop_prob", 0.0)
    if not training or keep == 1.0:
        return t
    return t * t.new_empty(t.shape[0], 1, 1).bernoulli_(keep).div_(keep)


def _attention(x, blk, kind, cfg):
    attn = blk.attn
    B, N, D = x.shape
    H, dh = attn.num_heads, attn.head_dim
    h = _ssf(_ln(x, blk.norm1), blk, "norm1")
    qkv = _ssf(h @ attn.qkv.weight.T + attn.qkv.bias, blk, "qkv")
    if kind == "qkv-lora":  # Δ = (α/r) B A h
        qkv = qkv + cfg.alpha / cfg.rank * (h @ attn.qkv_lora.down.weight.T) @ attn.qkv_lora.up.weight.T
    q, k, v = qkv.reshape(B, N, 3, H, dh).permute(2, 0, 3, 1, 4)
    if kind == "lora":  # per head, shared factors, α with no α/r
        q = q + cfg.alpha * (q @ attn.lora_q.down.weight.T) @ attn.lora_q.up.weight.T
        v = v + cfg.alpha * (v @ attn.lora_v.down.weight.T) @ attn.lora_v.up.weight.T
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh), dim=-1) @ v
    return _ssf(a.transpose(1, 2).reshape(B, N, D) @ attn.proj.weight.T + attn.proj.bias, blk, "proj")


def _mlp(x, blk):
    mlp = blk.mlp
    h = _ssf(_ln(x, blk.norm2), blk, "norm2")
    u = _ssf(h @ mlp.fc1.weight.T + mlp.fc1.bias, blk, "fc1")
    return _ssf(F.gelu(u) @ mlp.fc2.weight.T + mlp.fc2.bias, blk, "fc2")


def spec_forward(model, img, kind, training, p_tokens=0.1):
    """(z_cls, z_gist) of METHODS §6; random draws: prompt mask, gist mask (both p = 0.1), then DropPath block
    by block."""
    cfg, pe = model.gist_fast_config, model.patch_embed
    x = F.conv2d(img, pe.proj.weight, pe.proj.bias, stride=pe.proj.stride).flatten(2).transpose(1, 2)
    x = _ssf(x, model, "patch")  # not on CLS, the gist token or the position embedding
    x = torch.cat([model.cls_token.expand(len(x), -1, -1), x], 1) + model.pos_embed
    x = _drop(x, model.pos_drop.p, training)
    B = x.shape[0]
    extra = []
    if kind == "vpt":  # dropout 0.1 on the expanded (B, N, D) prompts
        extra.append(_drop(model.prompt_tokens.expand(B, -1, -1), p_tokens, training))
    if cfg.gist:
        extra.insert(0, _drop(model.gist_token.expand(B, -1, -1), p_tokens, training))
    x = torch.cat([x[:, :1], *extra, x[:, 1:]], 1)  # [CLS, g, P_1..P_N, patches]
    for blk in model.blocks:
        x = x + _drop_path(_attention(x, blk, kind, cfg), blk.drop_path1, training)
        x = x + _drop_path(_mlp(x, blk), blk.drop_path2, training)
    x = _ssf(_ln(x, model.norm), model, "final")  # every token
    z = x @ model.head.weight.T + model.head.bias
    return (z[:, 0], z[:, 1]) if cfg.gist else (z[:, 0],)


def spec_loss(zc, zg=None, y=None):
    """CE + 0.5 CE_gist + λ (KL(c‖g) + KL(g‖c)) at temperature T, batch means, no T²; CE alone without gist."""
    if zg is None:
        return F.cross_entropy(zc, y)
    lc, lg = F.log_softmax(zc / T, -1), F.log_softmax(zg / T, -1)
    kl = ((lc.exp() * (lc - lg)).sum(-1) + (lg.exp() * (lg - lc)).sum(-1)).mean()
    return F.cross_entropy(zc, y) + 0.5 * F.cross_entropy(zg, y) + LAM * kl


# ---------------------------------------------------------------------------------------------

def _patched(kind, gist=True, fused=False, memory=None, dtype=torch.float32, **kw):
    model = tiny_vit(num_classes=5, **kw).to(dtype)
    gist_fast.patch(model, peft=kind, gist=gist, fused=fused, memory=memory, verbose=False, **OPTIONS[kind])
    with torch.no_grad():  # never zeros: the zero-initialised LoRA factor too
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())).to(dtype) * 0.3)
    return model


def _trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _run(model, fn, img, y, w):
    """Logits, the loss and every trainable gradient, with upstream gradients ≠ 1 (a weighted logit sum);
    the same seed before the forward, so that train mode draws the same masks."""
    for p in model.parameters():
        p.grad = None
    torch.manual_seed(7)
    z = fn(img)
    loss = spec_loss(*z, y=y)
    (loss + sum((zi * w * (i + 1)).sum() for i, zi in enumerate(z))).backward()
    return [*z, loss], {n: p.grad for n, p in _trainable(model).items()}


def _model_fn(model):
    def fn(img):
        out = model(img)
        return tuple(out) if model.gist_fast_config.gist else (out,)
    return fn


def _spec_fn(model, kind, p_tokens=0.1):
    return lambda img: spec_forward(model, img, kind, model.training, p_tokens)


def _compare(got, exp, check):
    (outs, grads), (exp_outs, exp_grads) = got, exp
    for i, (a, b) in enumerate(zip(outs, exp_outs)):
        check(a, b, f"output {i}")
    assert grads.keys() == exp_grads.keys()
    for n in exp_grads:
        check(grads[n], exp_grads[n], n)


def _close64(a, b, name):
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("gist", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_kind_matches_methods_in_float64(kind, gist):
    """Train mode with DropPath 0.3 in the last block: the same masks, drawn in the authors' order."""
    model = _patched(kind, gist=gist, dtype=torch.float64, drop_path_rate=0.3).train()
    img, y, w = images().double(), torch.tensor([0, 3, 1]), torch.randn(3, 5, dtype=torch.float64)
    _compare(_run(model, _model_fn(model), img, y, w), _run(model, _spec_fn(model, kind), img, y, w), _close64)


@pytest.mark.parametrize("fused,memory", [(False, None), ("auto", None), ("auto", "lean"), ("auto", "min")])
@pytest.mark.parametrize("kind", KINDS)
def test_kind_in_float32_against_the_oracle(kind, fused, memory):
    """fp32: ours (reference, fused ops, lean block) within twice the written-out fp32 forward's own error against
    float64, outputs, loss and every gradient (DESIGN rule 7); train mode (both outputs) without random draws."""
    model = _patched(kind, fused=fused, memory=memory).train()
    model.gist_drop.p = 0.0
    if kind == "vpt":
        model.prompt_drop.p = 0.0
    exact_model = copy.deepcopy(model).double()
    img, y, w = images(), torch.tensor([0, 3, 1]), torch.randn(3, 5)
    ours = _run(model, _model_fn(model), img, y, w)
    ref = _run(model, _spec_fn(model, kind, 0.0), img, y, w)
    exact = _run(exact_model, _spec_fn(exact_model, kind, 0.0), img.double(), y, w.double())
    for i, (a, b, c) in enumerate(zip(ours[0], ref[0], exact[0])):
        assert_oracle(a, b, c, f"output {i}")
    for n in exact[1]:
        assert_oracle(ours[1][n], ref[1][n], exact[1][n], n)


@pytest.mark.parametrize("amp", [False, True])
@pytest.mark.parametrize("memory", ["lean", "min"])
@pytest.mark.parametrize("kind", KINDS)
def test_lean_block_replays_the_eager_block_exactly(kind, memory, amp):
    """memory="lean"/"min" replays the eager forward: on CPU the same bits, with DropPath, attention and projection
    dropout (the same masks), under bf16 autocast, and for a backbone bias a user unfroze (fc1's)."""
    dropouts = dict(drop_path_rate=0.3, attn_drop_rate=0.2, proj_drop_rate=0.1)
    eager = _patched(kind, memory=None, fused="auto", **dropouts).train()
    lean = copy.deepcopy(eager)
    gist_fast.unpatch(lean)
    gist_fast.patch(lean, peft=kind, memory=memory, verbose=False, **OPTIONS[kind])
    lean.load_state_dict(eager.state_dict())
    for m in (eager, lean):
        for b in m.blocks:
            b.mlp.fc1.bias.requires_grad_(True)

    def fn(m):
        def forward(img):
            with torch.autocast("cpu", torch.bfloat16, enabled=amp):
                return _model_fn(m)(img)
        return forward

    img, y, w = images(), torch.tensor([0, 3, 1]), torch.randn(3, 5)
    got, exp = _run(lean, fn(lean), img, y, w), _run(eager, fn(eager), img, y, w)
    assert "blocks.0.mlp.fc1.bias" in got[1]
    _compare(got, exp, lambda a, b, n: torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m: f"{n}: {m}"))
    assert all(b.forward.func.__name__ == "lean_steps_forward" for b in lean.blocks)


def test_counts_on_vit_b16_with_gist_and_100_classes():
    """METHODS §6: VPT N = 200: 231,268; LoRA r = 4: 89,956; SSF: 283,492 (768·N, 3,072·r, 205,824 + 768 + 769·C);
    qkv-lora r = 4: 12 × 4 × (768 + 2,304) + 768 + 769·C."""
    expected = {"vpt": (dict(prompts=200), 231_268, 153_600), "lora": (dict(rank=4), 89_956, 12_288),
                "ssf": ({}, 283_492, 205_824), "qkv-lora": (dict(rank=4), 225_124, 147_456)}
    model = timm.create_model("vit_base_patch16_224", num_classes=100)
    for kind, (kw, total, own) in expected.items():
        m = gist_fast.patch(copy.deepcopy(model), peft=kind, gist=True, verbose=False, **kw)
        summary = gist_fast.parameter_summary(m)
        assert summary.trainable == total, kind
        assert summary.by_group == {"head": 76_900, "gist": 768, gist_fast.peft.KINDS[kind].group: own}, kind
        assert {n for n, p in m.named_parameters() if p.requires_grad} >= {"gist_token", "head.weight"}
        m_no = gist_fast.patch(copy.deepcopy(model), peft=kind, gist=False, verbose=False, **kw)
        assert gist_fast.parameter_summary(m_no).trainable == total - 768, kind


def test_names_shapes_and_init_statistics():
    """The tensors a timm/PEFT user reads, and METHODS §6's inits (ViT-B sizes: enough samples to test)."""
    model = timm.create_model("vit_base_patch16_224", num_classes=10)
    vpt = gist_fast.patch(copy.deepcopy(model), peft="vpt", prompts=200, verbose=False)
    p = vpt.prompt_tokens
    assert p.shape == (1, 200, 768) and p.min() >= -0.5 and p.max() <= 0.5
    assert abs(p.mean()) < 0.01 and abs(p.std() - 1 / math.sqrt(12)) < 0.01  # uniform(-0.5, 0.5)

    lora = gist_fast.patch(copy.deepcopy(model), peft="lora", rank=4, verbose=False)
    ups = torch.cat([getattr(b.attn, f"lora_{t}").up.weight.flatten() for b in lora.blocks for t in "qv"])
    for b in lora.blocks:
        for t in "qv":
            pair = getattr(b.attn, f"lora_{t}")
            assert pair.down.weight.shape == (4, 64) and pair.up.weight.shape == (64, 4)
            assert pair.down.bias is None and pair.up.bias is None and not pair.down.weight.any()  # down = 0
    assert ups.abs().max() <= 0.5 and abs(ups.std() - 0.5 / math.sqrt(3)) < 0.01  # U(±1/√r)
    assert not any("qkv_lora" in n for n, _ in lora.named_parameters())

    qkv = gist_fast.patch(copy.deepcopy(model), peft="qkv-lora", rank=8, alpha=16, verbose=False)
    pair = qkv.blocks[3].attn.qkv_lora
    assert pair.down.weight.shape == (8, 768) and pair.up.weight.shape == (2304, 8) and pair.scaling == 2.0
    downs = torch.cat([b.attn.qkv_lora.down.weight.flatten() for b in qkv.blocks])
    assert not pair.up.weight.any() and downs.abs().max() <= 1 / math.sqrt(768)  # A random, B zero
    assert abs(downs.std() - 1 / math.sqrt(3 * 768)) < 0.001

    ssf = gist_fast.patch(copy.deepcopy(model), peft="ssf", verbose=False)
    widths = {"norm1": 768, "qkv": 2304, "proj": 768, "norm2": 768, "fc1": 3072, "fc2": 768}
    for b in ssf.blocks:
        for site, width in widths.items():
            m = getattr(b, f"ssf_{site}")
            assert m.scale.shape == m.shift.shape == (width,)
    scales = torch.cat([m.scale for n, m in ssf.named_modules() if n.split(".")[-1].startswith("ssf_")])
    shifts = torch.cat([m.shift for n, m in ssf.named_modules() if n.split(".")[-1].startswith("ssf_")])
    assert 2 * scales.numel() == 205_824 and ssf.ssf_patch.scale.shape == ssf.ssf_final.shift.shape == (768,)
    assert abs(scales.mean() - 1) < 1e-3 and abs(scales.std() - 0.02) < 1e-3  # N(1, 0.02²)
    assert abs(shifts.mean()) < 1e-3 and abs(shifts.std() - 0.02) < 1e-3      # N(0, 0.02²)


def test_token_order_and_pooling():
    """[CLS, g, P_1..P_N, patches]: timm's pooling and patch dropout skip the gist token and the prompts."""
    model = gist_fast.patch(tiny_vit(global_pool="avg"), peft="vpt", prompts=4, verbose=False).eval()
    assert model.num_prefix_tokens == 1 + 1 + 4
    with torch.no_grad():
        tokens = model._pos_embed(model.patch_embed(images()))
    assert tokens.shape[1] == 1 + 1 + 4 + 16
    torch.testing.assert_close(tokens[:, 1], model.gist_token[0].expand(3, -1))
    torch.testing.assert_close(tokens[:, 2:6], model.prompt_tokens.expand(3, -1, -1))
    gist_fast.unpatch(model)
    assert model.num_prefix_tokens == 1 and "prompt_tokens" not in dict(model.named_parameters())


@pytest.mark.parametrize("kind", KINDS)
def test_unpatch_pickle_and_repatch(tmp_path, kind):
    model = tiny_vit()
    timm_out = model.eval()(images())
    patched = gist_fast.patch(model, peft=kind, verbose=False, **OPTIONS[kind])
    torch.save(patched, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False).eval()
    torch.testing.assert_close(loaded(images()), patched.eval()(images()), rtol=0, atol=0)
    gist_fast.unpatch(model)
    torch.testing.assert_close(model(images()), timm_out, rtol=0, atol=0)
    assert not any(k.startswith(("ssf", "prompt")) or "lora" in k for k in model.state_dict())
    gist_fast.patch(model, peft=kind, verbose=False, **OPTIONS[kind])


def test_clear_errors_for_the_new_options():
    with pytest.raises(ValueError, match="prompts= is vpt's option"):
        gist_fast.patch(tiny_vit(), peft="lora", prompts=10)
    with pytest.raises(ValueError, match="alpha= is the LoRA kinds' option"):
        gist_fast.patch(tiny_vit(), peft="adapter", alpha=2.0)
    with pytest.raises(ValueError, match="positive integer"):
        gist_fast.patch(tiny_vit(), peft="vpt", prompts=0)
    with pytest.raises(ValueError, match="finite"):
        gist_fast.patch(tiny_vit(), peft="lora", alpha=float("nan"))
    with pytest.raises(TypeError, match="peft='ssf' cannot patch this model: its patch embedding has a norm"):
        gist_fast.patch(tiny_vit(embed_layer=_normed_patch_embed), peft="ssf")
    with pytest.raises(TypeError, match="peft='lora' cannot patch this model: .*Mlp"):
        gist_fast.patch(tiny_vit(mlp_layer=timm.layers.SwiGLUPacked), peft="lora")


def _normed_patch_embed(**kw):
    return timm.layers.PatchEmbed(**{**kw, "norm_layer": torch.nn.LayerNorm})


def test_rank_is_no_difference_for_a_kind_without_one_and_dynamic_sizes_are_refused():
    ssf = gist_fast.patch(tiny_vit(), peft="ssf", rank=8, verbose=False)
    checkpoint = gist_fast.trainable_state_dict(gist_fast.patch(tiny_vit(), peft="ssf", verbose=False))
    gist_fast.load_trainable_state_dict(ssf, checkpoint)  # rank 8 vs 4: ssf has no rank
    lora = gist_fast.patch(tiny_vit(), peft="lora", rank=8, verbose=False)
    with pytest.raises(ValueError, match="rank: model 8 vs checkpoint 4"):
        gist_fast.load_trainable_state_dict(lora, gist_fast.trainable_state_dict(
            gist_fast.patch(tiny_vit(), peft="lora", verbose=False)))
    for kind, gist in (("vpt", False), ("lora", True)):
        with pytest.raises(ValueError, match="need a fixed image size"):
            gist_fast.patch(tiny_vit(dynamic_img_size=True), peft=kind, gist=gist, verbose=False)
    gist_fast.patch(tiny_vit(dynamic_img_size=True), peft="lora", gist=False, verbose=False)(images(size=40))


def test_alpha_must_be_positive():
    for alpha in (0, -3.0):
        with pytest.raises(ValueError, match="positive finite"):
            gist_fast.patch(tiny_vit(), peft="qkv-lora", alpha=alpha)
