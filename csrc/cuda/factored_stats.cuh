// The factored rules' step scalars and column statistics on CUDA, shared by update.cu and int8_update.cu.
#pragma once

#include <cstdint>

#include "../update_common.h"
#include "dtype.cuh"

namespace lowmem {
namespace {  // kernels defined in a header: each file that includes it gets its own

// Gradient element (row br, column j) of a rows × cols gradient: dense (slot null), or row-sparse: row br is row
// slot[br] of a compact values matrix, or zero where slot[br] < 0 (see csrc/cpu/grad_rows.h). Every factored and
// sgd kernel reads the gradient through this, so a row-sparse gradient gets the dense gradient's arithmetic.
template <typename G>
__device__ __forceinline__ float grad_at(const G* grad, const int32_t* slot, int64_t br, int64_t j, int64_t cols) {
  if (slot == nullptr) return to_float(grad[br * cols + j]);
  const int32_t s = slot[br];
  return s < 0 ? 0.f : to_float(grad[static_cast<int64_t>(s) * cols + j]);
}

constexpr int kColTile = 32;  // columns per block of the column-sum kernel (one warp wide)
constexpr int kColRows = 8;   // rows read at once by a block of the column-sum kernel

// Column sums of (s·g)² (eps1 is added to the mean by col_finish_kernel, as on the CPU), parallel over rows too:
// block (b · col_tiles + tile, chunk) sums a slice of rows for kColTile consecutive columns (a warp reads consecutive columns of one row: coalesced) into
// col_partial[chunk][b][j]. The batch is folded into x, whose limit is 2³¹ − 1 (y and z stop at 65535).
template <typename G>
__global__ void col_partial_kernel(const G* __restrict__ grad, const int32_t* __restrict__ slot,
                                   double* __restrict__ col_partial, int64_t batch,
                                   int64_t rows, int64_t cols, int64_t col_tiles, int64_t rows_per_chunk,
                                   const float* __restrict__ grad_scale_p) {
  __shared__ double acc[kColRows][kColTile + 1];
  const int64_t b = blockIdx.x / col_tiles, tile = blockIdx.x % col_tiles;
  const int64_t j = tile * kColTile + threadIdx.x;
  const int64_t chunk = blockIdx.y;
  const int64_t lo = chunk * rows_per_chunk;
  const int64_t hi = lo + rows_per_chunk < rows ? lo + rows_per_chunk : rows;
  const float grad_scale = *grad_scale_p;
  double sum = 0.0;
  if (j < cols) {
    for (int64_t i = lo + threadIdx.y; i < hi; i += kColRows) {
      const float g = grad_at(grad, slot, b * rows + i, j, cols) * grad_scale;
      sum += static_cast<double>(g * g);
    }
  }
  acc[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && j < cols) {
    double total = 0.0;
    for (int y = 0; y < kColRows; ++y) total += acc[y][threadIdx.x];
    col_partial[(chunk * batch + b) * cols + j] = total;
  }
}

// β₂ₜ and ρ of the step count t on the device, as the CPU derives them.
__device__ __forceinline__ FactoredStep step_scalars(const float* step, const FactoredScalars& a) {
  return factored_step(static_cast<double>(*step), a.lr, a.relative_step, a.decay_rate);
}

// One thread per (batch, column): add the slices in order and update the column state.
__global__ void col_finish_kernel(const double* __restrict__ col_partial, float* __restrict__ col, int64_t batch,
                                  int64_t rows, int64_t cols, int64_t chunks, FactoredScalars a,
                                  const float* __restrict__ step) {
  const int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (k >= batch * cols) return;
  double sum = 0.0;
  for (int64_t c = 0; c < chunks; ++c) sum += col_partial[c * batch * cols + k];
  const float beta2t = step_scalars(step, a).beta2t;
  col[k] = col[k] * beta2t + (1.f - beta2t) * static_cast<float>(sum / rows + a.eps1);
}

}  // namespace
}  // namespace lowmem
