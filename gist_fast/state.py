"""Checkpoints of the trained tensors only (KBs, not the frozen backbone's MBs)."""
from typing import Any, Dict

import torch
from torch import nn

from gist_fast.patch import MERGED, PatchConfig, patch, patch_config


def trainable_state_dict(model: nn.Module) -> Dict[str, Any]:
    """{"gist_fast_config": how the model was patched, "state_dict": its trainable tensors} (of a merged model:
    the PEFT tensors too, unfolded as they were trained, though merge stopped their gradients)."""
    names = set(getattr(model, MERGED, {}).get("trainable", ()))
    params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad or n in names}
    return {"gist_fast_config": patch_config(model), "state_dict": params}


def load_trainable_state_dict(model: nn.Module, checkpoint: Dict[str, Any]) -> nn.Module:
    """Load a trainable_state_dict into a fresh timm model (patched here from the checkpoint's
    configuration when it is not yet) or into a model patched the same way; returns the model."""
    if "gist_fast_config" not in checkpoint or "state_dict" not in checkpoint:
        raise ValueError("not a gist_fast checkpoint: expected the keys 'gist_fast_config' and 'state_dict' "
                         "(see gist_fast.trainable_state_dict)")
    saved = checkpoint["gist_fast_config"]
    if hasattr(model, MERGED):
        raise ValueError("the model is merged (gist_fast.merge): its weights hold the PEFT tensors folded in; "
                         "gist_fast.unmerge(model) first, or load into a fresh model")
    if not hasattr(model, "gist_fast_config"):
        patch(model, **PatchConfig.from_dict(saved).patch_kwargs(), verbose=False)
    differ = model.gist_fast_config.differences(saved)
    if differ:
        raise ValueError("the model is patched differently from the checkpoint: " + "; ".join(differ))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    state = checkpoint["state_dict"]
    missing, unexpected = sorted(params.keys() - state.keys()), sorted(state.keys() - params.keys())
    if missing or unexpected:
        raise ValueError(f"checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, tensor in state.items():
            if params[name].shape != tensor.shape:
                raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model {tuple(params[name].shape)} "
                                 "(a different model size or class count?)")
            params[name].copy_(tensor)
    return model
