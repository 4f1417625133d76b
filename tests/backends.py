"""Which implementation of the gist_fast ops a test runs, chosen inside the test and undone after it.

In the library the dispatcher alone picks by device: CUDA → the Triton launchers, CPU → the C++ kernels of
gist_fast._C (for CPP_OPS), other devices and the ops without a C++ kernel → the ops' plain-torch body. A test
reaches another implementation with CPU tensors through `use_backend(name)`, which registers it at the CPU key for
the duration of a `with` block (the Triton launchers run there under TRITON_INTERPRET=1); leaving the block removes
the registration, and the kernel that was there before (the C++ one, or none) serves again.
"""
import contextlib
import os
from typing import Iterator

import pytest
import torch

from gist_fast.ops import _backend, adapter_torch, lora_qv_torch, losses_torch, scale_shift_torch
from gist_fast.ops.adapter import adapter_bwd_triton, adapter_fwd_triton
from gist_fast.ops.lora_qv import lora_qv_bwd_triton, lora_qv_triton
from gist_fast.ops.losses import pair_loss_bwd_triton, pair_loss_triton
from gist_fast.ops.scale_shift import scale_shift_bwd_triton, scale_shift_triton

CPP_OPS = ("adapter_fwd", "adapter_bwd", "pair_loss", "pair_loss_bwd")  # with a C++ CPU kernel (csrc/)
# without one: on CPU their default, the plain-torch contract, serves (also under use_backend("cpp"))
OPS = CPP_OPS + ("scale_shift", "scale_shift_bwd", "lora_qv", "lora_qv_bwd")
IMPLS = {
    "triton": (adapter_fwd_triton, adapter_bwd_triton, pair_loss_triton, pair_loss_bwd_triton,
               scale_shift_triton, scale_shift_bwd_triton, lora_qv_triton, lora_qv_bwd_triton),
    "torch": (adapter_torch.adapter_fwd, adapter_torch.adapter_bwd, losses_torch.pair_loss, losses_torch.pair_loss_bwd,
              scale_shift_torch.scale_shift, scale_shift_torch.scale_shift_bwd, lora_qv_torch.lora_qv,
              lora_qv_torch.lora_qv_bwd),
}
TRITON_RUNS = _backend.HAS_TRITON and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")

# "cpp": the C++ kernels (the plain-torch contract for the ops without one); "triton": the Triton launchers (on
# CUDA, or interpreted on CPU); "torch": the plain-torch contract, the ops' default implementation
BACKENDS = [
    pytest.param("cpp", marks=pytest.mark.skipif(not _backend.HAS_CPP, reason="gist_fast._C not built")),
    pytest.param("triton", marks=pytest.mark.skipif(not TRITON_RUNS, reason="Triton needs CUDA or TRITON_INTERPRET=1")),
    "torch",
]


def device(backend: str) -> str:
    """Where a test of `backend` puts its tensors: CUDA for Triton when there is a GPU, else the CPU."""
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def has_kernel(op: str, device_type: str) -> bool:
    """Whether gist_fast::op has an implementation of its own for the device (not the plain-torch default)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"gist_fast::{op}",
                                                          torch._C._dispatch_key_for_device(device_type))


def kernel_ops(device_type: str) -> tuple:
    """The ops that have a kernel of their own on the device type when its backend is there: on CPU the C++ ones,
    elsewhere all (Triton)."""
    return CPP_OPS if device_type == "cpu" else OPS


def fused_kernel_runs(t: torch.Tensor) -> bool:
    """Whether the ops run a kernel of their own (C++ or Triton) for tensors like t: a dtype they compute in and
    a kernel registered for t's device (for every op that has one there)."""
    return t.dtype in _backend.FUSED_DTYPES and all(has_kernel(op, t.device.type) for op in kernel_ops(t.device.type))


@contextlib.contextmanager
def use_backend(backend: str) -> Iterator[None]:
    """Within the block, CPU tensors run `backend`'s implementation of every gist_fast op, forward and backward.
    CUDA tensors keep the Triton launchers (the default there)."""
    if backend == "cpp":  # the default on CPU where the extension is built
        if not has_kernel("adapter_fwd", "cpu"):
            raise RuntimeError("the C++ kernels are not registered (gist_fast._C not built)")
        yield
        return
    lib = torch.library.Library("gist_fast", "IMPL")
    try:
        for op, fn in zip(OPS, IMPLS[backend]):  # above the C++ kernel, which serves again after _destroy
            lib.impl(op, fn, "CPU")
        yield
    finally:
        lib._destroy()
