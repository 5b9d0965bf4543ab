// The Python module lowmem._C. Kernels register themselves with the dispatcher (TORCH_LIBRARY_IMPL in
// each source file) when this library is loaded; the module only reports how it was built.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#ifdef LOWMEM_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}
