// The fused int8-weight update's per-element arithmetic, shared by the CPU and CUDA kernels (host and device) so
// both round alike. Specification: lowmem/ops/int8_update.py (int8_update_ref): every operation is one float32
// rounding, in the reference's order (the kernels are built without fused multiply-adds).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "quant_common.h"  // LOWMEM_HD

namespace lowmem {

enum Int8Rule : int { kInt8Sgd = 0, kInt8Factored = 1, kInt8Lion = 2, kInt8Lion8bit = 3, kInt8Assign = 4 };

constexpr int kInt8ZeroCode = 128;
constexpr float kInt8MaxCode = 127.f;
constexpr float kInt8Headroom = static_cast<float>(1.0 + 2.0 / 127.0);

// The host-known scalars of one step, rounded to float32 once on the host as the reference rounds them.
struct Int8Scalars {
  int rule;
  float decay;   // sgd and lion: 1 − lr·wd
  float neg_lr;  // sgd and lion: −lr
  float neg_wd;  // factored: −wd (applied as θ + θ·(α·(−wd)))
  bool has_wd;
  float beta1, one_minus_beta1, beta2, one_minus_beta2;
  uint64_t seed, step;
  bool refresh, stochastic;
  int64_t blocksize, cols;
};

inline Int8Scalars int8_scalars(int64_t rule, double lr, double weight_decay, double beta1, double beta2, int64_t seed,
                                int64_t step, bool refresh, bool stochastic, int64_t blocksize, int64_t cols) {
  Int8Scalars s;
  s.rule = static_cast<int>(rule);
  s.decay = static_cast<float>(1.0 - lr * weight_decay);
  s.neg_lr = static_cast<float>(-lr);
  s.neg_wd = static_cast<float>(-weight_decay);
  s.has_wd = weight_decay != 0.0;
  s.beta1 = static_cast<float>(beta1);
  s.one_minus_beta1 = static_cast<float>(1.0 - static_cast<double>(s.beta1));
  s.beta2 = static_cast<float>(beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - static_cast<double>(s.beta2));
  s.seed = static_cast<uint64_t>(seed);
  s.step = static_cast<uint64_t>(step);
  s.refresh = refresh;
  s.stochastic = stochastic;
  s.blocksize = blocksize;
  s.cols = cols;
  return s;
}

// Entry `code` of the linear map: (code − 128) / 127.
LOWMEM_HD float int8_linear_value(int code) { return static_cast<float>(code - kInt8ZeroCode) / kInt8MaxCode; }

// SGD: θ·(1 − lr·wd) + g·(−lr).
LOWMEM_HD float int8_sgd_value(float w, float g, const Int8Scalars& s) { return w * s.decay + g * s.neg_lr; }

// The factored rules' element-wise part: u = g·(r·c), update = u / divisor · α (through the first moment m when
// there is one), θ + θ·(α·(−wd)) − update.
LOWMEM_HD float int8_factored_value(float w, float g, float r, float c, float divisor, float alpha, float* m,
                                    const Int8Scalars& s, bool write_state) {
  float update = ((g * (r * c)) / divisor) * alpha;
  if (m != nullptr) {
    const float m_new = *m * s.beta1 + update * s.one_minus_beta1;
    if (write_state) *m = m_new;
    update = m_new;
  }
  if (s.has_wd) w = w + w * (alpha * s.neg_wd);
  return w - update;
}

// Lion: c = m·β₁ + g·(1 − β₁); θ·(1 − lr·wd) + sign(c)·(−lr); the new momentum m·β₂ + g·(1 − β₂) in m_new.
LOWMEM_HD float int8_lion_value(float w, float g, float m, const Int8Scalars& s, float& m_new) {
  const float c = m * s.beta1 + g * s.one_minus_beta1;
  const float sign = static_cast<float>((c > 0.f) - (c < 0.f));
  m_new = m * s.beta2 + g * s.one_minus_beta2;
  return w * s.decay + sign * s.neg_lr;
}

// The code of v in a block of the given scale (127 / absmax, or 0): floor(v·scale + u) stochastically, else to
// nearest even, clamped to ±127 about the zero code.
LOWMEM_HD uint8_t int8_code_of(float v, float scale, float u, bool stochastic) {
  float q = v * scale;
  q = stochastic ? floorf(q + u) : rintf(q);
  q = q < -kInt8MaxCode ? -kInt8MaxCode : q;  // comparisons, not fminf/fmaxf: those are libm calls on the host
  q = q > kInt8MaxCode ? kInt8MaxCode : q;
  return static_cast<uint8_t>(static_cast<int>(q) + kInt8ZeroCode);
}

// A block's scale after its values' new maximum magnitude: at a refresh the maximum itself, else the old scale,
// grown with headroom when outgrown.
LOWMEM_HD float int8_new_absmax(float old_absmax, float block_max, bool refresh) {
  if (refresh) return block_max;
  return block_max > old_absmax ? block_max * kInt8Headroom : old_absmax;
}

LOWMEM_HD float int8_scale_of(float absmax) { return absmax > 0.f ? kInt8MaxCode / absmax : 0.f; }

// |v|'s bits: ordered as the magnitudes are (for non-NaN v), so outliers are selected by radix over them.
LOWMEM_HD uint32_t int8_magnitude_bits(float v) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint32_t>(__float_as_uint(v)) & 0x7FFFFFFFu;
#else
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return bits & 0x7FFFFFFFu;
#endif
}

}  // namespace lowmem
