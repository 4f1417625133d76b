"""Merging for inference: fold the linear PEFT tensors (both LoRA forms, SSF) into the frozen weights, so that a
patched model runs timm's own block forwards, and back (METHODS §6: what is mergeable).

    model = gist_fast.merge(model)    # in place; eval logits as before, timm's inference speed
    model = gist_fast.unmerge(model)  # the weights and the patched forwards back (up to rounding)
"""
from typing import List, Tuple

import torch
from torch import nn

from gist_fast.patch import MERGED, bind_pos_embed, patch_config, trainable_groups
from gist_fast.peft import KINDS
from gist_fast.peft.blocks import Update


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
    for a model whose SSF site follows a layer it cannot absorb it (e.g. a final norm that is not a LayerNorm).

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
    kind = KINDS[config.peft]
    if kind.fold is None:
        extra = " (the Gist token stays a token too)" if config.gist else ""
        raise ValueError(f"peft={config.peft!r} has nothing to merge: {kind.unmergeable}{extra}. "
                         "gist_fast.merge folds lora, qkv-lora and ssf")
    updates = kind.fold(model, undo=False)  # every check and every new value before anything changes
    created = [(path, name) for path, name, _ in updates if getattr(model.get_submodule(path), name) is None]
    _apply(model, updates)
    forwards = {}
    for path in [f"blocks.{i}" for i in range(len(model.blocks))] + ["norm", "fc_norm"]:  # ssf binds a final norm
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
    kind = KINDS[config.peft]
    updates = kind.fold(model, undo=True)
    created = {tuple(c) for c in state["created"]}
    updates = [(path, name, None if (path, name) in created else value) for path, name, value in updates]
    _apply(model, updates)
    for path, bound in state["forwards"].items():
        model.get_submodule(path).forward = bound
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
    group = set(map(id, trainable_groups(model)[KINDS[model.gist_fast_config.peft].group]))
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
