// float32 / float16 / bfloat16 conversions shared by the CUDA kernels (math is always float32), and the dispatch
// over the (weight, gradient) dtype pairs they support.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "launch.h"

namespace lowmem {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

}  // namespace lowmem

namespace lowmem {

template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<param type>{}, Tag<grad type>{}) for the supported pairs: the gradient in the weight's dtype, or
// float32 for a 16-bit weight. Any other pair is cudaErrorInvalidValue (the bindings convert before calling).
template <typename F>
int dispatch_param_grad(DType dtype, DType grad_dtype, F&& f) {
  const bool float_grad = grad_dtype != dtype;
  if (float_grad && grad_dtype != DType::kFloat32) return static_cast<int>(cudaErrorInvalidValue);
  switch (dtype) {
    case DType::kFloat32: return f(Tag<float>{}, Tag<float>{});
    case DType::kFloat16: return float_grad ? f(Tag<__half>{}, Tag<float>{}) : f(Tag<__half>{}, Tag<__half>{});
    case DType::kBFloat16:
      return float_grad ? f(Tag<__nv_bfloat16>{}, Tag<float>{}) : f(Tag<__nv_bfloat16>{}, Tag<__nv_bfloat16>{});
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace lowmem
