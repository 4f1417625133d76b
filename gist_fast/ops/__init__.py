"""Fused ops: each a torch.library custom op declared once in Python (schema, fake, autograd formula) whose
implementation the dispatcher picks by device: the Triton launchers on CUDA, the C++ kernels of gist_fast._C on
CPU (adapter and losses; scale_shift and lora_qv have none), the plain-torch contract elsewhere. The public
functions take gist_fast.reference for what the ops do not compute (dtypes other than fp32 / bf16 / fp16,
fused=False)."""
from gist_fast.ops.adapter import adapter, adapter_norm
from gist_fast.ops.lora_qv import lora_qv
from gist_fast.ops.losses import distill_loss, gist_loss
from gist_fast.ops.scale_shift import scale_shift

__all__ = ["adapter", "adapter_norm", "gist_loss", "distill_loss", "scale_shift", "lora_qv"]
