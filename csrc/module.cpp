// gist_fast._C: the Python module that carries the C++ CPU ops (registered with TORCH_LIBRARY_FRAGMENT
// in the other files of csrc/); importing it is what registers them.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "gist_fast C++ CPU ops (see torch.ops.gist_fast)";
}
