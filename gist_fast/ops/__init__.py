"""Fused ops: each a torch.library op with one autograd formula, Triton on CUDA, C++ on CPU,
and gist_fast.reference where neither applies."""
from gist_fast.ops.adapter import adapter, adapter_norm
from gist_fast.ops.losses import distill_loss, gist_loss

__all__ = ["adapter", "adapter_norm", "gist_loss", "distill_loss"]
