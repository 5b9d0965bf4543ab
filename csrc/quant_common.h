// Code-map helpers shared by the CPU and CUDA kernels (host and device).
#pragma once

#include <cstdint>
#include <cstring>
#include <memory>

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

// CPU fast path with the same result as nearest_code: the float's top 13 bits (sign, exponent, 4 mantissa
// bits) pick a bucket, a contiguous interval of floats; first[k] midpoints lie below the whole bucket and
// all from last[k] on lie above it, so only the one or two midpoints inside the bucket are compared.
// That replaces a chain of 8 dependent loads per value by one table load and a short scan.
struct CodeLut {
  static constexpr int kShift = 19;
  static constexpr int kBuckets = 1 << (32 - kShift);
  float code[256];
  float mids[255];
  uint8_t first[kBuckets];
  uint8_t last[kBuckets];

  explicit CodeLut(const float* code_in) {
    for (int i = 0; i < 256; ++i) code[i] = code_in[i];
    code_midpoints(code, mids);
    for (uint32_t k = 0; k < static_cast<uint32_t>(kBuckets); ++k) {
      const uint32_t exponent = (k >> (23 - kShift)) & 0xFF;
      if (exponent == 0xFF) {  // inf and NaN: scan everything, as the plain search would
        first[k] = 0;
        last[k] = 255;
        continue;
      }
      const float a = from_bits(k << kShift), b = from_bits((k << kShift) | ((1u << kShift) - 1));
      const float lower = a < b ? a : b, upper = a < b ? b : a;
      first[k] = static_cast<uint8_t>(count_mids(lower, false));
      last[k] = static_cast<uint8_t>(count_mids(upper, true));
    }
  }

  // Number of midpoints < v (or <= v with inclusive).
  int count_mids(float v, bool inclusive) const {
    int lo = 0, hi = 255;
    while (lo < hi) {
      const int mid = (lo + hi) >> 1;
      if (mids[mid] < v || (inclusive && mids[mid] == v)) lo = mid + 1; else hi = mid;
    }
    return lo;
  }

  static float from_bits(uint32_t bits) {
    float v;
    std::memcpy(&v, &bits, sizeof v);
    return v;
  }

  uint8_t nearest(float v, bool preserve_sign) const {
    uint32_t bits;
    std::memcpy(&bits, &v, sizeof bits);
    const uint32_t k = bits >> kShift;
    int lo = first[k];
    const int hi = last[k];
    while (lo < hi && mids[lo] < v) ++lo;
    if (preserve_sign) {
      if (v > 0.f && code[lo] <= 0.f && lo < 255) ++lo;
      else if (v < 0.f && code[lo] >= 0.f && lo > 0) --lo;
    }
    return static_cast<uint8_t>(lo);
  }
};

#if !defined(__CUDACC__)
// The table for a code map, rebuilt only when the map changes (callers pass the same map every step).
inline const CodeLut& lut_for(const float* code) {
  thread_local std::unique_ptr<CodeLut> cached;
  if (!cached || std::memcmp(cached->code, code, sizeof(cached->code)) != 0) cached = std::make_unique<CodeLut>(code);
  return *cached;
}

#endif

}  // namespace lowmem
