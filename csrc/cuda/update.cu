// Fused per-tensor update rules on CUDA: LOMO's SGD apply and the factored Adafactor/AdaLomo update.
// Raw pointers and a stream only; the torch binding is update_binding.cpp. Specification:
// lowmem/ops/update.py. No host synchronization: the RMS scalars are reduced into a device buffer that the
// apply kernel reads.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "dtype.cuh"
#include "launch.h"

namespace lowmem {
namespace {

constexpr int kThreads = 256;

// Sum of v over the block (double), valid in thread 0.
__device__ double block_sum(double v) {
  __shared__ double partial[kThreads];
  partial[threadIdx.x] = v;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) partial[threadIdx.x] += partial[threadIdx.x + s];
    __syncthreads();
  }
  const double total = partial[0];
  __syncthreads();
  return total;
}

template <typename T>
__global__ void sgd_kernel(T* __restrict__ param, const T* __restrict__ grad, int64_t n, float decay, float neg_lr,
                           float grad_scale, bool decayed) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    float w = to_float(param[i]);
    const float g = to_float(grad[i]) * grad_scale;
    if (decayed) w = w * decay;
    param[i] = from_float<T>(w + neg_lr * g);
  }
}

// One block per (batch, row): the row's mean of (s·g)² + eps1 into the row state, and the row's Σθ².
template <typename T>
__global__ void row_stats_kernel(const T* __restrict__ param, const T* __restrict__ grad, float* __restrict__ row,
                                 double* __restrict__ row_param_sq, int64_t cols, FactoredScalars a) {
  const int64_t br = blockIdx.x;
  double sq = 0.0, psq = 0.0;
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
    const float g = to_float(grad[br * cols + j]) * a.grad_scale;
    sq += static_cast<double>(g * g + a.eps1);
    const double w = to_float(param[br * cols + j]);
    psq += w * w;
  }
  const double total = block_sum(sq);
  const double total_p = block_sum(psq);
  if (threadIdx.x == 0) {
    row[br] = row[br] * a.beta2t + (1.f - a.beta2t) * static_cast<float>(total / cols);
    row_param_sq[br] = total_p;
  }
}

// One thread per (batch, column): threads of a warp read consecutive columns of a row (coalesced).
template <typename T>
__global__ void col_stats_kernel(const T* __restrict__ grad, float* __restrict__ col, int64_t batch, int64_t rows,
                                 int64_t cols, FactoredScalars a) {
  const int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (k >= batch * cols) return;
  const int64_t b = k / cols, j = k % cols;
  double sq = 0.0;
  for (int64_t i = 0; i < rows; ++i) {
    const float g = to_float(grad[(b * rows + i) * cols + j]) * a.grad_scale;
    sq += static_cast<double>(g * g + a.eps1);
  }
  col[k] = col[k] * a.beta2t + (1.f - a.beta2t) * static_cast<float>(sq / rows);
}

// One block per batch: r_i = rsqrt(row_i / mean(row)); block 0 also sums Σθ² of all rows into scalars[0].
__global__ void row_factor_kernel(const float* __restrict__ row, float* __restrict__ r_factor,
                                  const double* __restrict__ row_param_sq, int64_t n_rows_total, int64_t rows,
                                  double* __restrict__ scalars) {
  const int64_t b = blockIdx.x;
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < rows; i += blockDim.x) s += row[b * rows + i];
  const float mean = static_cast<float>(block_sum(s) / rows);
  for (int64_t i = threadIdx.x; i < rows; i += blockDim.x) r_factor[b * rows + i] = rsqrtf(row[b * rows + i] / mean);
  if (b == 0) {
    double p = 0.0;
    for (int64_t i = threadIdx.x; i < n_rows_total; i += blockDim.x) p += row_param_sq[i];
    const double total = block_sum(p);
    if (threadIdx.x == 0) scalars[0] = total;
  }
}

// Vector case: v ← β·v + (1−β)·((s·g)² + eps1), and Σθ² into scalars[0].
template <typename T>
__global__ void vector_stats_kernel(const T* __restrict__ param, const T* __restrict__ grad, float* __restrict__ v,
                                    int64_t n, FactoredScalars a, double* __restrict__ scalars) {
  double psq = 0.0;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const float g = to_float(grad[i]) * a.grad_scale;
    v[i] = v[i] * a.beta2t + (1.f - a.beta2t) * (g * g + a.eps1);
    const double w = to_float(param[i]);
    psq += w * w;
  }
  const double total = block_sum(psq);
  if (threadIdx.x == 0) atomicAdd(&scalars[0], total);
}

template <typename T>
__device__ __forceinline__ float update_at(const T* grad, const float* r_factor, const float* col, const float* v,
                                           int64_t i, int64_t rows, int64_t cols, bool factored, float grad_scale) {
  const float g = to_float(grad[i]) * grad_scale;
  if (!factored) return rsqrtf(v[i]) * g;
  const int64_t br = i / cols, j = i % cols, b = br / rows;
  return g * (r_factor[br] * rsqrtf(col[b * cols + j]));
}

template <typename T>
__global__ void update_sq_kernel(const T* __restrict__ grad, const float* __restrict__ r_factor,
                                 const float* __restrict__ col, const float* __restrict__ v, int64_t n, int64_t rows,
                                 int64_t cols, bool factored, float grad_scale, double* __restrict__ scalars) {
  double s = 0.0;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const double u = update_at(grad, r_factor, col, v, i, rows, cols, factored, grad_scale);
    s += u * u;
  }
  const double total = block_sum(s);
  if (threadIdx.x == 0) atomicAdd(&scalars[1], total);
}

template <typename T>
__global__ void apply_kernel(T* __restrict__ param, const T* __restrict__ grad, const float* __restrict__ r_factor,
                             const float* __restrict__ col, const float* __restrict__ v, float* __restrict__ exp_avg,
                             int64_t n, int64_t rows, int64_t cols, bool factored, FactoredScalars a,
                             const double* __restrict__ scalars) {
  double alpha = a.rho;
  if (a.scale_parameter) alpha = a.rho * fmax(static_cast<double>(a.eps2), sqrt(scalars[0] / n));
  const float denom = static_cast<float>(fmax(1.0, sqrt(scalars[1] / n) / a.clip_threshold));
  const float alpha_f = static_cast<float>(alpha);
  const float decay = static_cast<float>(-static_cast<double>(a.weight_decay) * alpha);
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    float update = __fmul_rn(__fdiv_rn(update_at(grad, r_factor, col, v, i, rows, cols, factored, a.grad_scale), denom),
                             alpha_f);
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

template <typename T>
int launch_factored(void* param_v, const void* grad_v, float* row, float* col, float* exp_avg, int64_t batch,
                    int64_t rows, int64_t cols, bool factored, FactoredScalars a, FactoredWorkspace ws,
                    cudaStream_t stream) {
  T* param = static_cast<T*>(param_v);
  const T* grad = static_cast<const T*>(grad_v);
  const int64_t n = batch * rows * cols;
  if (n == 0) return 0;
  cudaMemsetAsync(ws.scalars, 0, 2 * sizeof(double), stream);
  if (factored) {
    row_stats_kernel<T><<<batch * rows, kThreads, 0, stream>>>(param, grad, row, ws.row_param_sq, cols, a);
    col_stats_kernel<T><<<(batch * cols + kThreads - 1) / kThreads, kThreads, 0, stream>>>(grad, col, batch, rows,
                                                                                          cols, a);
    row_factor_kernel<<<batch, kThreads, 0, stream>>>(row, ws.r_factor, ws.row_param_sq, batch * rows, rows,
                                                      ws.scalars);
  } else {
    vector_stats_kernel<T><<<grid_for(n), kThreads, 0, stream>>>(param, grad, row, n, a, ws.scalars);
  }
  update_sq_kernel<T><<<grid_for(n), kThreads, 0, stream>>>(grad, ws.r_factor, col, row, n, rows, cols, factored,
                                                            a.grad_scale, ws.scalars);
  apply_kernel<T><<<grid_for(n), kThreads, 0, stream>>>(param, grad, ws.r_factor, col, row, exp_avg, n, rows, cols,
                                                        factored, a, ws.scalars);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_sgd(void* param, const void* grad, int64_t n, float lr, float weight_decay, float grad_scale,
               cudaStream_t stream) {
  if (n == 0) return 0;
  const float decay = static_cast<float>(1.0 - static_cast<double>(lr) * weight_decay);
  sgd_kernel<T><<<grid_for(n), kThreads, 0, stream>>>(static_cast<T*>(param), static_cast<const T*>(grad), n, decay,
                                                      -lr, grad_scale, weight_decay != 0.f);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int sgd_update_cuda_launch(DType dtype, void* param, const void* grad, int64_t n, float lr, float weight_decay,
                           float grad_scale, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return launch_sgd<float>(param, grad, n, lr, weight_decay, grad_scale, stream);
    case DType::kFloat16: return launch_sgd<__half>(param, grad, n, lr, weight_decay, grad_scale, stream);
    case DType::kBFloat16: return launch_sgd<__nv_bfloat16>(param, grad, n, lr, weight_decay, grad_scale, stream);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int factored_update_cuda_launch(DType dtype, void* param, const void* grad, float* row, float* col, float* exp_avg,
                                int64_t batch, int64_t rows, int64_t cols, bool factored, FactoredScalars scalars,
                                FactoredWorkspace workspace, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return launch_factored<float>(param, grad, row, col, exp_avg, batch, rows, cols, factored, scalars, workspace,
                                    stream);
    case DType::kFloat16:
      return launch_factored<__half>(param, grad, row, col, exp_avg, batch, rows, cols, factored, scalars, workspace,
                                     stream);
    case DType::kBFloat16:
      return launch_factored<__nv_bfloat16>(param, grad, row, col, exp_avg, batch, rows, cols, factored, scalars,
                                            workspace, stream);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace lowmem
