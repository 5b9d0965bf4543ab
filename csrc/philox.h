// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011; Random123's philox4x32),
// shared by the CPU and CUDA kernels so both draw the same noise for the same (key, counter). Specification and
// known-answer test: lowmem/ops/int8_update.py (philox4x32_10, rounding_noise).
#pragma once

#include <cstdint>

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

}  // namespace lowmem
