"""gist_fast.merge / unmerge: lora, qkv-lora and ssf folded into the frozen weights, with and without the Gist
token, random non-zero PEFT tensors. Merged eval logits against the unmerged model's (DESIGN rule 7's oracle
in fp32 and bf16: the merged model's error against the float64 model within twice the unmerged model's own;
float64 to 1e-12), timm's own forwards once merged, unmerge's weights (fp64 1e-12, fp32 1e-5, bf16 2e-2 of each
tensor's largest magnitude, before or after the merge) and the patched forwards back, trainability, pickling,
and the errors."""
import copy

import pytest
import timm
import torch

import gist_fast
from gist_fast.merge import MERGED, is_merged
from gist_fast.patch import _peft_pos_embed
from oracle import assert_oracle
from tiny import images, tiny_vit

KINDS = ["lora", "qkv-lora", "ssf"]
OPTIONS = {"lora": dict(rank=3, alpha=0.7), "qkv-lora": dict(rank=3, alpha=5.0), "ssf": {}}
WEIGHT_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}
NOISE = 0.2  # added to every PEFT tensor: the zero-initialised LoRA factor too


def _patched(kind, gist=True, dtype=torch.float64, fused=False, memory=None, **kw):
    """A tiny ViT patched with random non-zero PEFT tensors (drawn in float64, then cast), in eval mode."""
    model = tiny_vit(num_classes=5, **kw).double()
    gist_fast.patch(model, peft=kind, gist=gist, fused=fused, memory=memory, verbose=False, **OPTIONS.get(kind, {}))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                g = torch.Generator().manual_seed(p.numel())
                p.add_(torch.randn(p.shape, dtype=torch.float64, generator=g) * NOISE)
    return model.to(dtype).eval()


def _logits(model, dtype=None):
    img = images()
    with torch.no_grad():
        return model(img.to(dtype or next(model.parameters()).dtype))


def _state(model):
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def _bound(model):
    """What patch() binds: each block's forward, the final norm's, _pos_embed."""
    return ([b.__dict__.get("forward") for b in model.blocks], model.norm.__dict__.get("forward"),
            model.__dict__.get("_pos_embed"))


def _assert_weights_back(model, before, merged, dtype):
    now = model.state_dict()
    assert now.keys() == before.keys()
    for name, t in before.items():
        scale = max(t.double().abs().max().item(), merged[name].double().abs().max().item(), 1e-30)
        err = (now[name].double() - t.double()).abs().max().item()
        assert err <= WEIGHT_TOL[dtype] * scale, f"{name}: unmerged off by {err:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
@pytest.mark.parametrize("gist", [True, False], ids=["gist", "no-gist"])
@pytest.mark.parametrize("kind", KINDS)
def test_merge_keeps_the_logits_runs_timm_forwards_and_unmerge_gives_everything_back(kind, gist, dtype):
    exact = _logits(_patched(kind, gist))  # the float64 model: the oracle
    model = _patched(kind, gist, dtype)
    unmerged, before, bound = _logits(model), _state(model), _bound(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(f is not None for f in bound[0])

    assert gist_fast.merge(model) is model and is_merged(model)
    merged = _logits(model)
    if dtype == torch.float64:
        torch.testing.assert_close(merged, unmerged, rtol=1e-12, atol=1e-12)
    else:
        assert_oracle(merged, unmerged, exact, f"{kind} merged logits")
    # timm's own forwards: the blocks, the final norm, and _pos_embed only where the Gist token needs it
    assert all("forward" not in b.__dict__ for b in model.blocks) and "forward" not in model.norm.__dict__
    pos = model.__dict__.get("_pos_embed")
    if gist:
        assert pos.func is _peft_pos_embed and pos.keywords["patch_tokens"] is None and pos.keywords["gist"]
    else:
        assert pos is None
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora" in n or "ssf" in n)
    folded = _state(model)
    assert any(not torch.equal(folded[n], before[n]) for n in before)

    assert gist_fast.unmerge(model) is model and not is_merged(model)
    _assert_weights_back(model, before, folded, dtype)
    after = _logits(model)
    if dtype == torch.float64:
        torch.testing.assert_close(after, unmerged, rtol=1e-12, atol=1e-12)
    else:
        assert_oracle(after, unmerged, exact, f"{kind} unmerged logits")
    forwards, norm_forward, pos_embed = _bound(model)
    assert all(a is b for a, b in zip(forwards, bound[0])) and norm_forward is bound[1]
    assert (pos_embed is None) == (bound[2] is None)
    if pos_embed is not None:
        assert pos_embed.keywords == bound[2].keywords
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    assert MERGED not in model.__dict__


@pytest.mark.parametrize("kind", KINDS)
def test_a_merged_model_without_gist_token_is_a_plain_timm_model(kind):
    """Its backbone weights, loaded into a fresh timm ViT, give the same logits bit for bit."""
    model = gist_fast.merge(_patched(kind, gist=False, dtype=torch.float32))
    timm_model = tiny_vit(num_classes=5).eval()
    timm_model.load_state_dict({k: v for k, v in model.state_dict().items() if k in timm_model.state_dict()})
    torch.testing.assert_close(_logits(timm_model), _logits(model), rtol=0, atol=0)


def _bias_free_patch_embed(**kw):
    return timm.layers.PatchEmbed(**{**kw, "bias": False})


@pytest.mark.parametrize("kind", KINDS)
def test_structure_variants_bias_free_layers_qk_norm_scale_norms_layer_scale(kind):
    """qkv, proj and the patch projection without bias (ssf gives them one, unmerge takes it away), q/k norms
    after the LoRA update, the attention and MLP scale-norms, LayerScale."""
    kw = dict(qkv_bias=False, proj_bias=False, qk_norm=True, scale_attn_norm=True, scale_mlp_norm=True,
              init_values=0.5, embed_layer=_bias_free_patch_embed)
    exact = _logits(_patched(kind, **kw))
    model = _patched(kind, dtype=torch.float32, **kw)
    unmerged, before = _logits(model), _state(model)
    assert model.blocks[0].attn.qkv.bias is None and model.patch_embed.proj.bias is None
    gist_fast.merge(model)
    assert_oracle(_logits(model), unmerged, exact, f"{kind} merged logits")
    if kind == "ssf":
        assert model.blocks[0].attn.qkv.bias is not None and model.patch_embed.proj.bias is not None
        assert not model.patch_embed.proj.bias.requires_grad
    merged = _state(model)
    gist_fast.unmerge(model)
    assert model.blocks[0].attn.qkv.bias is None and model.patch_embed.proj.bias is None
    assert model.blocks[0].attn.proj.bias is None
    _assert_weights_back(model, before, {n: merged.get(n, t) for n, t in before.items()}, torch.float32)


def test_the_lean_forwards_come_back():
    """fused ops with memory="lean": unmerge binds patch()'s lean block forwards again, and they train."""
    model = _patched("lora", fused="auto", memory="lean", dtype=torch.float32)
    forwards = _bound(model)[0]
    out = _logits(model)
    gist_fast.unmerge(gist_fast.merge(model))
    assert all(a is b for a, b in zip(_bound(model)[0], forwards))
    torch.testing.assert_close(_logits(model), out, rtol=1e-5, atol=1e-5)
    model.train()
    gist_fast.GistLoss()(model(images()), torch.tensor([0, 1, 2])).backward()
    assert model.blocks[0].attn.lora_q.down.weight.grad is not None


def test_a_merged_model_trains_the_head_and_gist_only():
    model = _patched("ssf", dtype=torch.float32)
    total = gist_fast.parameter_summary(model).trainable
    gist_fast.merge(model)
    summary = gist_fast.parameter_summary(model)
    assert summary.trainable == total - summary.by_group["ssf"] == 245 + 48
    model.train()
    gist_fast.GistLoss()(model(images()), torch.tensor([0, 1, 2])).backward()
    assert model.gist_token.grad is not None and model.head.weight.grad is not None
    assert all(p.grad is None for n, p in model.named_parameters() if "ssf" in n)
    gist_fast.unmerge(model)
    assert gist_fast.parameter_summary(model).trainable == total


def test_trainable_state_dict_of_a_merged_model_keeps_the_peft_tensors():
    """A merged model's checkpoint holds the PEFT tensors as trained; it loads into a fresh model, not a merged one."""
    model = _patched("lora", dtype=torch.float32)
    saved = gist_fast.trainable_state_dict(model)["state_dict"]
    merged = gist_fast.trainable_state_dict(gist_fast.merge(model))
    assert merged["state_dict"].keys() == saved.keys()
    assert all(torch.equal(merged["state_dict"][k], v) for k, v in saved.items())
    with pytest.raises(ValueError, match="the model is merged"):
        gist_fast.load_trainable_state_dict(model, merged)
    fresh = gist_fast.load_trainable_state_dict(tiny_vit().float(), merged).eval()
    torch.testing.assert_close(_logits(fresh), _logits(model))


def test_a_merged_model_pickles_and_unmerges_after_loading(tmp_path):
    model = gist_fast.merge(_patched("ssf", dtype=torch.float32))
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=0)
    twin = copy.deepcopy(model)
    for m in (loaded, twin):
        gist_fast.unmerge(m)
        assert all(b.forward.args[0] is b for b in m.blocks)  # bound to its own blocks, not the original's
    torch.testing.assert_close(_logits(loaded), _logits(gist_fast.unmerge(model)), rtol=0, atol=0)


# --- errors ------------------------------------------------------------------------------------------------

def test_second_merge_unmerge_of_an_unmerged_model_unpatch_and_patch_of_a_merged_one():
    model = _patched("qkv-lora", dtype=torch.float32)
    with pytest.raises(RuntimeError, match="not merged"):
        gist_fast.unmerge(model)
    gist_fast.merge(model)
    before = _state(model)
    with pytest.raises(RuntimeError, match="already merged.*fold the PEFT tensors twice"):
        gist_fast.merge(model)
    with pytest.raises(RuntimeError, match="merged.*unmerge\\(model\\) first"):
        gist_fast.unpatch(model)
    with pytest.raises(RuntimeError, match="already patched"):
        gist_fast.patch(model)
    assert all(torch.equal(before[n], t) for n, t in _state(model).items())
    gist_fast.unpatch(gist_fast.unmerge(model))
    with pytest.raises(ValueError, match="not patched"):
        gist_fast.merge(model)
    with pytest.raises(ValueError, match="not patched"):
        gist_fast.unmerge(tiny_vit())


@pytest.mark.parametrize("kind,why", [("vpt", "prompts are tokens"), ("adapter", "GELU"), ("seq-adapter", "GELU"),
                                      ("adaptformer", "GELU"), ("channels", "residual stream"),
                                      ("ln", "LayerNorms' own weights"), ("linear", "only the head trains")])
def test_kinds_with_nothing_to_fold_are_refused(kind, why):
    model = tiny_vit()
    channels = [[0, 1, 2]] * len(model.blocks) if kind == "channels" else None
    gist_fast.patch(model, peft=kind, gist=kind != "seq-adapter", channels=channels, verbose=False)
    before = _state(model)
    with pytest.raises(ValueError, match=f"peft='{kind}' has nothing to merge: .*{why}"):
        gist_fast.merge(model)
    assert not is_merged(model) and all(torch.equal(before[n], t) for n, t in _state(model).items())


def test_ssf_with_a_zero_scale_merges_but_does_not_unmerge():
    model = _patched("ssf", dtype=torch.float32)
    with torch.no_grad():
        model.blocks[1].ssf_fc1.scale[[3, 7]] = 0.0
    out = _logits(model)
    with pytest.warns(UserWarning, match="blocks.1.ssf_fc1 has 2 scales of 0: .* will not be able to recover"):
        gist_fast.merge(model)
    torch.testing.assert_close(_logits(model), out, rtol=1e-5, atol=1e-5)
    merged = _state(model)
    with pytest.raises(ValueError, match="cannot unmerge blocks.1.ssf_fc1: 2 of its scales are 0"):
        gist_fast.unmerge(model)
    assert is_merged(model) and all(torch.equal(merged[n], t) for n, t in _state(model).items())


def test_lora_singular_at_the_weight_precision_does_not_unmerge():
    model = _patched("lora", dtype=torch.float32)
    lora = model.blocks[0].attn.lora_v  # I + α·up·down = I - e0 e0ᵀ: singular
    with torch.no_grad():
        lora.down.weight.zero_()
        lora.up.weight.zero_()
        lora.down.weight[0, 0] = 1.0
        lora.up.weight[0, 0] = -1.0 / lora.scaling
    gist_fast.merge(model)
    merged = _state(model)
    with pytest.raises(ValueError, match="block 0's v is singular at torch.float32's precision"):
        gist_fast.unmerge(model)
    assert is_merged(model) and all(torch.equal(merged[n], t) for n, t in _state(model).items())


def test_ssf_final_follows_fc_norm_on_an_avg_pooled_vit():
    """An avg-pooled ViT normalises after pooling (fc_norm; its model.norm is Identity): ssf_final follows fc_norm,
    changes the logits there, and merges into it."""
    model = _patched("ssf", gist=False, dtype=torch.float64, global_pool="avg")
    before = _logits(model)
    with torch.no_grad():
        model.ssf_final.shift.add_(1.0)
    assert (_logits(model) - before).abs().max() > 0.1
    merged = _logits(gist_fast.merge(model))
    torch.testing.assert_close(merged, _logits(gist_fast.unmerge(model)), rtol=1e-12, atol=1e-12)


def test_ssf_after_a_layer_merge_cannot_absorb_is_refused():
    """RMSNorm has no bias to take the shift: merge refuses before changing anything."""
    model = gist_fast.patch(tiny_vit(norm_layer=timm.layers.RmsNorm), peft="ssf", gist=False, verbose=False)
    before = _state(model)
    with pytest.raises(ValueError, match="cannot merge ssf_final: it follows norm \\(RmsNorm\\)"):
        gist_fast.merge(model)
    assert not is_merged(model) and all(torch.equal(before[n], t) for n, t in _state(model).items())


# --- the benchmark command ---------------------------------------------------------------------------------

def test_inference_benchmark_writes_rows_and_its_table(tmp_path, capsys):
    """benchmarks/inference.py on a tiny input: rows in results.csv, inference.md drawn, bad options one line."""
    import importlib.util
    import os

    from gist_fast import bench_harness

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "inference.py")
    spec = importlib.util.spec_from_file_location("benchmarks_inference", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = ["--device", "cpu", "--model", "vit_tiny_patch16_224", "--img-size", "32", "--batch", "2",
            "--rep-ms", "1", "--kinds", "lora,ssf", "--gist", "1", "--out", str(tmp_path)]
    assert bench.main(args) == 0
    rows = bench_harness.read_rows(str(tmp_path / "results.csv"))
    assert {r.provider for r in rows} == {"timm", "lora", "lora_merged", "ssf", "ssf_merged"}
    assert all(r.p50 < 1e-4 for r in rows if r.metric == "max_abs_dlogits")
    table = (tmp_path / "inference.md").read_text()
    assert "| 2 | lora |" in table and "| 2 | ssf |" in table
    assert not (tmp_path / "ops.md").exists()
    assert bench.main(args[:-2] + ["--kinds", "adapter", "--out", str(tmp_path)]) == 2
    assert "--kinds adapter: choose from lora,qkv-lora,ssf" in capsys.readouterr().err
