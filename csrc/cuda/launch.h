// Launchers exported by the .cu files: raw pointers, an element count and a stream. The torch-facing
// bindings (*_binding.cpp, built only against a CUDA torch) translate tensors into these calls.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace lowmem {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Each returns a cudaError_t as int (0 = success).
int quantize_blockwise_cuda_launch(DType dtype, const void* x, int64_t n, const float* code, int64_t blocksize,
                                   bool preserve_sign, uint8_t* out, float* absmax, cudaStream_t stream);
int dequantize_blockwise_cuda_launch(DType dtype, const uint8_t* codes, const float* absmax, const float* code,
                                     int64_t n, int64_t blocksize, void* out, cudaStream_t stream);

}  // namespace lowmem
