"""Which implementation runs a fused op: Triton on CUDA, the C++ ops of gist_fast._C on CPU.

`available(t)` says whether a fused backend exists for a tensor's device; the public functions
in gist_fast.ops fall back to gist_fast.reference otherwise. Tests use `force("triton")` to run the
Triton launchers on CPU tensors under TRITON_INTERPRET=1.
"""
import contextlib
import importlib.util
import os
from typing import Iterator, Optional

import torch

try:  # importing the extension registers its CPU ops under torch.ops.gist_fast
    from gist_fast import _C  # noqa: F401

    HAS_CPP = True
except ImportError:
    HAS_CPP = False

# found, not imported: `import gist_fast` on a machine without CUDA must not pay for (or break on) triton
HAS_TRITON = importlib.util.find_spec("triton") is not None

TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_forced: Optional[str] = None


@contextlib.contextmanager
def force(backend: Optional[str]) -> Iterator[None]:
    """Run every fused op on `backend` ("triton", "cpp", "reference" or None for the default choice)."""
    global _forced
    if backend not in (None, "triton", "cpp", "reference"):
        raise ValueError(f"backend must be 'triton', 'cpp', 'reference' or None, got {backend!r}")
    previous, _forced = _forced, backend
    try:
        yield
    finally:
        _forced = previous


FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the kernels compute in; others: reference


def select(t: torch.Tensor) -> str:
    """The backend for tensors like t (device and dtype): 'triton', 'cpp' or 'reference'."""
    if t.dtype not in FUSED_DTYPES:
        return "reference"
    if _forced is not None:
        return _forced
    if t.device.type == "cuda" and HAS_TRITON:
        return "triton"
    if t.device.type == "cpu" and HAS_CPP:
        return "cpp"
    return "reference"


def available(t: torch.Tensor) -> bool:
    return select(t) != "reference"
