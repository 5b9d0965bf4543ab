// The fused int8-weight update on CUDA: one CUDA block per weight block (blocksize ≤ 4096) dequantizes, steps the
// rule and requantizes in shared memory; the element arithmetic is int8_update_common.h and the noise philox.h,
// shared with the CPU kernel, so both write the same bits (built with --fmad=false). Raw pointers and a stream only;
// the binding is int8_update_binding.cpp; specification: lowmem/ops/int8_update.py. No host synchronization: the
// gradient scale and the step count are read on the device, and a refresh's selection (radix histograms of |θ'|'s
// bits, the threshold, per-block counts and offsets) stays in device scratch between its kernels.
#include <cuda_runtime.h>

#include "../int8_update_common.h"
#include "../philox.h"
#include "../quant_common.h"
#include "../update_common.h"
#include "factored_stats.cuh"
#include "dtype.cuh"
#include "launch.h"
#include "reduce.cuh"

namespace lowmem {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocksize = 4096;
constexpr int kScanThreads = 1024;

enum Mode : int { kStep = 0, kHistHigh = 1, kHistLow = 2, kCount = 3, kWrite = 4 };

// First position in the sorted outlier list not below `at`.
__device__ int64_t outlier_lower_bound(const int32_t* index, int64_t n, int64_t at) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (static_cast<int64_t>(index[mid]) < at) lo = mid + 1; else hi = mid;
  }
  return lo;
}

template <typename G, int kMode>
__global__ void int8_update_kernel(Int8DeviceBuffers b, const G* __restrict__ grad, Int8Scalars s,
                                   const float* __restrict__ grad_scale_p, Int8RefreshWorkspace ws) {
  __shared__ float v[kMaxBlocksize];
  __shared__ float m_new[kMaxBlocksize];
  __shared__ float code[256];
  __shared__ float mids[255];
  __shared__ int64_t range[2];
  const int64_t blk = blockIdx.x, bs = s.blocksize, lo = blk * bs;
  const int64_t len = (lo + bs < b.n ? lo + bs : b.n) - lo;
  const int tid = threadIdx.x, nt = blockDim.x;
  const float old_absmax = b.absmax[blk];
  if (tid == 0) {
    range[0] = outlier_lower_bound(b.outlier_index, b.n_outliers, lo);
    range[1] = outlier_lower_bound(b.outlier_index, b.n_outliers, lo + len);
  }
  if (s.rule == kInt8Lion8bit) {
    for (int i = tid; i < 256; i += nt) code[i] = b.state_code[i];
  }
  for (int64_t k = tid; k < len; k += nt) {
    v[k] = s.rule == kInt8Assign ? to_float(grad[lo + k]) : int8_linear_value(b.codes[lo + k]) * old_absmax;
  }
  __syncthreads();
  const int64_t olo = range[0], ohi = range[1];
  if (s.rule == kInt8Lion8bit) {
    for (int i = tid; i < 255; i += nt) mids[i] = (code[i] + code[i + 1]) * 0.5f;
  }
  if (s.rule != kInt8Assign) {
    for (int64_t j = olo + tid; j < ohi; j += nt) v[b.outlier_index[j] - lo] = b.outlier_value[j];
  }
  __syncthreads();
  const bool write_state = kMode == kStep || kMode == kWrite;
  const float gs = *grad_scale_p;
  float m_amax = 0.f;
  if (s.rule != kInt8Assign) {
    for (int64_t k = tid; k < len; k += nt) {
      const int64_t i = lo + k;
      const float g = to_float(grad[i]) * gs;
      float w = v[k];
      switch (s.rule) {
        case kInt8Sgd: w = int8_sgd_value(w, g, s); break;
        case kInt8Factored: {
          // 32-bit division: the binding refuses weights of 2³¹ values or more
          const int64_t row = static_cast<uint32_t>(i) / static_cast<uint32_t>(s.cols), col = i - row * s.cols;
          w = int8_factored_value(w, g, b.coef[row], b.coef[b.rows + col], b.coef[b.rows + s.cols],
                                  b.coef[b.rows + s.cols + 1], b.state != nullptr ? b.state + i : nullptr, s,
                                  write_state);
          break;
        }
        case kInt8Lion: {
          float m;
          w = int8_lion_value(w, g, b.state[i], s, m);
          if (write_state) b.state[i] = m;
          break;
        }
        case kInt8Lion8bit: {
          const float m = code[b.state_codes[i]] * b.state_absmax[blk];
          w = int8_lion_value(w, g, m, s, m_new[k]);
          m_amax = fmaxf(m_amax, fabsf(m_new[k]));
          break;
        }
      }
      v[k] = w;
    }
  }
  if (b.mask != nullptr) {
    for (int64_t k = tid; k < len; k += nt) v[k] = b.mask[lo + k] ? v[k] : 0.f;
  }
  if (s.rule == kInt8Lion8bit && write_state) {  // the momentum requantized as quantize_blockwise does, keeping signs
    const float amax = block_max(m_amax);
    const float divisor = amax > 0.f ? amax : 1.f;
    for (int64_t k = tid; k < len; k += nt) b.state_codes[lo + k] = nearest_code(m_new[k] / divisor, code, mids, true);
    if (tid == 0) b.state_absmax[blk] = amax;
  }
  __syncthreads();
  if (kMode == kHistHigh || kMode == kHistLow) {
    const uint32_t high = static_cast<uint32_t>(ws.selection[0]);
    for (int64_t k = tid; k < len; k += nt) {
      const uint32_t bits = int8_magnitude_bits(v[k]);
      if (kMode == kHistHigh) atomicAdd(&ws.hist[bits >> 16], 1ull);
      else if ((bits >> 16) == high) atomicAdd(&ws.hist[bits & 0xFFFFu], 1ull);
    }
    return;
  }
  if (kMode == kCount) {
    const uint32_t threshold = static_cast<uint32_t>(ws.selection[1]);
    long long above = 0, ties = 0;
    for (int64_t k = tid; k < len; k += nt) {
      const uint32_t bits = int8_magnitude_bits(v[k]);
      above += bits > threshold;
      ties += bits == threshold;
    }
    above = block_total(above);
    ties = block_total(ties);
    if (tid == 0) {
      ws.counts[blk] = above;
      ws.counts[gridDim.x + blk] = ties;
    }
    return;
  }
  if (kMode == kStep) {  // the old outliers keep their places and take their new values
    for (int64_t j = olo + tid; j < ohi; j += nt) {
      const int64_t k = b.outlier_index[j] - lo;
      b.outlier_value[j] = v[k];
      v[k] = 0.f;
    }
  } else if (tid == 0) {  // kWrite: this block's new outliers in index order, at its offset (a refresh: rare)
    const uint32_t threshold = static_cast<uint32_t>(ws.selection[1]);
    long long at = ws.offsets[blk], ties = ws.offsets[gridDim.x + blk];
    for (int64_t k = 0; k < len; ++k) {
      const uint32_t bits = int8_magnitude_bits(v[k]);
      if (bits > threshold || (bits == threshold && ties > 0)) {
        if (bits == threshold) --ties;
        ws.new_index[at] = static_cast<int32_t>(lo + k);
        ws.new_value[at] = v[k];
        ++at;
        v[k] = 0.f;
      }
    }
  }
  __syncthreads();
  float amax = 0.f;
  for (int64_t k = tid; k < len; k += nt) amax = fmaxf(amax, fabsf(v[k]));
  const float absmax = int8_new_absmax(old_absmax, block_max(amax), s.refresh);
  const float scale = int8_scale_of(absmax);
  for (int64_t k = tid; k < len; k += nt) {
    const int64_t i = lo + k;
    float u = 0.f;
    if (s.stochastic) {  // the word picked by selects, not a dynamically indexed (local-memory) array
      float words[4];
      rounding_noise4(static_cast<uint64_t>(i) >> 2, s.seed, s.step, words);
      const int lane = static_cast<int>(i & 3);
      u = lane == 0 ? words[0] : lane == 1 ? words[1] : lane == 2 ? words[2] : words[3];
    }
    b.codes[i] = int8_code_of(v[k], scale, u, s.stochastic);
  }
  if (tid == 0) b.absmax[blk] = absmax;
}

// The 16-bit digit holding the rank-th largest magnitude (rank from the top, 1-based), from a 65536-bin histogram;
// pass 0 finds the high digit, pass 1 the low one. selection: [high, threshold, count above, remaining rank].
// Clears the histogram for the next pass.
__global__ void select_digit_kernel(unsigned long long* __restrict__ hist, long long* __restrict__ selection,
                                    long long n_outliers, int pass) {
  __shared__ unsigned long long chunk[kScanThreads];
  constexpr int kPer = 65536 / kScanThreads;
  const int t = threadIdx.x;
  unsigned long long sum = 0;
  for (int d = 0; d < kPer; ++d) sum += hist[t * kPer + d];
  chunk[t] = sum;
  __syncthreads();
  if (t == 0) {
    long long rank = pass == 0 ? n_outliers : selection[3];
    long long above = 0;
    int digit = 0;
    for (int c = kScanThreads - 1; c >= 0; --c) {
      if (static_cast<long long>(chunk[c]) >= rank) {
        for (int d = c * kPer + kPer - 1; d >= c * kPer; --d) {
          if (static_cast<long long>(hist[d]) >= rank) {
            digit = d;
            break;
          }
          rank -= static_cast<long long>(hist[d]);
          above += static_cast<long long>(hist[d]);
        }
        break;
      }
      rank -= static_cast<long long>(chunk[c]);
      above += static_cast<long long>(chunk[c]);
    }
    if (pass == 0) {
      selection[0] = digit;
      selection[2] = above;
    } else {
      selection[1] = (selection[0] << 16) | digit;
      selection[2] += above;
    }
    selection[3] = rank;
  }
  __syncthreads();
  for (int d = 0; d < kPer; ++d) hist[t * kPer + d] = 0;
}

// offsets[b] = Σ_{c<b} above[c] + min(Σ_{c<b} ties[c], quota) and ties_taken[b] = min(ties[b], max(0, quota −
// Σ_{c<b} ties[c])), quota = n_outliers − above in all: ties at the threshold go to the lowest indices.
__global__ void outlier_offsets_kernel(const long long* __restrict__ counts, long long* __restrict__ offsets,
                                       const long long* __restrict__ selection, int64_t n_blocks, long long n_outliers) {
  __shared__ long long above_sum[kScanThreads], ties_sum[kScanThreads];
  const int t = threadIdx.x;
  const int64_t per = (n_blocks + kScanThreads - 1) / kScanThreads;
  const int64_t first = t * per, last = first + per < n_blocks ? first + per : n_blocks;
  long long a = 0, ti = 0;
  for (int64_t blk = first; blk < last; ++blk) {
    a += counts[blk];
    ti += counts[n_blocks + blk];
  }
  above_sum[t] = a;
  ties_sum[t] = ti;
  __syncthreads();
  if (t == 0) {
    long long ra = 0, rt = 0;
    for (int c = 0; c < kScanThreads; ++c) {
      const long long na = ra + above_sum[c], nt = rt + ties_sum[c];
      above_sum[c] = ra;
      ties_sum[c] = rt;
      ra = na;
      rt = nt;
    }
  }
  __syncthreads();
  const long long quota = n_outliers - selection[2];
  long long before_above = above_sum[t], before_ties = ties_sum[t];
  for (int64_t blk = first; blk < last; ++blk) {
    const long long ties = counts[n_blocks + blk];
    const long long left = quota - before_ties > 0 ? quota - before_ties : 0;
    offsets[blk] = before_above + (before_ties < quota ? before_ties : quota);
    offsets[n_blocks + blk] = ties < left ? ties : left;
    before_above += counts[blk];
    before_ties += ties;
  }
}

template <typename G, int kMode>
int launch_pass(const Int8DeviceBuffers& b, const void* grad, const Int8Scalars& s, const float* grad_scale,
                const Int8RefreshWorkspace& ws, int64_t n_blocks, cudaStream_t stream) {
  int8_update_kernel<G, kMode><<<n_blocks, kThreads, 0, stream>>>(b, static_cast<const G*>(grad), s, grad_scale, ws);
  return static_cast<int>(cudaGetLastError());
}

template <typename G>
int launch_update(const Int8DeviceBuffers& b, const void* grad, const Int8Scalars& s, const float* grad_scale,
                  const Int8RefreshWorkspace& ws, cudaStream_t stream) {
  const int64_t n_blocks = (b.n + s.blocksize - 1) / s.blocksize;
  if (!s.refresh || b.n_outliers == 0) return launch_pass<G, kStep>(b, grad, s, grad_scale, ws, n_blocks, stream);
  int err = static_cast<int>(cudaMemsetAsync(ws.hist, 0, sizeof(unsigned long long) * 65536, stream));
  if (err == 0) err = launch_pass<G, kHistHigh>(b, grad, s, grad_scale, ws, n_blocks, stream);
  if (err == 0) select_digit_kernel<<<1, kScanThreads, 0, stream>>>(ws.hist, ws.selection, b.n_outliers, 0);
  if (err == 0) err = launch_pass<G, kHistLow>(b, grad, s, grad_scale, ws, n_blocks, stream);
  if (err == 0) select_digit_kernel<<<1, kScanThreads, 0, stream>>>(ws.hist, ws.selection, b.n_outliers, 1);
  if (err == 0) err = launch_pass<G, kCount>(b, grad, s, grad_scale, ws, n_blocks, stream);
  if (err == 0) outlier_offsets_kernel<<<1, kScanThreads, 0, stream>>>(ws.counts, ws.offsets, ws.selection, n_blocks,
                                                                       b.n_outliers);
  if (err == 0) err = launch_pass<G, kWrite>(b, grad, s, grad_scale, ws, n_blocks, stream);
  if (err == 0)
    err = static_cast<int>(cudaMemcpyAsync(b.outlier_index, ws.new_index, sizeof(int32_t) * b.n_outliers,
                                           cudaMemcpyDeviceToDevice, stream));
  if (err == 0)
    err = static_cast<int>(cudaMemcpyAsync(b.outlier_value, ws.new_value, sizeof(float) * b.n_outliers,
                                           cudaMemcpyDeviceToDevice, stream));
  return err == 0 ? static_cast<int>(cudaGetLastError()) : err;
}

// -- the factored rules' reductions ----------------------------------------------------------------------------

// One block per row: the row's mean of (s·g)², plus eps1, into its statistic.
template <typename G>
__global__ void prepare_rows_kernel(const G* __restrict__ grad, float* __restrict__ row, int64_t cols, FactoredScalars a,
                                    const float* __restrict__ step, const float* __restrict__ grad_scale_p) {
  const int64_t i = blockIdx.x;
  const float gs = *grad_scale_p;
  double sq = 0.0;
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
    const float g = to_float(grad[i * cols + j]) * gs;
    sq += static_cast<double>(g * g);
  }
  const double total = block_total(sq);
  if (threadIdx.x == 0) {
    const float beta2t = step_scalars(step, a).beta2t;
    row[i] = row[i] * beta2t + (1.f - beta2t) * static_cast<float>(total / cols + a.eps1);
  }
}

// One block: r_i = 1 / √(row_i / mean(row)) and c_j = 1 / √col_j into out.
__global__ void prepare_factors_kernel(const float* __restrict__ row, const float* __restrict__ col,
                                       float* __restrict__ out, int64_t rows, int64_t cols) {
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < rows; i += blockDim.x) s += row[i];
  const float mean = static_cast<float>(block_total(s) / rows);
  for (int64_t i = threadIdx.x; i < rows; i += blockDim.x) out[i] = 1.f / sqrtf(row[i] / mean);
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) out[rows + j] = 1.f / sqrtf(col[j]);
}

// One block per row: Σ_j u², u = (s·g)·(r_i·c_j).
template <typename G>
__global__ void prepare_update_sq_kernel(const G* __restrict__ grad, const float* __restrict__ out,
                                         double* __restrict__ row_partial, int64_t rows, int64_t cols,
                                         const float* __restrict__ grad_scale_p) {
  const int64_t i = blockIdx.x;
  const float gs = *grad_scale_p, r = out[i];
  double sum = 0.0;
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
    const float u = (to_float(grad[i * cols + j]) * gs) * (r * out[rows + j]);
    sum += static_cast<double>(u) * u;
  }
  const double total = block_total(sum);
  if (threadIdx.x == 0) row_partial[i] = total;
}

// One block per weight block: Σθ² of its dense part (an outlier's own code is the zero code).
__global__ void prepare_weight_sq_kernel(const uint8_t* __restrict__ codes, const float* __restrict__ absmax,
                                         double* __restrict__ block_sq, int64_t n, int64_t blocksize) {
  const int64_t blk = blockIdx.x, lo = blk * blocksize, hi = lo + blocksize < n ? lo + blocksize : n;
  double sum = 0.0;
  for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) {
    const double q = int8_linear_value(codes[i]);
    sum += q * q;
  }
  const double total = block_total(sum);
  if (threadIdx.x == 0) block_sq[blk] = total * static_cast<double>(absmax[blk]) * absmax[blk];
}

// One block: the clip divisor max(1, RMS(u) / d) and α = ρ·max(ε₂, RMS(θ)) (or ρ).
__global__ void prepare_finish_kernel(const double* __restrict__ row_partial, const double* __restrict__ block_sq,
                                      const float* __restrict__ outlier_value, float* __restrict__ out, int64_t rows,
                                      int64_t cols, int64_t n_blocks, int64_t n_outliers, FactoredScalars a,
                                      const float* __restrict__ step) {
  double u2 = 0.0, w2 = 0.0;
  for (int64_t i = threadIdx.x; i < rows; i += blockDim.x) u2 += row_partial[i];
  for (int64_t blk = threadIdx.x; blk < n_blocks; blk += blockDim.x) w2 += block_sq[blk];
  for (int64_t j = threadIdx.x; j < n_outliers; j += blockDim.x) {
    const double o = outlier_value[j];
    w2 += o * o;
  }
  const double sum_u2 = block_total(u2), sum_sq = block_total(w2);
  if (threadIdx.x == 0) {
    const double n = static_cast<double>(rows) * cols;
    const double rho = step_scalars(step, a).rho;
    const double alpha = a.scale_parameter ? rho * fmax(static_cast<double>(a.eps2), sqrt(sum_sq / n)) : rho;
    out[rows + cols] = static_cast<float>(fmax(1.0, sqrt(sum_u2 / n) / a.clip_threshold));
    out[rows + cols + 1] = static_cast<float>(alpha);
  }
}

template <typename G>
int launch_prepare(const void* grad_v, const uint8_t* codes, const float* absmax, const float* outlier_value,
                   int64_t n_outliers, float* row, float* col, int64_t rows, int64_t cols, int64_t blocksize,
                   FactoredScalars a, const float* step, const float* grad_scale, Int8PrepareWorkspace ws, float* out,
                   cudaStream_t stream) {
  const G* grad = static_cast<const G*>(grad_v);
  const int64_t n = rows * cols, n_blocks = (n + blocksize - 1) / blocksize;
  const int64_t chunks = int8_prepare_col_chunks(rows), rows_per_chunk = (rows + chunks - 1) / chunks;
  prepare_rows_kernel<G><<<rows, kThreads, 0, stream>>>(grad, row, cols, a, step, grad_scale);
  const dim3 col_grid((cols + kColTile - 1) / kColTile, chunks), col_block(kColTile, kColRows);
  col_partial_kernel<G><<<col_grid, col_block, 0, stream>>>(grad, nullptr, ws.col_partial, 1, rows, cols, col_grid.x,
                                                            rows_per_chunk, grad_scale);
  col_finish_kernel<<<(cols + kThreads - 1) / kThreads, kThreads, 0, stream>>>(ws.col_partial, col, 1, rows, cols,
                                                                              chunks, a, step);
  prepare_factors_kernel<<<1, kThreads, 0, stream>>>(row, col, out, rows, cols);
  prepare_update_sq_kernel<G><<<rows, kThreads, 0, stream>>>(grad, out, ws.row_partial, rows, cols, grad_scale);
  prepare_weight_sq_kernel<<<n_blocks, kThreads, 0, stream>>>(codes, absmax, ws.block_sq, n, blocksize);
  prepare_finish_kernel<<<1, kThreads, 0, stream>>>(ws.row_partial, ws.block_sq, outlier_value, out, rows, cols,
                                                    n_blocks, n_outliers, a, step);
  return static_cast<int>(cudaGetLastError());
}

template <typename F>
int dispatch_grad(DType grad_dtype, F&& f) {
  switch (grad_dtype) {
    case DType::kFloat32: return f(Tag<float>{});
    case DType::kFloat16: return f(Tag<__half>{});
    case DType::kBFloat16: return f(Tag<__nv_bfloat16>{});
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace

int int8_update_cuda_launch(DType grad_dtype, const void* grad, Int8DeviceBuffers buffers, Int8Scalars scalars,
                            const float* grad_scale, Int8RefreshWorkspace workspace, cudaStream_t stream) {
  if (buffers.n == 0) return 0;
  if (scalars.blocksize > kMaxBlocksize) return static_cast<int>(cudaErrorInvalidValue);
  return dispatch_grad(grad_dtype, [&](auto g) {
    return launch_update<typename decltype(g)::type>(buffers, grad, scalars, grad_scale, workspace, stream);
  });
}

int int8_factored_prepare_cuda_launch(DType grad_dtype, const void* grad, const uint8_t* codes, const float* absmax,
                                      const float* outlier_value, int64_t n_outliers, float* row, float* col,
                                      int64_t rows, int64_t cols, int64_t blocksize, FactoredScalars scalars,
                                      const float* step, const float* grad_scale, Int8PrepareWorkspace workspace,
                                      float* out, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return 0;
  return dispatch_grad(grad_dtype, [&](auto g) {
    return launch_prepare<typename decltype(g)::type>(grad, codes, absmax, outlier_value, n_outliers, row, col, rows,
                                                      cols, blocksize, scalars, step, grad_scale, workspace, out, stream);
  });
}

}  // namespace lowmem
