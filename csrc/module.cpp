// The Python module lowmem._C. Kernels register themselves with the dispatcher (TORCH_LIBRARY_IMPL in
// each source file) when this library is loaded; the module only reports how it was built.
//
// Every source includes the ATen headers it uses (the Tensor class, the ops it calls, the dispatch macros) and
// <torch/library.h> to register, never <torch/extension.h> or <ATen/ATen.h>: those pull in all of torch's C++
// frontend or every op, and made each file take a minute to compile on two cores instead of about 20 seconds.
#include <pybind11/pybind11.h>

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
