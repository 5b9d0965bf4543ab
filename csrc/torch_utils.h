// Small helpers for the torch-facing kernel bindings (CPU and CUDA).
#pragma once

#include <torch/extension.h>

namespace lowmem {

// Runs fn on a contiguous version of param and copies the result back if param was not contiguous, so
// kernels can assume dense row-major memory while callers may pass any strided view.
template <typename Fn>
void on_contiguous(at::Tensor& param, Fn fn) {
  if (param.is_contiguous()) {
    fn(param);
  } else {
    at::Tensor work = param.contiguous();
    fn(work);
    param.copy_(work);
  }
}

}  // namespace lowmem
