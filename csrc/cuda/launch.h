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

// Scalars of one factored (Adafactor/AdaLomo) step; see lowmem/ops/update.py.
struct FactoredScalars {
  float grad_scale, beta2t, eps1, clip_threshold, rho, eps2, weight_decay, beta1;
  bool scale_parameter;
};

// Device scratch for a factored step, allocated by the caller: r_factor and row_param_sq hold one value
// per matrix row (batch × rows), scalars two doubles (Σθ², Σu²).
struct FactoredWorkspace {
  float* r_factor;
  double* row_param_sq;
  double* scalars;
};

int sgd_update_cuda_launch(DType dtype, void* param, const void* grad, int64_t n, float lr, float weight_decay,
                           float grad_scale, cudaStream_t stream);
// factored: row/col are the row and column statistics (batch × rows, batch × cols); otherwise row is the
// full second moment of a vector and col is unused. exp_avg may be null (no first moment).
int factored_update_cuda_launch(DType dtype, void* param, const void* grad, float* row, float* col, float* exp_avg,
                                int64_t batch, int64_t rows, int64_t cols, bool factored, FactoredScalars scalars,
                                FactoredWorkspace workspace, cudaStream_t stream);

// Scalars of one Lion step; decay = 1 − lr·wd.
struct LionScalars {
  float lr, beta1, beta2, decay, grad_scale;
};

// One fused Lion8bit step per quantization block (blocksize ≤ 4096).
int lion8bit_update_cuda_launch(DType dtype, void* param, const void* grad, uint8_t* codes, float* absmax,
                                const float* code, int64_t n, int64_t blocksize, LionScalars scalars,
                                cudaStream_t stream);

}  // namespace lowmem
