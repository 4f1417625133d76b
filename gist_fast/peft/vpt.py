"""VPT-shallow (METHODS §6): N prompt tokens after the position embedding, behind CLS and the Gist token."""
import torch
from torch import Tensor, nn


def install_prompts(model: nn.Module, config, like: dict) -> None:
    """prompt_tokens (1, N, D), uniform(-0.5, 0.5), and their dropout 0.1 (one mask per sample and token)."""
    model.prompt_tokens = nn.Parameter(torch.empty(1, config.prompts, model.embed_dim).uniform_(-0.5, 0.5).to(**like))
    model.prompt_drop = nn.Dropout(0.1)


def uninstall_prompts(model: nn.Module) -> None:
    del model.prompt_tokens, model.prompt_drop


def prompts(model: nn.Module, batch: int, dtype: torch.dtype) -> Tensor:
    """The (B, N, D) prompts of one batch: expanded first, so that the dropout draws a mask per sample."""
    return model.prompt_drop(model.prompt_tokens.expand(batch, -1, -1).to(dtype))
