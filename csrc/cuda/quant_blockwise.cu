// Blockwise int8 quantization: CUDA kernels against raw pointers and a stream (no torch headers, so
// this file compiles with plain nvcc on a machine whose torch has no CUDA headers).
// Specification: lowmem/ops/quant.py; the binding is quant_blockwise_binding.cpp.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../quant_common.h"
#include "dtype.cuh"
#include "reduce.cuh"
#include "launch.h"

namespace lowmem {
namespace {

constexpr int kThreads = 256;

// One CUDA block per quantization block: reduce the absmax in shared memory, then each thread maps
// its values to the nearest code by binary search over the midpoints held in shared memory.
template <typename T>
__global__ void quantize_kernel(const T* __restrict__ x, int64_t n, const float* __restrict__ code_g,
                                int64_t blocksize, bool preserve_sign, uint8_t* __restrict__ out,
                                float* __restrict__ absmax) {
  __shared__ float code[256];
  __shared__ float mids[255];
  const int64_t b = blockIdx.x;
  const int64_t lo = b * blocksize;
  const int64_t hi = min(lo + blocksize, n);
  for (int i = threadIdx.x; i < 256; i += blockDim.x) code[i] = code_g[i];
  __syncthreads();
  for (int i = threadIdx.x; i < 255; i += blockDim.x) mids[i] = (code[i] + code[i + 1]) * 0.5f;
  float amax = 0.f;
  for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) amax = fmaxf(amax, fabsf(to_float(x[i])));
  const float max_of_block = block_max(amax);
  if (threadIdx.x == 0) absmax[b] = max_of_block;
  const float scale = max_of_block > 0.f ? max_of_block : 1.f;
  for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) {
    // __fdiv_rn: IEEE division, identical to the reference even under --use_fast_math.
    out[i] = nearest_code(__fdiv_rn(to_float(x[i]), scale), code, mids, preserve_sign);
  }
}

template <typename T>
__global__ void dequantize_kernel(const uint8_t* __restrict__ codes, const float* __restrict__ absmax,
                                  const float* __restrict__ code_g, int64_t n, int64_t blocksize,
                                  T* __restrict__ out) {
  __shared__ float code[256];
  for (int i = threadIdx.x; i < 256; i += blockDim.x) code[i] = code_g[i];
  __syncthreads();
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    out[i] = from_float<T>(__fmul_rn(code[codes[i]], absmax[i / blocksize]));
  }
}

template <typename T>
int launch_quantize(const void* x, int64_t n, const float* code, int64_t blocksize, bool preserve_sign,
                    uint8_t* out, float* absmax, cudaStream_t stream) {
  const int64_t n_blocks = (n + blocksize - 1) / blocksize;
  if (n_blocks == 0) return 0;
  quantize_kernel<T><<<n_blocks, kThreads, 0, stream>>>(static_cast<const T*>(x), n, code, blocksize,
                                                        preserve_sign, out, absmax);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_dequantize(const uint8_t* codes, const float* absmax, const float* code, int64_t n, int64_t blocksize,
                      void* out, cudaStream_t stream) {
  if (n == 0) return 0;
  const int64_t needed = (n + kThreads - 1) / kThreads;
  const int64_t grid = needed < 65535 ? needed : 65535;
  dequantize_kernel<T><<<grid, kThreads, 0, stream>>>(codes, absmax, code, n, blocksize, static_cast<T*>(out));
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int quantize_blockwise_cuda_launch(DType dtype, const void* x, int64_t n, const float* code, int64_t blocksize,
                                   bool preserve_sign, uint8_t* out, float* absmax, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return launch_quantize<float>(x, n, code, blocksize, preserve_sign, out, absmax, stream);
    case DType::kFloat16: return launch_quantize<__half>(x, n, code, blocksize, preserve_sign, out, absmax, stream);
    case DType::kBFloat16:
      return launch_quantize<__nv_bfloat16>(x, n, code, blocksize, preserve_sign, out, absmax, stream);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int dequantize_blockwise_cuda_launch(DType dtype, const uint8_t* codes, const float* absmax, const float* code,
                                     int64_t n, int64_t blocksize, void* out, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return launch_dequantize<float>(codes, absmax, code, n, blocksize, out, stream);
    case DType::kFloat16: return launch_dequantize<__half>(codes, absmax, code, n, blocksize, out, stream);
    case DType::kBFloat16: return launch_dequantize<__nv_bfloat16>(codes, absmax, code, n, blocksize, out, stream);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace lowmem
