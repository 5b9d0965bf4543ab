// Lion with an int8 blockwise-quantized momentum on CUDA: one CUDA block per quantization block.
// Raw pointers and a stream only; the binding is lion8bit_binding.cpp; specification:
// lowmem/ops/update.py (lion8bit_update_ref).
#include <cuda_runtime.h>

#include "../quant_common.h"
#include "dtype.cuh"
#include "reduce.cuh"
#include "launch.h"

namespace lowmem {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocksize = 4096;

template <typename T, typename G>
__global__ void lion8bit_kernel(T* __restrict__ param, const G* __restrict__ grad, uint8_t* __restrict__ codes,
                                float* __restrict__ absmax, const float* __restrict__ code_g, int64_t n,
                                int64_t blocksize, LionScalars a, const float* __restrict__ grad_scale_p) {
  __shared__ float code[256];
  __shared__ float mids[255];
  __shared__ float m_new[kMaxBlocksize];
  for (int i = threadIdx.x; i < 256; i += blockDim.x) code[i] = code_g[i];
  __syncthreads();
  for (int i = threadIdx.x; i < 255; i += blockDim.x) mids[i] = (code[i] + code[i + 1]) * 0.5f;
  const int64_t b = blockIdx.x, lo = b * blocksize, hi = min(lo + blocksize, n);
  const float scale_in = absmax[b];
  const float grad_scale = *grad_scale_p;
  const float decay = a.decay, one_minus_beta1 = 1.f - a.beta1, one_minus_beta2 = 1.f - a.beta2;
  float amax = 0.f;
  for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) {
    const float m = __fmul_rn(code[codes[i]], scale_in);
    const float g = __fmul_rn(to_float(grad[i]), grad_scale);
    const float c = __fadd_rn(__fmul_rn(m, a.beta1), __fmul_rn(one_minus_beta1, g));
    const float sign = static_cast<float>((c > 0.f) - (c < 0.f));
    param[i] = from_float<T>(__fadd_rn(__fmul_rn(to_float(param[i]), decay), -a.lr * sign));
    const float updated = __fadd_rn(__fmul_rn(m, a.beta2), __fmul_rn(one_minus_beta2, g));
    m_new[i - lo] = updated;
    amax = fmaxf(amax, fabsf(updated));
  }
  const float max_of_block = block_max(amax);
  if (threadIdx.x == 0) absmax[b] = max_of_block;
  const float scale = max_of_block > 0.f ? max_of_block : 1.f;
  for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) {
    codes[i] = nearest_code(__fdiv_rn(m_new[i - lo], scale), code, mids, true);
  }
}

template <typename T, typename G>
int launch(void* param, const void* grad, uint8_t* codes, float* absmax, const float* code, int64_t n,
           int64_t blocksize, LionScalars a, const float* grad_scale, cudaStream_t stream) {
  if (n == 0) return 0;
  if (blocksize > kMaxBlocksize) return static_cast<int>(cudaErrorInvalidValue);
  const int64_t n_blocks = (n + blocksize - 1) / blocksize;
  lion8bit_kernel<T, G><<<n_blocks, kThreads, 0, stream>>>(static_cast<T*>(param), static_cast<const G*>(grad), codes,
                                                           absmax, code, n, blocksize, a, grad_scale);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int lion8bit_update_cuda_launch(DType dtype, DType grad_dtype, void* param, const void* grad, uint8_t* codes,
                                float* absmax, const float* code, int64_t n, int64_t blocksize, LionScalars scalars,
                                const float* grad_scale, cudaStream_t stream) {
  return dispatch_param_grad(dtype, grad_dtype, [&](auto p, auto g) {
    return launch<typename decltype(p)::type, typename decltype(g)::type>(param, grad, codes, absmax, code, n,
                                                                          blocksize, scalars, grad_scale, stream);
  });
}

}  // namespace lowmem
