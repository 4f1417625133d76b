// gist_fast._C: the Python module that carries the C++ CPU kernels (TORCH_LIBRARY_IMPL in the other files of
// csrc/) of the ops gist_fast/ops/ defines; importing it is what registers them at the CPU key.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "gist_fast C++ CPU kernels of the torch.ops.gist_fast ops";
}
