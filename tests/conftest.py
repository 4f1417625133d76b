import os

import torch

# Triton kernels run on CPU tensors through the interpreter when no GPU is present; the variable
# must be set before triton decorates any kernel, i.e. before gist_fast.kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
