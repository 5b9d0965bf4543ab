// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011; Random123's philox4x32),
// shared by the CPU and CUDA kernels so both draw the same noise for the same (key, counter). Specification and
// known-answer test: lowmem/ops/int8_update.py (philox4x32_10, rounding_noise).
#pragma once

#include <cstdint>

#if !defined(__CUDACC__) && defined(__AVX2__)
#include <immintrin.h>
#endif

#include "quant_common.h"  // LOWMEM_HD

namespace lowmem {

LOWMEM_HD void philox_mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  hi = __umulhi(a, b);
  lo = a * b;
#else
  const uint64_t p = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
#endif
}

// The four output words for counter c under key (k0, k1), written over c.
LOWMEM_HD void philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
  for (int r = 0; r < 10; ++r) {
    if (r) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(0xD2511F53u, c[0], hi0, lo0);
    philox_mulhilo(0xCD9E8D57u, c[2], hi1, lo1);
    const uint32_t n0 = hi1 ^ c[1] ^ k0, n2 = hi0 ^ c[3] ^ k1;
    c[0] = n0;
    c[1] = lo1;
    c[2] = n2;
    c[3] = lo0;
  }
}

// The rounding noise of elements 4·group … 4·group + 3 at update `step` under `seed`: u = (word >> 8) · 2⁻²⁴.
LOWMEM_HD void rounding_noise4(uint64_t group, uint64_t seed, uint64_t step, float u[4]) {
  uint32_t c[4] = {static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32), static_cast<uint32_t>(step),
                   static_cast<uint32_t>(step >> 32)};
  philox4x32_10(c, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  for (int k = 0; k < 4; ++k) u[k] = static_cast<float>(c[k] >> 8) * 5.9604644775390625e-08f;
}

#if !defined(__CUDACC__)
#if defined(__AVX2__)
// Eight Philox counters side by side: (hi, lo) of a·x in each 32-bit lane, from the even and odd lanes' 64-bit products.
inline void philox_mulhilo8(__m256i a, __m256i x, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(x, a);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), a);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

// rounding_noise4 of groups first_group … first_group + 8·kStreams − 1 into out[32·kStreams]: kStreams independent
// vectors of eight counters go through the rounds together, so one multiply's latency hides behind the others'.
template <int kStreams>
inline void rounding_noise8(uint64_t first_group, uint64_t seed, uint64_t step, float* out) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(0xD2511F53u)), m1 = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  __m256i c0[kStreams], c1[kStreams], c2[kStreams], c3[kStreams];
  for (int v = 0; v < kStreams; ++v) {
    const uint64_t first = first_group + 8 * v;
    alignas(32) uint32_t high[8];
    for (int j = 0; j < 8; ++j) high[j] = static_cast<uint32_t>((first + j) >> 32);
    c0[v] = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(first))), lane);
    c1[v] = _mm256_load_si256(reinterpret_cast<const __m256i*>(high));
    c2[v] = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(step)));
    c3[v] = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(step >> 32)));
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    if (r) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const __m256i key0 = _mm256_set1_epi32(static_cast<int>(k0)), key1 = _mm256_set1_epi32(static_cast<int>(k1));
    for (int v = 0; v < kStreams; ++v) {
      __m256i hi0, lo0, hi1, lo1;
      philox_mulhilo8(m0, c0[v], hi0, lo0);
      philox_mulhilo8(m1, c2[v], hi1, lo1);
      c0[v] = _mm256_xor_si256(_mm256_xor_si256(hi1, c1[v]), key0);
      c2[v] = _mm256_xor_si256(_mm256_xor_si256(hi0, c3[v]), key1);
      c1[v] = lo1;
      c3[v] = lo0;
    }
  }
  const __m256 unit = _mm256_set1_ps(5.9604644775390625e-08f);
  for (int v = 0; v < kStreams; ++v) {
    const __m256 a = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(c0[v], 8)), unit);
    const __m256 b = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(c1[v], 8)), unit);
    const __m256 c = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(c2[v], 8)), unit);
    const __m256 d = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(c3[v], 8)), unit);
    // 4 words × 8 groups → group after group, each its 4 words
    const __m256 t0 = _mm256_unpacklo_ps(a, b), t1 = _mm256_unpackhi_ps(a, b);
    const __m256 t2 = _mm256_unpacklo_ps(c, d), t3 = _mm256_unpackhi_ps(c, d);
    const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    float* o = out + 32 * v;
    _mm256_storeu_ps(o, _mm256_permute2f128_ps(u0, u1, 0x20));
    _mm256_storeu_ps(o + 8, _mm256_permute2f128_ps(u2, u3, 0x20));
    _mm256_storeu_ps(o + 16, _mm256_permute2f128_ps(u0, u1, 0x31));
    _mm256_storeu_ps(o + 24, _mm256_permute2f128_ps(u2, u3, 0x31));
  }
}
#endif

// rounding_noise4 for groups first_group … first_group + n_groups − 1 into out[4·n_groups] (eight at a time with AVX2).
inline void rounding_noise_groups(uint64_t first_group, int64_t n_groups, uint64_t seed, uint64_t step, float* out) {
  int64_t j = 0;
#if defined(__AVX2__)
  for (; j + 24 <= n_groups; j += 24) rounding_noise8<3>(first_group + j, seed, step, out + 4 * j);
  for (; j + 8 <= n_groups; j += 8) rounding_noise8<1>(first_group + j, seed, step, out + 4 * j);
#endif
  for (; j < n_groups; ++j) rounding_noise4(first_group + j, seed, step, out + 4 * j);
}
#endif

}  // namespace lowmem
