"""HF PEFT interoperability (gist_fast.hf_peft): gist_fast's folders load in peft.PeftModel with equal outputs,
PEFT's own folders load into qkv-lora models with equal outputs, the files match what PEFT writes, the Gist token
travels beside the adapter, the per-head lora export, and the refusals."""
import json
import os
import subprocess
import sys

import pytest
import torch

import gist_fast
from tiny import images, tiny_vit

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors import safe_open  # noqa: E402

TOL = dict(rtol=1e-9, atol=1e-10)  # float64 throughout: the two sides differ by rounding only


def base(seed=0, **kw):
    """The frozen backbone both sides share (same seed: same weights), in float64."""
    return tiny_vit(seed=seed, **kw).double()


def randomize(model, seed=3):
    """Random nonzero values in every trainable tensor (LoRA factors, head, Gist token)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def patched(peft_kind="qkv-lora", gist=False, rank=3, alpha=5.0, seed=0, fused="auto", **kw):
    return gist_fast.patch(base(seed, **kw), peft=peft_kind, gist=gist, rank=rank, alpha=alpha, fused=fused,
                           verbose=False)


def x():
    return images().double()


def out(model):
    with torch.no_grad():
        return model.eval()(x())


def keys(folder, name="adapter_model.safetensors"):
    with safe_open(os.path.join(folder, name), "pt") as f:
        return set(f.keys())


def peft_folder(tmp_path, name="peft", r=4, alpha=8, safe=True, **cfg):
    """A folder PEFT itself wrote: get_peft_model on the tiny ViT, random LoRA factors and head."""
    cfg = {"modules_to_save": ["head"], **cfg}
    model = get_peft_model(base(), LoraConfig(r=r, lora_alpha=alpha, target_modules=["qkv"], **cfg))
    randomize(model)
    folder = str(tmp_path / name)
    model.save_pretrained(folder, safe_serialization=safe)
    return model, folder


def edit_config(folder, **changes):
    path = os.path.join(folder, "adapter_config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w") as f:
        json.dump(config, f)


# ---------------------------------------------------------------------------------------------
# gist_fast -> PEFT

@pytest.mark.parametrize("rank,alpha", [(3, 5.0), (4, 8.0), (2, 0.5)])
def test_qkv_lora_folder_loads_in_peft_with_equal_outputs(tmp_path, rank, alpha):
    model = randomize(patched(rank=rank, alpha=alpha))
    folder = gist_fast.save_peft_adapter(model, str(tmp_path / "a"))
    assert not torch.allclose(out(base()), out(model))  # the adapter and the head change the outputs
    loaded = PeftModel.from_pretrained(base(), folder)
    torch.testing.assert_close(out(loaded), out(model), **TOL)
    qkv = loaded.base_model.model.blocks[1].attn.qkv
    assert qkv.scaling["default"] == pytest.approx(alpha / rank)
    torch.testing.assert_close(qkv.lora_A["default"].weight, model.blocks[1].attn.qkv_lora.down.weight, rtol=0, atol=0)
    torch.testing.assert_close(qkv.lora_B["default"].weight, model.blocks[1].attn.qkv_lora.up.weight, rtol=0, atol=0)


def test_files_are_what_peft_writes(tmp_path):
    """The same key names and, on every field gist_fast writes, the same adapter_config.json values as PEFT's own
    save_pretrained of get_peft_model(vit, LoraConfig(r, lora_alpha, target_modules=["qkv"],
    modules_to_save=["head"]))."""
    model = randomize(patched(rank=4, alpha=8.0))
    ours = gist_fast.save_peft_adapter(model, str(tmp_path / "ours"))
    _, theirs = peft_folder(tmp_path, r=4, alpha=8)
    assert keys(ours) == keys(theirs)
    assert "base_model.model.blocks.0.attn.qkv.lora_A.weight" in keys(ours)
    assert "base_model.model.head.weight" in keys(ours)
    with open(os.path.join(ours, "adapter_config.json")) as f:
        mine = json.load(f)
    with open(os.path.join(theirs, "adapter_config.json")) as f:
        peft_config = json.load(f)
    assert {k: peft_config[k] for k in mine} == mine
    assert mine["r"] == 4 and mine["lora_alpha"] == 8 and mine["target_modules"] == ["qkv"]
    assert mine["modules_to_save"] == ["head"]
    with safe_open(os.path.join(ours, "gist_fast.safetensors"), "pt") as f:
        assert list(f.keys()) == []  # gist=False: the configuration only
        assert json.loads(f.metadata()["gist_fast_config"]) == gist_fast.patch_config(model)


def test_fp32_model_round_trip_through_peft(tmp_path):
    model = randomize(gist_fast.patch(tiny_vit(), peft="qkv-lora", gist=False, rank=2, verbose=False))
    folder = gist_fast.save_peft_adapter(model, str(tmp_path / "a"))
    loaded = PeftModel.from_pretrained(tiny_vit(), folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(images()), model.eval()(images()), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# PEFT -> gist_fast

@pytest.mark.parametrize("safe", [True, False])
def test_peft_folder_loads_into_qkv_lora_model(tmp_path, safe):
    peft_model, folder = peft_folder(tmp_path, r=4, alpha=8, safe=safe)
    model = patched(rank=4, alpha=8.0, seed=0)
    assert gist_fast.load_peft_adapter(model, folder) is model
    torch.testing.assert_close(out(model), out(peft_model), **TOL)


def test_peft_folder_patches_a_fresh_model(tmp_path):
    peft_model, folder = peft_folder(tmp_path, r=2, alpha=6, init_lora_weights="gaussian")
    model = gist_fast.load_peft_adapter(base(), folder)
    cfg = model.gist_fast_config
    assert (cfg.peft, cfg.gist, cfg.rank, cfg.alpha) == ("qkv-lora", False, 2, 6.0)
    torch.testing.assert_close(out(model), out(peft_model), **TOL)


def test_peft_folder_without_head(tmp_path):
    """modules_to_save unset: PEFT keeps the backbone's head, and so does load_peft_adapter."""
    peft_model, folder = peft_folder(tmp_path, modules_to_save=None)
    assert not any(k.startswith("base_model.model.head") for k in keys(folder))
    model = gist_fast.load_peft_adapter(patched(rank=4, alpha=8.0), folder)
    torch.testing.assert_close(out(model), out(peft_model), **TOL)


# ---------------------------------------------------------------------------------------------
# the Gist token, beside the adapter

def test_gist_round_trip(tmp_path):
    model = randomize(patched(gist=True))
    folder = gist_fast.save_peft_adapter(model, str(tmp_path / "g"))
    with safe_open(os.path.join(folder, "gist_fast.safetensors"), "pt") as f:
        torch.testing.assert_close(f.get_tensor("gist_token"), model.gist_token.detach(), rtol=0, atol=0)
    again = gist_fast.load_peft_adapter(patched(gist=True, seed=0), folder)
    torch.testing.assert_close(out(again), out(model), rtol=0, atol=0)
    fresh = gist_fast.load_peft_adapter(base(), folder)  # patched here: gist=True from the folder
    assert fresh.gist_fast_config.gist
    torch.testing.assert_close(out(fresh), out(model), rtol=0, atol=0)
    # a PEFT-only user loads the adapter and the head, without the Gist token (which changes CLS through attention)
    peft_only = PeftModel.from_pretrained(base(), folder)
    torch.testing.assert_close(peft_only.base_model.model.head.modules_to_save["default"].weight, model.head.weight)
    assert not torch.allclose(out(peft_only), out(model))


def test_gist_mismatch_is_refused(tmp_path):
    with_token = gist_fast.save_peft_adapter(randomize(patched(gist=True)), str(tmp_path / "g"))
    without = gist_fast.save_peft_adapter(randomize(patched(gist=False)), str(tmp_path / "n"))
    with pytest.raises(ValueError, match="holds a Gist token"):
        gist_fast.load_peft_adapter(patched(gist=False), with_token)
    with pytest.raises(ValueError, match="has a Gist token.*has none"):
        gist_fast.load_peft_adapter(patched(gist=True), without)
    _, peft_written = peft_folder(tmp_path, r=3, alpha=5)
    with pytest.raises(ValueError, match="has a Gist token.*has none"):
        gist_fast.load_peft_adapter(patched(gist=True), peft_written)


# ---------------------------------------------------------------------------------------------
# per-head lora (the GIST authors'), exported as a qkv LoRA of rank 2·H·r with lora_bias

@pytest.mark.parametrize("qkv_bias", [True, False])
def test_per_head_lora_export_loads_in_peft_with_equal_outputs(tmp_path, qkv_bias):
    # the plain-PyTorch per-head forward (fused=False): the export reads the weights only, and the fused
    # path's equality to it is tests/test_peft_kinds.py's
    model = randomize(patched("lora", rank=2, alpha=0.7, qkv_bias=qkv_bias, fused=False))
    with torch.no_grad():  # a nonzero qkv bias, so that Δb = α·up·down·b matters
        for b in model.blocks:
            if b.attn.qkv.bias is not None:
                b.attn.qkv.bias.normal_()
    folder = gist_fast.save_peft_adapter(model, str(tmp_path / "h"))
    with open(os.path.join(folder, "adapter_config.json")) as f:
        config = json.load(f)
    H = model.blocks[0].attn.num_heads
    assert config["r"] == config["lora_alpha"] == 2 * H * 2
    assert config.get("lora_bias", False) is qkv_bias
    fresh = base(qkv_bias=qkv_bias)
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "lora" not in k and "gist" not in k})
    fresh.head.load_state_dict(model.head.state_dict())
    assert not torch.allclose(out(fresh), out(model))  # the per-head LoRA changes the outputs
    loaded = PeftModel.from_pretrained(fresh, folder)
    torch.testing.assert_close(out(loaded), out(model), **TOL)
    if qkv_bias:  # the per-head export is one way
        with pytest.raises(ValueError, match="lora_bias.*per-head"):
            gist_fast.load_peft_adapter(patched(rank=config["r"], alpha=float(config["r"])), folder)


def test_per_head_lora_export_keeps_the_gist_token(tmp_path):
    model = randomize(patched("lora", gist=True, rank=2, alpha=1.0))
    folder = gist_fast.save_peft_adapter(model, str(tmp_path / "hg"))
    with safe_open(os.path.join(folder, "gist_fast.safetensors"), "pt") as f:
        assert f.get_tensor("gist_token").shape == model.gist_token.shape
        assert json.loads(f.metadata()["gist_fast_config"])["peft"] == "lora"


# ---------------------------------------------------------------------------------------------
# refusals

def test_rank_and_alpha_mismatch(tmp_path):
    _, folder = peft_folder(tmp_path, r=4, alpha=8)
    with pytest.raises(ValueError, match=r"r = 4; gist_fast's qkv-lora accepts 3"):
        gist_fast.load_peft_adapter(patched(rank=3, alpha=6.0), folder)
    with pytest.raises(ValueError, match=r"lora_alpha = 8; .* accepts 16"):
        gist_fast.load_peft_adapter(patched(rank=4, alpha=16.0), folder)


@pytest.mark.parametrize("field,value", [
    ("lora_dropout", 0.1), ("use_rslora", True), ("use_dora", True), ("target_modules", ["qkv", "proj"]),
    ("bias", "all"), ("init_lora_weights", "pissa"), ("layers_to_transform", [0]), ("peft_type", "IA3"),
    ("rank_pattern", {"blocks.0.attn.qkv": 2}), ("fan_in_fan_out", True), ("modules_to_save", ["head", "norm"]),
    ("an_option_from_the_future", 3),
])
def test_unsupported_option_is_refused_by_name(tmp_path, field, value):
    _, folder = peft_folder(tmp_path, r=4, alpha=8)
    edit_config(folder, **{field: value})
    with pytest.raises(ValueError, match=f"{field} = "):
        gist_fast.load_peft_adapter(patched(rank=4, alpha=8.0), folder)


def test_wrong_kind(tmp_path):
    for kind, kw in (("ssf", {}), ("vpt", dict(prompts=2)), ("adapter", {})):
        model = gist_fast.patch(base(), peft=kind, gist=False, verbose=False, **kw)
        with pytest.raises(ValueError, match="qkv-lora"):
            gist_fast.save_peft_adapter(model, str(tmp_path / kind))
    _, folder = peft_folder(tmp_path, r=4, alpha=8)
    with pytest.raises(ValueError, match="peft='qkv-lora'.*peft='lora'"):
        gist_fast.load_peft_adapter(patched("lora", rank=4, alpha=1.0), folder)
    with pytest.raises(ValueError, match="patched by gist_fast"):
        gist_fast.save_peft_adapter(base(), str(tmp_path / "x"))


def test_other_refusals(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        gist_fast.load_peft_adapter(patched(), str(tmp_path / "nothing"))
    model = patched()
    model.norm.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="norm.weight"):
        gist_fast.save_peft_adapter(model, str(tmp_path / "n"))
    _, folder = peft_folder(tmp_path, r=3, alpha=5)
    with pytest.raises(ValueError, match="missing.*blocks.2"):
        gist_fast.load_peft_adapter(patched(depth=3), folder)


@pytest.mark.parametrize("kind", ["qkv-lora", "lora"])
def test_merged_model_is_refused(tmp_path, kind):
    """A merged model's qkv weights hold the LoRA update already: an adapter on top would add it twice."""
    if not hasattr(gist_fast, "merge"):
        pytest.skip("gist_fast.merge is not in this tree")
    model = gist_fast.merge(randomize(patched(kind, rank=4, alpha=8.0)))
    with pytest.raises(ValueError, match="merged.*unmerge"):
        gist_fast.save_peft_adapter(model, str(tmp_path / "m"))
    if kind == "qkv-lora":
        _, folder = peft_folder(tmp_path, r=4, alpha=8)
        with pytest.raises(ValueError, match="merged.*unmerge"):
            gist_fast.load_peft_adapter(model, folder)
        gist_fast.unmerge(model)
        gist_fast.load_peft_adapter(model, folder)


def test_import_does_not_load_peft():
    code = "import sys, gist_fast; assert 'peft' not in sys.modules, 'peft imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
