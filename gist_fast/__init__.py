"""gist_fast: fused-kernel GIST / iDAT / two-stage PEFT for timm Vision Transformers.

    model = gist_fast.patch(timm.create_model("vit_base_patch16_224", pretrained=True, num_classes=100))
    loss = gist_fast.GistLoss()(model(images), target)
"""
from gist_fast.hf_peft import load_peft_adapter, save_peft_adapter
from gist_fast.losses import DistillLoss, GistLoss
from gist_fast.memory import ActivationReport, accumulate_backward, activation_bytes, fit_micro_batch, step_with_budget
from gist_fast.merge import merge, unmerge
from gist_fast.patch import PEFT_KINDS, GistOutput, PatchConfig, parameter_summary, patch, patch_config, unpatch
from gist_fast.state import load_trainable_state_dict, trainable_state_dict
from gist_fast.two_stage import select_channels, taylor_importance

__version__ = "0.1.0"
__all__ = [
    "patch", "unpatch", "patch_config", "PatchConfig", "parameter_summary", "GistOutput", "PEFT_KINDS",
    "merge", "unmerge",
    "GistLoss", "DistillLoss",
    "trainable_state_dict", "load_trainable_state_dict",
    "save_peft_adapter", "load_peft_adapter",
    "taylor_importance", "select_channels",
    "activation_bytes", "ActivationReport", "fit_micro_batch", "accumulate_backward", "step_with_budget",
]
