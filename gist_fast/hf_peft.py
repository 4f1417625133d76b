"""HF PEFT interoperability for the LoRA kinds: a folder `peft.PeftModel.from_pretrained(timm_model, folder)` loads.

    gist_fast.save_peft_adapter(model, "out/")          # adapter_config.json, adapter_model.safetensors,
                                                        # gist_fast.safetensors (the Gist token, the patch config)
    peft_model = peft.PeftModel.from_pretrained(timm.create_model(...), "out/")   # PEFT users
    gist_fast.load_peft_adapter(model, "out/")          # back into a model patched with peft="qkv-lora"

The folder (PEFT 0.21's format, which PEFT writes for `get_peft_model(vit, LoraConfig(target_modules=["qkv"],
modules_to_save=["head"]))`):

* adapter_model.safetensors: per block `base_model.model.blocks.{i}.attn.qkv.lora_A.weight` (r, D) (= the
  block's `attn.qkv_lora.down.weight`) and `...qkv.lora_B.weight` (3D, r) (= `up.weight`); the trained head as
  `base_model.model.head.weight` / `.bias` (PEFT stores a modules_to_save module under its own name).
* adapter_config.json: peft_type LORA, r, lora_alpha (PEFT's scaling is lora_alpha / r, as qkv-lora's),
  target_modules ["qkv"], modules_to_save ["head"], lora_dropout 0, bias "none".
* gist_fast.safetensors: beside the adapter (PEFT ignores it): the Gist token as `gist_token` (1, 1, D) when the
  model has one, and the gist_fast patch configuration (JSON) in the metadata under `gist_fast_config`. The
  Gist token cannot be a PEFT module: it is a new token in the sequence (a patched `_pos_embed`), not a
  module of the timm model. A PEFT-only user gets the model without it: equal outputs are promised for
  gist=False; with gist=True the token changes CLS through attention, so equal outputs need
  `gist_fast.patch(timm_model, peft="qkv-lora", gist=True, rank=r, alpha=a)` + `load_peft_adapter`.

peft="lora" (the GIST authors' per-head LoRA on the projected q and v, bias included) is not Hu et al.'s LoRA,
but it is a qkv LoRA exactly: for head h of q, q_h + α·up·down·(W_h x + b_h) adds ΔW_h = α·up·down·W_h and
Δb_h = α·up·down·b_h. save_peft_adapter writes it as a qkv LoRA of rank 2·H·r (lora_A: the rows down·W_h, q
heads then v heads; lora_B: α·up block-placed on each head's rows, zero on k; lora_alpha = 2·H·r, so PEFT's
scaling is 1) with `lora_bias=True` for Δb (PEFT >= 0.14; without a qkv bias Δb = 0 and lora_bias stays off).
This export is one way: load_peft_adapter loads only into qkv-lora models (the per-head factors are not
recoverable from ΔW in general); keep gist_fast.trainable_state_dict for the per-head model itself.

The `peft` package is not needed here: the files are written with `safetensors` (a timm dependency) and json.
"""
import json
import math
import os
from typing import Dict, Optional

import torch
from torch import Tensor, nn

from gist_fast.merge import is_merged
from gist_fast.patch import PatchConfig, patch, patch_config
from gist_fast.peft import KINDS

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"    # PEFT's save_pretrained(safe_serialization=False): read only
GIST_FAST_FILE = "gist_fast.safetensors"
PREFIX = "base_model.model."
HEAD = "head"                                # timm VisionTransformer's classifier attribute
EXPORTABLE = tuple(k for k, kind in KINDS.items() if kind.alpha is not None)  # the LoRA kinds

# LoraConfig fields gist_fast reads, with the only value it accepts (what qkv-lora computes)
_MUST_BE = {
    "lora_dropout": 0.0, "fan_in_fan_out": False, "bias": "none", "use_rslora": False, "use_dora": False,
    "lora_bias": False, "layers_to_transform": None, "layers_pattern": None, "layer_replication": None,
    "exclude_modules": None, "rank_pattern": {}, "alpha_pattern": {}, "trainable_token_indices": None,
    "target_parameters": None, "use_qalora": False, "alora_invocation_tokens": None, "velora_config": None,
    "monteclora_config": None, "use_bdlora": None, "arrow_config": None, "kasa_config": None,
}
# init_lora_weights values that only initialise the factors (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA change the
# frozen base weights too, which a folder does not carry)
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")
# fields that do not change what the adapter computes
_IGNORED = {
    "task_type", "peft_version", "auto_mapping", "base_model_name_or_path", "revision", "inference_mode",
    "megatron_config", "megatron_core", "runtime_config", "ensure_weight_tying", "qalora_group_size",
    "loftq_config", "eva_config", "corda_config", "lora_ga_config",
}
_CHECKED = {"peft_type", "r", "lora_alpha", "target_modules", "modules_to_save", "init_lora_weights"}


def save_peft_adapter(model: nn.Module, folder: str) -> str:
    """Write a model patched with peft="qkv-lora" (or "lora", exported as an equivalent qkv LoRA: see the module
    docstring) as an HF PEFT LoRA adapter folder that `peft.PeftModel.from_pretrained(timm_model, folder)`
    loads: adapter_config.json + adapter_model.safetensors (the LoRA factors, the head in modules_to_save), and
    gist_fast.safetensors beside them (the Gist token if any, the patch configuration). Returns the folder."""
    from safetensors.torch import save_file

    cfg = _patched(model, "save_peft_adapter")
    if cfg.peft not in EXPORTABLE:
        raise ValueError(f"save_peft_adapter writes the LoRA kinds ({', '.join(EXPORTABLE)}) in HF PEFT's LoRA "
                         f"format; this model is patched with peft={cfg.peft!r}, which PEFT's LoRA cannot express "
                         "(use gist_fast.trainable_state_dict for it)")
    _check_trainable(model, cfg)
    if cfg.peft == "qkv-lora":
        tensors, rank, lora_alpha, lora_bias = _qkv_lora_tensors(model), cfg.rank, _number(cfg.alpha), False
    else:
        tensors, rank, lora_bias = _per_head_tensors(model)
        lora_alpha = rank  # the factors carry α: PEFT's scaling lora_alpha / r is 1
    head = _head_params(model)
    tensors.update({f"{PREFIX}{HEAD}.{n}": p for n, p in head.items()})
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None,
        "auto_mapping": {"base_model_class": type(model).__name__, "parent_library": type(model).__module__},
        "r": rank, "lora_alpha": lora_alpha, "target_modules": ["qkv"], "lora_dropout": 0.0,
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "modules_to_save": [HEAD] if head else None,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
        "inference_mode": True,
    }
    if lora_bias:
        config["lora_bias"] = True  # written only when used: PEFT < 0.14 does not know the field
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, ADAPTER_CONFIG), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    save_file(_plain(tensors), os.path.join(folder, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    beside = {"gist_token": model.gist_token} if cfg.gist else {}
    meta = {"format": "pt", "gist_fast_config": json.dumps(patch_config(model)),
            "exported_as": "qkv-lora" if cfg.peft == "qkv-lora" else f"qkv-lora rank {rank} with lora_bias"}
    save_file(_plain(beside), os.path.join(folder, GIST_FAST_FILE), metadata=meta)
    return folder


def load_peft_adapter(model: nn.Module, folder: str) -> nn.Module:
    """Load an HF PEFT LoRA folder (PEFT's save_pretrained of a timm ViT with target_modules=["qkv"], or
    save_peft_adapter's) into a model patched with peft="qkv-lora" of the folder's rank and scaling: lora_A ->
    attn.qkv_lora.down, lora_B -> up, the head from modules_to_save, the Gist token from gist_fast.safetensors.
    A fresh (unpatched) timm model is patched here first (qkv-lora, the folder's r and lora_alpha, gist=True
    when the folder holds a Gist token). The configuration must be plain LoRA: each other option is refused by
    name, with the value accepted. Returns the model."""
    _not_merged(model, "load_peft_adapter")
    peft = getattr(getattr(model, "gist_fast_config", None), "peft", "qkv-lora")
    if peft != "qkv-lora":
        per_head = " (a per-head lora export is one way: reload that model with load_trainable_state_dict)"
        raise ValueError(f"load_peft_adapter loads HF PEFT's LoRA on qkv into a model patched with "
                         f"peft='qkv-lora' (or a fresh timm model); this model has peft={peft!r}"
                         + (per_head if peft == "lora" else ""))
    config = _read_config(folder)
    gist_token, saved_cfg = _read_beside(folder)
    _check_options(config, folder, saved_cfg)
    if not hasattr(model, "gist_fast_config"):
        kw = {k: saved_cfg[k] for k in ("fused", "memory") if saved_cfg and k in saved_cfg}
        patch(model, peft="qkv-lora", gist=gist_token is not None, rank=int(config["r"]),
              alpha=float(config["lora_alpha"]), verbose=False, **kw)
    cfg = model.gist_fast_config
    _check_size(config, cfg, folder, saved_cfg)
    if cfg.gist and gist_token is None:
        raise ValueError(f"the model has a Gist token (patched with gist=True) but {folder} has none "
                         f"({GIST_FAST_FILE} without 'gist_token', or absent: a plain PEFT folder); "
                         "patch the model with gist=False")
    if not cfg.gist and gist_token is not None:
        raise ValueError(f"{folder} holds a Gist token ({GIST_FAST_FILE}) but the model has none: "
                         "patch it with gist=True to use it")
    _copy_state(model, cfg, _read_weights(folder), config, gist_token)
    return model


# ---------------------------------------------------------------------------------------------
# save

def _patched(model: nn.Module, what: str) -> PatchConfig:
    if not hasattr(model, "gist_fast_config"):
        raise ValueError(f"{what} needs a model patched by gist_fast (peft='qkv-lora')")
    _not_merged(model, what)
    return model.gist_fast_config


def _not_merged(model: nn.Module, what: str) -> None:
    if is_merged(model):
        raise ValueError(f"{what}: this model is merged (gist_fast.merge): its qkv weights already hold the LoRA "
                         "update, which an adapter on top would add twice; gist_fast.unmerge(model) first")


def _check_trainable(model: nn.Module, cfg: PatchConfig) -> None:
    """Everything that trains must be written: the LoRA factors, the head, the Gist token."""
    known = {f"{HEAD}.{n}" for n in _head_params(model)} | ({"gist_token"} if cfg.gist else set())
    lora = (".attn.qkv_lora.",) if cfg.peft == "qkv-lora" else (".attn.lora_q.", ".attn.lora_v.")
    other = [n for n, p in model.named_parameters()
             if p.requires_grad and n not in known and not (n.startswith("blocks.") and any(s in n for s in lora))]
    if other:
        raise ValueError(f"parameters outside the LoRA factors, the head and the Gist token train: {other[:5]}; "
                         "the PEFT format would drop them")


def _head_params(model: nn.Module) -> Dict[str, Tensor]:
    head = getattr(model, HEAD, None)
    return {} if head is None else dict(head.named_parameters())


def _qkv_lora_tensors(model: nn.Module) -> Dict[str, Tensor]:
    out = {}
    for i, block in enumerate(model.blocks):
        lora = _module(block, "attn.qkv_lora", i)
        out[f"{PREFIX}blocks.{i}.attn.qkv.lora_A.weight"] = lora.down.weight
        out[f"{PREFIX}blocks.{i}.attn.qkv.lora_B.weight"] = lora.up.weight
    return out


def _per_head_tensors(model: nn.Module):
    """The per-head q/v LoRA as one qkv LoRA of rank 2·H·r (computed in float64, stored in the model's dtype):
    lora_A rows down_t·W_{t,h}, lora_B α·up_t on head h's rows of t, lora_B bias α·up_t·down_t·b_{t,h}."""
    out, bias_used, rank = {}, False, 0
    for i, block in enumerate(model.blocks):
        attn = block.attn
        H, dh, D = attn.num_heads, attn.head_dim, attn.qkv.in_features
        W = attn.qkv.weight.detach().double()
        b = None if attn.qkv.bias is None else attn.qkv.bias.detach().double()
        r = _module(block, "attn.lora_q", i).down.weight.shape[0]
        rank = 2 * H * r
        A = W.new_zeros(rank, D)
        B = W.new_zeros(3 * H * dh, rank)
        bias = W.new_zeros(3 * H * dh)
        for j, (t, offset) in enumerate((("q", 0), ("v", 2 * H * dh))):
            lora = _module(block, f"attn.lora_{t}", i)
            down, up = lora.down.weight.detach().double(), lora.scaling * lora.up.weight.detach().double()
            for h in range(H):
                rows, cols = slice(offset + h * dh, offset + (h + 1) * dh), slice((j * H + h) * r, (j * H + h + 1) * r)
                A[cols] = down @ W[rows]
                B[rows, cols] = up
                if b is not None:
                    bias[rows] = up @ (down @ b[rows])
        dtype = attn.qkv.weight.dtype
        out[f"{PREFIX}blocks.{i}.attn.qkv.lora_A.weight"] = A.to(dtype)
        out[f"{PREFIX}blocks.{i}.attn.qkv.lora_B.weight"] = B.to(dtype)
        if b is not None:
            out[f"{PREFIX}blocks.{i}.attn.qkv.lora_B.bias"] = bias.to(dtype)
            bias_used = True
    return out, rank, bias_used


def _module(block: nn.Module, path: str, i: int) -> nn.Module:
    try:
        return block.get_submodule(path)
    except AttributeError:
        raise ValueError(f"block {i} has no {path} (merged into the weights, or unpatched?): nothing to save") from None


def _plain(tensors: Dict[str, Tensor]) -> Dict[str, Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def _number(x: float):
    return int(x) if float(x).is_integer() else float(x)


# ---------------------------------------------------------------------------------------------
# load

def _read_config(folder: str) -> dict:
    path = os.path.join(folder, ADAPTER_CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not an HF PEFT adapter folder (no {ADAPTER_CONFIG})")
    with open(path) as f:
        return json.load(f)


def _read_beside(folder: str):
    """(gist token or None, the saved gist_fast configuration or None)."""
    path = os.path.join(folder, GIST_FAST_FILE)
    if not os.path.isfile(path):
        return None, None
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
        token = f.get_tensor("gist_token") if "gist_token" in f.keys() else None
    return token, json.loads(meta["gist_fast_config"]) if "gist_fast_config" in meta else None


def _read_weights(folder: str) -> Dict[str, Tensor]:
    path = os.path.join(folder, ADAPTER_WEIGHTS)
    if os.path.isfile(path):
        from safetensors.torch import load_file

        return load_file(path)
    if os.path.isfile(os.path.join(folder, ADAPTER_WEIGHTS_BIN)):
        return torch.load(os.path.join(folder, ADAPTER_WEIGHTS_BIN), map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{folder}: no {ADAPTER_WEIGHTS} (or {ADAPTER_WEIGHTS_BIN})")


def _refuser(config: dict, folder: str, saved_cfg: Optional[dict]):
    hint = ("; this folder is gist_fast's export of a per-head peft='lora' model, which loads into peft.PeftModel "
            "only (reload the per-head model with load_trainable_state_dict)"
            if saved_cfg and saved_cfg.get("peft") == "lora" else "")

    def refuse(field: str, accepted: str, why: str = "") -> None:
        raise ValueError(f"{os.path.join(folder, ADAPTER_CONFIG)}: {field} = {config.get(field)!r}; gist_fast's "
                         f"qkv-lora accepts {accepted}{why}{hint}")
    return refuse


def _check_options(config: dict, folder: str, saved_cfg: Optional[dict]) -> None:
    """Plain LoRA on qkv: every option that changes the math is refused by field name, with the value accepted."""
    refuse = _refuser(config, folder, saved_cfg)
    if config.get("peft_type") != "LORA":
        refuse("peft_type", "'LORA'")
    target = config.get("target_modules")
    if not isinstance(target, list) or set(target) != {"qkv"}:
        refuse("target_modules", "['qkv']")
    for field in ("r", "lora_alpha"):
        value = config.get(field)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
                or (field == "r" and value != int(value)):
            refuse(field, "a positive integer" if field == "r" else "a positive number")
    if config.get("modules_to_save") not in (None, [], [HEAD]):
        refuse("modules_to_save", f"null or ['{HEAD}'] (the classifier)")
    if config.get("init_lora_weights", True) not in _PLAIN_INITS:
        refuse("init_lora_weights", f"one of {list(_PLAIN_INITS)}",
               " (the others change the frozen base weights, which the folder does not carry)")
    for field, value in _MUST_BE.items():
        got = config.get(field, value)
        if got != value and not (value in (None, {}) and got in (None, {}, [])):
            refuse(field, repr(value))
    known = _MUST_BE.keys() | _IGNORED | _CHECKED
    unknown = sorted(k for k, v in config.items() if k not in known and v not in (None, False, {}, []))
    if unknown:
        refuse(unknown[0], "its default (null / false)", " (an option gist_fast does not know: it may change the math)")


def _check_size(config: dict, cfg: PatchConfig, folder: str, saved_cfg: Optional[dict]) -> None:
    """The model's rank and scaling (alpha / r)."""
    refuse = _refuser(config, folder, saved_cfg)
    if config["r"] != cfg.rank:
        refuse("r", f"{cfg.rank} (the model's rank)", ": patch the model with rank=r")
    if not math.isclose(config["lora_alpha"] / config["r"], cfg.alpha / cfg.rank, rel_tol=1e-12):
        refuse("lora_alpha", f"{_number(cfg.alpha)} (the model's alpha: scaling alpha / r = {cfg.alpha / cfg.rank:g})",
               ": patch the model with alpha=lora_alpha")


def _copy_state(model: nn.Module, cfg: PatchConfig, state: Dict[str, Tensor], config: dict,
                gist_token: Optional[Tensor]) -> None:
    targets: Dict[str, Tensor] = {}
    for i, block in enumerate(model.blocks):
        lora = _module(block, "attn.qkv_lora", i)
        targets[f"blocks.{i}.attn.qkv.lora_A.weight"] = lora.down.weight
        targets[f"blocks.{i}.attn.qkv.lora_B.weight"] = lora.up.weight
    head = _head_params(model)
    if config.get("modules_to_save"):
        if not head:
            raise ValueError(f"the folder saves '{HEAD}' in modules_to_save but the model's head has no parameters "
                             "(num_classes=0?)")
        targets.update({f"{HEAD}.{n}": p for n, p in head.items()})
    # PEFT's own names (base_model.model.<module path>); an older PEFT's modules_to_save path read too
    got = {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in state.items()}
    got = {k.replace(f"{HEAD}.modules_to_save.", f"{HEAD}."): v for k, v in got.items()}
    missing, unexpected = sorted(targets.keys() - got.keys()), sorted(got.keys() - targets.keys())
    if missing or unexpected:
        raise ValueError(f"the adapter weights do not fit the model: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]} (a different depth, or an option gist_fast's qkv-lora lacks?)")
    for name, tensor in got.items():
        if targets[name].shape != tensor.shape:
            raise ValueError(f"{name}: folder shape {tuple(tensor.shape)} != model {tuple(targets[name].shape)} "
                             "(a different model size or class count?)")
    if gist_token is not None and gist_token.shape != model.gist_token.shape:
        raise ValueError(f"gist_token: folder shape {tuple(gist_token.shape)} != model "
                         f"{tuple(model.gist_token.shape)}")
    with torch.no_grad():
        for name, tensor in got.items():
            targets[name].copy_(tensor)
        if gist_token is not None:
            model.gist_token.copy_(gist_token)
