"""Merging for inference: fold the linear PEFT tensors (both LoRA forms, SSF) into the frozen weights, so that a
patched model runs timm's own block forwards, and back (METHODS §6: what is mergeable).

    model = gist_fast.merge(model)    # in place; eval logits as before, timm's inference speed
    model = gist_fast.unmerge(model)  # the weights and the patched forwards back (up to rounding)
"""
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from gist_fast.patch import _trainable_groups, bind_pos_embed, patch_config
from gist_fast.peft import KINDS

MERGED = "_gist_fast_merged"  # the model attribute a merged model carries (what unmerge puts back)

# why a kind has nothing merge can fold
NOT_MERGEABLE = {
    "adapter": "its adapters apply a GELU between their two Linears (s·up(GELU(down x))): no frozen weight can "
               "absorb them",
    "seq-adapter": "its adapters apply a GELU between their two Linears (up(GELU(down x))): no frozen weight can "
                   "absorb them",
    "adaptformer": "its adapters apply a GELU between their two Linears (s·up(GELU(down x))): no frozen weight can "
                   "absorb them",
    "channels": "its K×K linear acts on the residual stream entering norm2, where no frozen weight sits to absorb it",
    "vpt": "prompts are tokens, not weights: they stay in the sequence",
    "ln": "its trained tensors are the LayerNorms' own weights: there is nothing to fold and the blocks already run "
          "timm's forward",
    "linear": "only the head trains: there is nothing to fold",
}

# (module path, parameter name, new value or None to remove it); None in a target: a parameter that is None now
Update = Tuple[str, str, Optional[Tensor]]


def merge(model: nn.Module) -> nn.Module:
    """Fold every mergeable PEFT tensor into the frozen weights for inference, in place; returns the model.

    What folds (computed in float64, stored in each weight's dtype):
      lora      (the authors' per-head LoRA on q and v) per head h, W_q,h <- (I + α·up_q·down_q)·W_q,h and
                b_q,h likewise, the same for v (rows of attn.qkv: [h·d_h, (h+1)·d_h) of the q and v thirds); k
                untouched
      qkv-lora  W_qkv <- W_qkv + (α/r)·up·down
      ssf       after a LayerNorm (norm1, norm2, the final norm): weight <- weight·γ, bias <- bias·γ + β; after a
                Linear (qkv, proj, fc1, fc2) or the patch projection (a Conv2d): out-channel o's weights ·γ_o, bias
                <- γ·bias + β (a layer without bias gets one)
    Then the blocks run timm's own forward (and the final norm timm's LayerNorm), so the model runs at the
    unpatched model's inference speed: the Gist token stays a token of the sequence (one more than timm's) and
    `model._pos_embed` still inserts it; ssf_patch leaves it.

    What cannot fold: prompts (vpt) and the Gist token are tokens, not weights; the adapters (adapter, seq-adapter,
    adaptformer) put a GELU between their Linears; channels' K×K linear acts on the residual stream itself; ln and
    linear train the frozen model's own tensors. merge raises ValueError for those kinds (nothing to fold), and
    for a model whose SSF site follows a layer it cannot absorb it (a final norm that is not a LayerNorm, as
    timm's avg-pooled ViTs have: they normalise after pooling, fc_norm).

    A merged model is for inference. The folded PEFT tensors stay registered (unused) with requires_grad False,
    so training a merged model trains the head and the Gist token only and never the dead copies; unmerge sets
    their requires_grad back. gist_fast.trainable_state_dict saves the tensors that require grad: save it before
    merge or after unmerge. A second merge raises (it would fold twice), and so do gist_fast.unpatch and
    gist_fast.patch of a merged model (unmerge first). A merged model pickles whole.
    """
    config = _config(model)
    if hasattr(model, MERGED):
        raise RuntimeError("this model is already merged (gist_fast.merge): a second merge would fold the PEFT "
                           "tensors twice; gist_fast.unmerge(model) first")
    fold = _FOLDS.get(config.peft)
    if fold is None:
        extra = " (the Gist token stays a token too)" if config.gist else ""
        raise ValueError(f"peft={config.peft!r} has nothing to merge: {NOT_MERGEABLE[config.peft]}{extra}. "
                         "gist_fast.merge folds lora, qkv-lora and ssf")
    updates = fold(model, undo=False)  # every check and every new value before anything changes
    created = [(path, name) for path, name, _ in updates if getattr(model.get_submodule(path), name) is None]
    _apply(model, updates)
    kind = KINDS[config.peft]
    forwards = {}
    for path in [f"blocks.{i}" for i in range(len(model.blocks))] + (["norm"] if config.peft == "ssf" else []):
        bound = model.get_submodule(path).__dict__.pop("forward", None)  # patch()'s bound partial: timm's again
        if bound is not None:
            forwards[path] = bound
    if kind.patch_tokens is not None:
        bind_pos_embed(model, None)  # the Gist token and prompts stay; the patch tokens' change is folded
    trainable = [n for n, p in _peft_tensors(model) if p.requires_grad]
    for _, p in _peft_tensors(model):
        p.requires_grad_(False)
    setattr(model, MERGED, {"forwards": forwards, "created": created, "trainable": trainable})
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo gist_fast.merge in place; returns the model: the weights unfolded, the parameters merge created
    removed, the forwards patch() bound back (the same objects) and the PEFT tensors' requires_grad as before.

    Exact up to rounding: qkv-lora subtracts (α/r)·up·down; lora solves (I + α·up·down)·W = W_merged per head
    (d_h × d_h); ssf divides by γ. Computed in float64 from the stored weights, each restored weight is within a
    few units in the last place of its dtype of the original (relative to the larger of it and its merged value;
    lora: times the condition number of I + α·up·down; ssf bias: relative to |β|/|γ|). The tests hold fp64 to
    1e-12, fp32 to 1e-5 and bf16 to 2e-2 of each tensor's largest magnitude before or after the merge. Refused
    (ValueError, nothing changed) when nothing can be recovered: a γ of 0 (a channel merge set to zero), or an
    I + α·up·down singular at the weight's precision (condition number · eps >= 1).
    """
    config = _config(model)
    state = getattr(model, MERGED, None)
    if state is None:
        raise RuntimeError("this model is not merged: gist_fast.unmerge undoes gist_fast.merge")
    updates = _FOLDS[config.peft](model, undo=True)
    created = {tuple(c) for c in state["created"]}
    updates = [(path, name, None if (path, name) in created else value) for path, name, value in updates]
    _apply(model, updates)
    for path, bound in state["forwards"].items():
        model.get_submodule(path).forward = bound
    kind = KINDS[config.peft]
    if kind.patch_tokens is not None:
        bind_pos_embed(model, kind.patch_tokens)
    trainable = set(state["trainable"])
    for name, p in _peft_tensors(model):
        p.requires_grad_(name in trainable)
    delattr(model, MERGED)
    return model


def is_merged(model: nn.Module) -> bool:
    """Whether gist_fast.merge folded the model's PEFT tensors (and unmerge has not undone it)."""
    return hasattr(model, MERGED)


def _config(model: nn.Module):
    patch_config(model)  # ValueError when not patched by gist_fast
    return model.gist_fast_config


def _peft_tensors(model: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    """The kind's own tensors (its parameter_summary group), by name."""
    group = set(map(id, _trainable_groups(model)[KINDS[model.gist_fast_config.peft].group]))
    return [(n, p) for n, p in model.named_parameters() if id(p) in group]


def _apply(model: nn.Module, updates: List[Update]) -> None:
    with torch.no_grad():
        for path, name, value in updates:
            module = model.get_submodule(path)
            current = getattr(module, name)
            if value is None:
                setattr(module, name, None)
            elif current is None:
                setattr(module, name, nn.Parameter(value, requires_grad=False))
            else:
                current.copy_(value)


def _f64(t: Tensor) -> Tensor:
    return t.detach().to(torch.float64)


# --- lora: per head, W_h <- (I + α up down) W_h -----------------------------------------------------------

def _fold_lora(model: nn.Module, undo: bool) -> List[Update]:
    updates = []
    for i, block in enumerate(model.blocks):
        attn, path = block.attn, f"blocks.{i}.attn.qkv"
        heads, d_h = attn.num_heads, attn.head_dim
        width = heads * d_h
        w, b = _f64(attn.qkv.weight), None if attn.qkv.bias is None else _f64(attn.qkv.bias)
        for third, lora in ((0, attn.lora_q), (2, attn.lora_v)):
            m = torch.eye(d_h, dtype=torch.float64, device=w.device) + _f64(lora.delta())
            rows = slice(third * width, (third + 1) * width)
            if undo:
                _check_invertible(m, attn.qkv.weight.dtype, f"block {i}'s {'qv'[third // 2]}")
                w[rows] = torch.linalg.solve(m, w[rows].reshape(heads, d_h, -1)).reshape(width, -1)
                if b is not None:
                    b[rows] = torch.linalg.solve(m, b[rows].reshape(heads, d_h, 1)).reshape(width)
            else:
                w[rows] = (m @ w[rows].reshape(heads, d_h, -1)).reshape(width, -1)
                if b is not None:
                    b[rows] = (b[rows].reshape(heads, d_h) @ m.T).reshape(width)
        updates.append((path, "weight", w.to(attn.qkv.weight.dtype)))
        if b is not None:
            updates.append((path, "bias", b.to(attn.qkv.bias.dtype)))
    return updates


def _check_invertible(m: Tensor, dtype: torch.dtype, where: str) -> None:
    """Refuse an I + α·up·down that is singular at the weight's precision: its condition number times the dtype's
    eps (the unfolded weights' relative error bound) reaches 1."""
    cond = torch.linalg.cond(m).item()
    if not cond * torch.finfo(dtype).eps < 1:
        raise ValueError(f"cannot unmerge: I + α·up·down of {where} is singular at {dtype}'s precision (condition "
                         f"number {cond:.3g}), so the weights merge folded it into cannot be recovered")


# --- qkv-lora: W <- W + (α/r) up down ---------------------------------------------------------------------

def _fold_qkv_lora(model: nn.Module, undo: bool) -> List[Update]:
    updates = []
    for i, block in enumerate(model.blocks):
        qkv = block.attn.qkv
        delta = _f64(block.attn.qkv_lora.delta())
        updates.append((f"blocks.{i}.attn.qkv", "weight", (_f64(qkv.weight) + (-delta if undo else delta))
                        .to(qkv.weight.dtype)))
    return updates


# --- ssf: into the LayerNorm, Linear or Conv2d before each site --------------------------------------------

_BLOCK_TARGETS = {"norm1": "norm1", "qkv": "attn.qkv", "proj": "attn.proj", "norm2": "norm2", "fc1": "mlp.fc1",
                  "fc2": "mlp.fc2"}


def _ssf_sites(model: nn.Module) -> List[Tuple[str, str]]:
    """(ScaleShift path, the path of the layer whose output it scales and shifts)."""
    sites = [("ssf_patch", "patch_embed.proj"), ("ssf_final", "norm")]
    for i in range(len(model.blocks)):
        sites += [(f"blocks.{i}.ssf_{s}", f"blocks.{i}.{t}") for s, t in _BLOCK_TARGETS.items()]
    return sites


def _absorbs(layer: nn.Module) -> bool:
    return isinstance(layer, (nn.LayerNorm, nn.Linear, nn.Conv2d))


def _fold_ssf(model: nn.Module, undo: bool) -> List[Update]:
    updates = []
    for ssf_path, path in _ssf_sites(model):
        ssf, layer = model.get_submodule(ssf_path), model.get_submodule(path)
        if not _absorbs(layer):
            raise ValueError(f"cannot merge {ssf_path}: it follows {path} ({type(layer).__name__}), and merge folds "
                             "SSF into a LayerNorm, Linear or Conv2d only")
        gamma, beta = _f64(ssf.scale), _f64(ssf.shift)
        dtype = next(t for t in (layer.weight, layer.bias, ssf.scale) if t is not None).dtype
        w = torch.ones_like(gamma) if layer.weight is None else _f64(layer.weight)
        b = torch.zeros_like(gamma) if layer.bias is None else _f64(layer.bias)
        g = gamma.reshape(-1, *[1] * (w.dim() - 1))
        if undo:
            if (gamma == 0).any():
                raise ValueError(f"cannot unmerge {ssf_path}: {int((gamma == 0).sum())} of its scales are 0, so merge "
                                 f"set those channels of {path} to zero and they cannot be recovered")
            w, b = w / g, (b - beta) / gamma
        else:
            w, b = w * g, b * gamma + beta
        updates += [(path, "weight", w.to(dtype)), (path, "bias", b.to(dtype))]
    return updates


_FOLDS: Dict[str, Callable[[nn.Module, bool], List[Update]]] = {
    "lora": _fold_lora, "qkv-lora": _fold_qkv_lora, "ssf": _fold_ssf}
