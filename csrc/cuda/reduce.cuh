// Block-wide reductions shared by the CUDA kernels (blockDim.x must be a power of two ≤ 256).
#pragma once

namespace lowmem {

// Max of v over the thread block; every thread gets the result.
__device__ __forceinline__ float block_max(float v) {
  __shared__ float partial[256];
  partial[threadIdx.x] = v;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) partial[threadIdx.x] = fmaxf(partial[threadIdx.x], partial[threadIdx.x + s]);
    __syncthreads();
  }
  const float result = partial[0];
  __syncthreads();
  return result;
}

// Sum of v over the thread block (blockDim.x a power of two ≤ 1024), in a fixed order; every thread gets it.
template <typename T>
__device__ T block_total(T v) {
  __shared__ T partial[1024];
  partial[threadIdx.x] = v;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) partial[threadIdx.x] += partial[threadIdx.x + s];
    __syncthreads();
  }
  const T total = partial[0];
  __syncthreads();
  return total;
}

}  // namespace lowmem
