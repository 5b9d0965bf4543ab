// Launchers exported by the .cu files: raw pointers, an element count and a stream. The torch-facing
// bindings (*_binding.cpp, built only against a CUDA torch) translate tensors into these calls.
//
// Scalars that change every step without the host knowing them (the gradient scale, the step count) arrive
// as device pointers that the kernels read: a launch never needs a value from the device on the host.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "../int8_update_common.h"

namespace lowmem {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Each returns a cudaError_t as int (0 = success).
int quantize_blockwise_cuda_launch(DType dtype, const void* x, int64_t n, const float* code, int64_t blocksize,
                                   bool preserve_sign, uint8_t* out, float* absmax, cudaStream_t stream);
int dequantize_blockwise_cuda_launch(DType dtype, const uint8_t* codes, const float* absmax, const float* code,
                                     int64_t n, int64_t blocksize, void* out, cudaStream_t stream);

// The update launchers take the weight's dtype and the gradient's, which is either the same or float32 (a
// float32 gradient of a bfloat16 weight is read at full precision, as the reference and the CPU kernels do).

// slot: null for a dense gradient; else the gradient is row-sparse (rows × cols, see csrc/cpu/grad_rows.h): row i is
// row slot[i] of grad (k × cols), or zero where slot[i] < 0. grad_scale: device pointer to one float.
int sgd_update_cuda_launch(DType dtype, DType grad_dtype, void* param, const void* grad, const int32_t* slot,
                           int64_t n, int64_t cols, float lr, float weight_decay, const float* grad_scale,
                           cudaStream_t stream);

// Host-known scalars of one factored (Adafactor/AdaLomo) step; see lowmem/ops/update.py.
struct FactoredScalars {
  double lr, decay_rate;  // the step scalars derive from them in double, as on the CPU and in the reference
  float eps1, clip_threshold, eps2, weight_decay, beta1;
  bool relative_step, scale_parameter;
};

// Column sums are reduced in factored_col_chunks(rows) slices of rows, each block summing its slice for 32
// columns, then added up in a fixed order: deterministic, and parallel over rows as well as columns.
inline int64_t factored_col_chunks(int64_t rows) {
  const int64_t chunks = (rows + 63) / 64;
  return chunks < 1 ? 1 : (chunks > 64 ? 64 : chunks);
}

// Device scratch for a factored step, allocated by the caller: r_factor and row_param_sq hold one value per
// matrix row (batch × rows), col_partial factored_col_chunks(rows) × batch × cols doubles, scalars two doubles
// (Σθ², Σu²).
struct FactoredWorkspace {
  float* r_factor;
  double* row_param_sq;
  double* col_partial;
  double* scalars;
};

// factored: row/col are the row and column statistics (batch × rows, batch × cols); otherwise row is the full
// second moment of a vector and col is unused. exp_avg may be null (no first moment). step (t, already counted)
// and grad_scale: device pointers to one float each. slot: as sgd_update_cuda_launch's (factored only).
int factored_update_cuda_launch(DType dtype, DType grad_dtype, void* param, const void* grad, const int32_t* slot,
                                float* row, float* col,
                                float* exp_avg, int64_t batch, int64_t rows, int64_t cols, bool factored,
                                FactoredScalars scalars, const float* step, const float* grad_scale,
                                FactoredWorkspace workspace, cudaStream_t stream);

// Host-known scalars of one Lion step; decay = 1 − lr·wd.
struct LionScalars {
  float lr, beta1, beta2, decay;
};

// One fused Lion8bit step per quantization block (blocksize ≤ 4096); grad_scale: device pointer to one float.
int lion8bit_update_cuda_launch(DType dtype, DType grad_dtype, void* param, const void* grad, uint8_t* codes,
                                float* absmax, const float* code, int64_t n, int64_t blocksize, LionScalars scalars,
                                const float* grad_scale, cudaStream_t stream);

// The fused int8-weight update (lowmem/ops/int8_update.py). An int8 weight's buffers and the rule's state (null where
// the rule has none): codes, absmax per block, sorted outlier positions and values; lion8bit's momentum codes and
// absmax use the weight's blocks.
struct Int8DeviceBuffers {
  uint8_t* codes;
  float* absmax;
  int32_t* outlier_index;
  float* outlier_value;
  int64_t n, n_outliers;
  const bool* mask;
  float* state;
  uint8_t* state_codes;
  float* state_absmax;
  const float* state_code;
  const float* coef;
  int64_t rows;
};

// Device scratch for a refresh, allocated by the caller (unused otherwise): hist 65536 counters, selection 4, counts
// and offsets 2 × n_blocks each, new_index / new_value n_outliers each.
struct Int8RefreshWorkspace {
  unsigned long long* hist;
  long long* selection;
  long long* counts;
  long long* offsets;
  int32_t* new_index;
  float* new_value;
};

// One step (blocksize ≤ 4096); grad_scale: device pointer to one float.
int int8_update_cuda_launch(DType grad_dtype, const void* grad, Int8DeviceBuffers buffers, Int8Scalars scalars,
                            const float* grad_scale, Int8RefreshWorkspace workspace, cudaStream_t stream);

// Row slices of the column sums of int8_factored_prepare: deterministic, parallel over rows as well as columns.
inline int64_t int8_prepare_col_chunks(int64_t rows) {
  const int64_t chunks = (rows + 63) / 64;
  return chunks < 1 ? 1 : (chunks > 64 ? 64 : chunks);
}

// Device scratch of int8_factored_prepare: row_partial rows doubles, col_partial int8_prepare_col_chunks(rows) × cols,
// block_sq one per weight block.
struct Int8PrepareWorkspace {
  double* row_partial;
  double* col_partial;
  double* block_sq;
};

// The factored rules' coefficients [r (rows), c (cols), clip divisor, α] into out; updates row and col. step and
// grad_scale: device pointers to one float each.
int int8_factored_prepare_cuda_launch(DType grad_dtype, const void* grad, const uint8_t* codes, const float* absmax,
                                      const float* outlier_value, int64_t n_outliers, float* row, float* col,
                                      int64_t rows, int64_t cols, int64_t blocksize, FactoredScalars scalars,
                                      const float* step, const float* grad_scale, Int8PrepareWorkspace workspace,
                                      float* out, cudaStream_t stream);

// Token blocks (lowmem/ops/blocks.py). Segment copies of whole blocks, any dtype (moved as bytes): gather copies each
// sequence's kept blocks (indices in blocks, batch × kept, on the device) and its tail from the full tensor
// (batch x_batch: 1 is broadcast) into the packed one; scatter copies them back from the packed tensor into the full
// one. row_bytes is the size of one token's row. An out-of-range block index traps the kernel.
int copy_token_blocks_cuda_launch(bool to_packed, void* dst, const void* src, const int64_t* blocks, int64_t batch,
                                  int64_t x_batch, int64_t length, int64_t full_blocks, int64_t kept, int64_t block_size,
                                  int64_t row_bytes, cudaStream_t stream);
// Sums of scores (batch × length) over each whole block, accumulated in double, written as float32.
int pool_blocks_cuda_launch(DType dtype, const void* scores, int64_t batch, int64_t length, int64_t block_size,
                            float* out, cudaStream_t stream);

}  // namespace lowmem
