// Fused per-tensor update rules on CUDA: LOMO's SGD apply and the factored Adafactor/AdaLomo update.
// Raw pointers and a stream only; the torch binding is update_binding.cpp. Specification:
// lowmem/ops/update.py. No host synchronization: the gradient scale and the step count are read from device
// memory, and the RMS scalars are reduced into a device buffer that the apply kernel reads.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../update_common.h"
#include "dtype.cuh"
#include "launch.h"
#include "factored_stats.cuh"
#include "reduce.cuh"

namespace lowmem {
namespace {

constexpr int kThreads = 256;

template <typename T, typename G>
__global__ void sgd_kernel(T* __restrict__ param, const G* __restrict__ grad, const int32_t* __restrict__ slot,
                           int64_t n, int64_t cols, float decay, float neg_lr, const float* __restrict__ grad_scale_p,
                           bool decayed) {
  const float grad_scale = *grad_scale_p;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    float w = to_float(param[i]);
    const float g = (slot == nullptr ? to_float(grad[i]) : grad_at(grad, slot, i / cols, i % cols, cols)) * grad_scale;
    if (decayed) w = w * decay;
    param[i] = from_float<T>(w + neg_lr * g);
  }
}

// One block per (batch, row): the row's mean of (s·g)², plus eps1, into the row state, and the row's Σθ².
template <typename T, typename G>
__global__ void row_stats_kernel(const T* __restrict__ param, const G* __restrict__ grad,
                                 const int32_t* __restrict__ slot, float* __restrict__ row,
                                 double* __restrict__ row_param_sq, int64_t cols, FactoredScalars a,
                                 const float* __restrict__ step, const float* __restrict__ grad_scale_p) {
  const int64_t br = blockIdx.x;
  const float grad_scale = *grad_scale_p;
  double sq = 0.0, psq = 0.0;
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
    const float g = grad_at(grad, slot, br, j, cols) * grad_scale;
    sq += static_cast<double>(g * g);
    const double w = to_float(param[br * cols + j]);
    psq += w * w;
  }
  const double total = block_total(sq);
  const double total_p = block_total(psq);
  if (threadIdx.x == 0) {
    const float beta2t = step_scalars(step, a).beta2t;
    row[br] = row[br] * beta2t + (1.f - beta2t) * static_cast<float>(total / cols + a.eps1);
    row_param_sq[br] = total_p;
  }
}

// One block per batch: r_i = rsqrt(row_i / mean(row)); block 0 also sums Σθ² of all rows into scalars[0].
__global__ void row_factor_kernel(const float* __restrict__ row, float* __restrict__ r_factor,
                                  const double* __restrict__ row_param_sq, int64_t n_rows_total, int64_t rows,
                                  double* __restrict__ scalars) {
  const int64_t b = blockIdx.x;
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < rows; i += blockDim.x) s += row[b * rows + i];
  const float mean = static_cast<float>(block_total(s) / rows);
  for (int64_t i = threadIdx.x; i < rows; i += blockDim.x) r_factor[b * rows + i] = rsqrtf(row[b * rows + i] / mean);
  if (b == 0) {
    double p = 0.0;
    for (int64_t i = threadIdx.x; i < n_rows_total; i += blockDim.x) p += row_param_sq[i];
    const double total = block_total(p);
    if (threadIdx.x == 0) scalars[0] = total;
  }
}

// Vector case: v ← β·v + (1−β)·((s·g)² + eps1), and Σθ² into scalars[0].
template <typename T, typename G>
__global__ void vector_stats_kernel(const T* __restrict__ param, const G* __restrict__ grad, float* __restrict__ v,
                                    int64_t n, FactoredScalars a, const float* __restrict__ step,
                                    const float* __restrict__ grad_scale_p, double* __restrict__ scalars) {
  const float grad_scale = *grad_scale_p;
  const float beta2t = step_scalars(step, a).beta2t;
  double psq = 0.0;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const float g = to_float(grad[i]) * grad_scale;
    v[i] = v[i] * beta2t + (1.f - beta2t) * (g * g + a.eps1);
    const double w = to_float(param[i]);
    psq += w * w;
  }
  const double total = block_total(psq);
  if (threadIdx.x == 0) atomicAdd(&scalars[0], total);
}

template <typename G>
__device__ __forceinline__ float update_at(const G* grad, const int32_t* slot, const float* r_factor, const float* col,
                                           const float* v, int64_t i, int64_t rows, int64_t cols, bool factored,
                                           float grad_scale) {
  if (!factored) return rsqrtf(v[i]) * (to_float(grad[i]) * grad_scale);
  const int64_t br = i / cols, j = i % cols, b = br / rows;
  const float g = grad_at(grad, slot, br, j, cols) * grad_scale;
  return g * (r_factor[br] * rsqrtf(col[b * cols + j]));
}

template <typename G>
__global__ void update_sq_kernel(const G* __restrict__ grad, const int32_t* __restrict__ slot,
                                 const float* __restrict__ r_factor,
                                 const float* __restrict__ col, const float* __restrict__ v, int64_t n, int64_t rows,
                                 int64_t cols, bool factored, const float* __restrict__ grad_scale_p,
                                 double* __restrict__ scalars) {
  const float grad_scale = *grad_scale_p;
  double s = 0.0;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const double u = update_at(grad, slot, r_factor, col, v, i, rows, cols, factored, grad_scale);
    s += u * u;
  }
  const double total = block_total(s);
  if (threadIdx.x == 0) atomicAdd(&scalars[1], total);
}

template <typename T, typename G>
__global__ void apply_kernel(T* __restrict__ param, const G* __restrict__ grad, const int32_t* __restrict__ slot,
                             const float* __restrict__ r_factor,
                             const float* __restrict__ col, const float* __restrict__ v, float* __restrict__ exp_avg,
                             int64_t n, int64_t rows, int64_t cols, bool factored, FactoredScalars a,
                             const float* __restrict__ step, const float* __restrict__ grad_scale_p,
                             const double* __restrict__ scalars) {
  const float grad_scale = *grad_scale_p;
  const double rho = step_scalars(step, a).rho;
  double alpha = rho;
  if (a.scale_parameter) alpha = rho * fmax(static_cast<double>(a.eps2), sqrt(scalars[0] / n));
  const float denom = static_cast<float>(fmax(1.0, sqrt(scalars[1] / n) / a.clip_threshold));
  const float alpha_f = static_cast<float>(alpha);
  const float decay = static_cast<float>(-static_cast<double>(a.weight_decay) * alpha);
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    float update = __fmul_rn(
        __fdiv_rn(update_at(grad, slot, r_factor, col, v, i, rows, cols, factored, grad_scale), denom), alpha_f);
    if (exp_avg != nullptr) {
      exp_avg[i] = exp_avg[i] * a.beta1 + (1.f - a.beta1) * update;
      update = exp_avg[i];
    }
    float w = to_float(param[i]);
    if (a.weight_decay != 0.f) w = w + decay * w;
    param[i] = from_float<T>(w - update);
  }
}

int grid_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < 4096 ? (blocks > 0 ? blocks : 1) : 4096);
}

template <typename T, typename G>
int launch_factored(void* param_v, const void* grad_v, const int32_t* slot, float* row, float* col, float* exp_avg,
                    int64_t batch, int64_t rows, int64_t cols, bool factored, FactoredScalars a, const float* step,
                    const float* grad_scale, FactoredWorkspace ws, cudaStream_t stream) {
  T* param = static_cast<T*>(param_v);
  const G* grad = static_cast<const G*>(grad_v);
  const int64_t n = batch * rows * cols;
  if (n == 0) return 0;
  cudaMemsetAsync(ws.scalars, 0, 2 * sizeof(double), stream);
  if (factored) {
    row_stats_kernel<T, G><<<batch * rows, kThreads, 0, stream>>>(param, grad, slot, row, ws.row_param_sq, cols, a,
                                                                 step, grad_scale);
    const int64_t chunks = factored_col_chunks(rows);
    const int64_t rows_per_chunk = (rows + chunks - 1) / chunks;
    const int64_t col_tiles = (cols + kColTile - 1) / kColTile;
    const dim3 col_grid(static_cast<unsigned>(batch * col_tiles), static_cast<unsigned>(chunks));
    col_partial_kernel<G><<<col_grid, dim3(kColTile, kColRows), 0, stream>>>(grad, slot, ws.col_partial, batch, rows, cols,
                                                                            col_tiles, rows_per_chunk,
                                                                            grad_scale);
    col_finish_kernel<<<(batch * cols + kThreads - 1) / kThreads, kThreads, 0, stream>>>(ws.col_partial, col, batch,
                                                                                         rows, cols, chunks, a, step);
    row_factor_kernel<<<batch, kThreads, 0, stream>>>(row, ws.r_factor, ws.row_param_sq, batch * rows, rows,
                                                      ws.scalars);
  } else {
    vector_stats_kernel<T, G><<<grid_for(n), kThreads, 0, stream>>>(param, grad, row, n, a, step, grad_scale,
                                                                   ws.scalars);
  }
  update_sq_kernel<G><<<grid_for(n), kThreads, 0, stream>>>(grad, slot, ws.r_factor, col, row, n, rows, cols, factored,
                                                            grad_scale, ws.scalars);
  apply_kernel<T, G><<<grid_for(n), kThreads, 0, stream>>>(param, grad, slot, ws.r_factor, col, row, exp_avg, n, rows, cols,
                                                           factored, a, step, grad_scale, ws.scalars);
  return static_cast<int>(cudaGetLastError());
}

template <typename T, typename G>
int launch_sgd(void* param, const void* grad, const int32_t* slot, int64_t n, int64_t cols, float lr,
               float weight_decay, const float* grad_scale, cudaStream_t stream) {
  if (n == 0) return 0;
  const float decay = static_cast<float>(1.0 - static_cast<double>(lr) * weight_decay);
  sgd_kernel<T, G><<<grid_for(n), kThreads, 0, stream>>>(static_cast<T*>(param), static_cast<const G*>(grad), slot, n,
                                                         cols, decay, -lr, grad_scale, weight_decay != 0.f);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int sgd_update_cuda_launch(DType dtype, DType grad_dtype, void* param, const void* grad, const int32_t* slot,
                           int64_t n, int64_t cols, float lr, float weight_decay, const float* grad_scale,
                           cudaStream_t stream) {
  return dispatch_param_grad(dtype, grad_dtype, [&](auto p, auto g) {
    return launch_sgd<typename decltype(p)::type, typename decltype(g)::type>(param, grad, slot, n, cols, lr,
                                                                               weight_decay, grad_scale, stream);
  });
}

int factored_update_cuda_launch(DType dtype, DType grad_dtype, void* param, const void* grad, const int32_t* slot,
                                float* row, float* col,
                                float* exp_avg, int64_t batch, int64_t rows, int64_t cols, bool factored,
                                FactoredScalars scalars, const float* step, const float* grad_scale,
                                FactoredWorkspace workspace, cudaStream_t stream) {
  return dispatch_param_grad(dtype, grad_dtype, [&](auto p, auto g) {
    return launch_factored<typename decltype(p)::type, typename decltype(g)::type>(
        param, grad, slot, row, col, exp_avg, batch, rows, cols, factored, scalars, step, grad_scale, workspace, stream);
  });
}

}  // namespace lowmem
