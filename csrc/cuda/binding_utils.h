// Helpers shared by the torch bindings of the CUDA kernels (*_binding.cpp): the dtype tag a launcher takes, and one
// error message for a failed launch.
#pragma once

#include <ATen/core/Tensor.h>
#include <cuda_runtime.h>

#include "launch.h"

namespace lowmem {

inline DType dtype_of(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "lowmem: ", op, ": CUDA kernels support float32, float16 and bfloat16, got ",
                         t.scalar_type());
  }
}

inline void check_launch(int err, const char* what) {
  TORCH_CHECK(err == 0, "lowmem: ", what, " failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

}  // namespace lowmem
