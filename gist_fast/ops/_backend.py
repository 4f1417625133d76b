"""What the ops need to know about this installation; which implementation runs is the dispatcher's choice.

Every op module imports this one before it defines its ops, so the C++ kernels register first, for ops not yet
defined, and the dispatcher checks each C++ signature against its Python schema when the op is defined: a
mismatch raises a RuntimeError there, naming both. (The other order fails inside the extension's static
initialisers, where the C++ exception aborts the process instead of reaching Python.)
"""
import importlib.util

import torch

try:  # registers the C++ CPU kernels of gist_fast::* (TORCH_LIBRARY_IMPL(gist_fast, CPU, m) in csrc/)
    from gist_fast import _C  # noqa: F401

    HAS_CPP = True
except ImportError:  # built with GIST_FAST_NO_EXT=1: CPU tensors run the plain-torch contract
    HAS_CPP = False

# found, not imported: `import gist_fast` on a machine without CUDA must not pay for (or break on) triton
HAS_TRITON = importlib.util.find_spec("triton") is not None

FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the ops compute in; others: gist_fast.reference


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """The plain-torch contracts' compute dtype: at least fp32 (float64 stays float64 for the tests' oracle)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))
