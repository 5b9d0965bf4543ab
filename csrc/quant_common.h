// Code-map helpers shared by the CPU and CUDA kernels (host and device).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define LOWMEM_HD __host__ __device__ __forceinline__
#else
#define LOWMEM_HD inline
#endif

namespace lowmem {

// mids[i] = (code[i] + code[i + 1]) / 2, computed as the reference does: sum, then halve.
LOWMEM_HD void code_midpoints(const float* code, float* mids) {
  for (int i = 0; i < 255; ++i) mids[i] = (code[i] + code[i + 1]) * 0.5f;
}

// Index of the code nearest to v (v already divided by the block absmax), given the 255 midpoints of a
// sorted 256-entry map: the number of midpoints strictly below v, so a tie goes to the lower code
// (torch.searchsorted(mids, v, right=False)). With preserve_sign, a nonzero v whose code is zero or of
// the other sign steps one code towards its own side.
LOWMEM_HD uint8_t nearest_code(float v, const float* code, const float* mids, bool preserve_sign) {
  // Branchless lower bound over the 255 sorted midpoints: 8 fixed steps, no unpredictable branches,
  // so the compiler can vectorize a loop of calls (gathers) and the GPU's warps never diverge here.
  int lo = 0;
  for (int step = 128; step >= 1; step >>= 1) lo += (mids[lo + step - 1] < v) ? step : 0;
  if (preserve_sign) {
    if (v > 0.f && code[lo] <= 0.f && lo < 255) ++lo;
    else if (v < 0.f && code[lo] >= 0.f && lo > 0) --lo;
  }
  return static_cast<uint8_t>(lo);
}

}  // namespace lowmem
