// The fused int8-weight update on CPU: dequantize → rule → requantize one block of the weight at a time, so no
// float copy of the matrix exists. Specification: lowmem/ops/int8_update.py; the element arithmetic is
// int8_update_common.h, shared with the CUDA kernel, and equals the reference bit for bit.
//
// Passes over the weight (each reads the codes, the gradient and the rule's state once):
//   an ordinary step:  1 (dequantize, rule, new block scale, stochastic codes, state written);
//   a refresh:         4 (two radix-histogram passes over |θ'|'s bits find the n_outliers-th largest magnitude T,
//                      a third counts per block the values above T and equal to it, the fourth writes), with the
//                      rule's state written only in the last, so the earlier passes recompute the same θ'.
// Memory beyond the buffers: one block of floats per thread, and at a refresh 2 × 65536 counters per thread,
// two counts per block and a new outlier list.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <vector>

#include "../int8_update_common.h"
#include "../philox.h"
#include "../quant_common.h"
#include "../torch_utils.h"
#include "../update_common.h"
#include "factored_stats.h"

namespace lowmem {
namespace {

enum class Pass { kHistHigh, kHistLow, kCount, kWrite };

struct Int8Buffers {
  uint8_t* codes;
  float* absmax;
  int32_t* outlier_index;
  float* outlier_value;
  int64_t n, n_outliers;
  const bool* mask;       // or null
  float* state;           // sgd: null; factored: first moment or null; lion: momentum
  uint8_t* state_codes;   // lion8bit: momentum codes
  float* state_absmax;    // lion8bit: momentum absmax per block
  const float* state_code;  // lion8bit: the momentum's 256-entry map
  const float* coef;      // factored: r (rows), c (cols), divisor, alpha
  int64_t rows;
  float grad_scale;
};

// What a refresh's passes hand to the next.
struct Selection {
  uint32_t high = 0, threshold = 0;  // T's top 16 bits, then T
  int64_t above = 0;                 // values with bits > T
  std::vector<int64_t> above_in_block, ties_in_block, offset, ties_taken;
  std::vector<int32_t> new_index;
  std::vector<float> new_value;
};

template <typename g_t>
class BlockUpdater {
 public:
  BlockUpdater(const Int8Buffers& b, const g_t* grad, const Int8Scalars& s) : b_(b), grad_(grad), s_(s) {
    if (s.rule == kInt8Lion8bit) lut_ = std::make_unique<CodeLut>(b.state_code);  // once per step, not per block
  }

  // θ' of block `blk` into v (blocksize floats) and its old-outlier range [olo, ohi); writes the rule's state when
  // write_state.
  void values(int64_t blk, float* v, int64_t& olo, int64_t& ohi, bool write_state, float* m_new) const {
    const int64_t bs = s_.blocksize, lo = blk * bs, hi = std::min(lo + bs, b_.n), len = hi - lo;
    const int32_t* first = b_.outlier_index;
    const int32_t* last = b_.outlier_index + b_.n_outliers;
    olo = std::lower_bound(first, last, static_cast<int32_t>(lo)) - first;
    ohi = std::lower_bound(first + olo, last, static_cast<int64_t>(hi) > INT32_MAX ? INT32_MAX : static_cast<int32_t>(hi)) - first;
    if (s_.rule == kInt8Assign) {
      for (int64_t k = 0; k < len; ++k) v[k] = static_cast<float>(grad_[lo + k]);
    } else {
      const float scale = b_.absmax[blk];
      const uint8_t* codes = b_.codes + lo;
#pragma omp simd
      for (int64_t k = 0; k < len; ++k) v[k] = int8_linear_value(codes[k]) * scale;
      for (int64_t j = olo; j < ohi; ++j) v[b_.outlier_index[j] - lo] = b_.outlier_value[j];
      const float gs = b_.grad_scale;
      switch (s_.rule) {
        case kInt8Sgd:
#pragma omp simd
          for (int64_t k = 0; k < len; ++k) v[k] = int8_sgd_value(v[k], static_cast<float>(grad_[lo + k]) * gs, s_);
          break;
        case kInt8Factored: {  // by runs of one row, so no element divides its index by the row length
          const float* c = b_.coef + b_.rows;
          const float divisor = b_.coef[b_.rows + s_.cols], alpha = b_.coef[b_.rows + s_.cols + 1];
          for (int64_t k = 0; k < len;) {
            const int64_t row = (lo + k) / s_.cols, col0 = lo + k - row * s_.cols;
            const int64_t run = std::min(len - k, s_.cols - col0);
            const float r = b_.coef[row];
            const float* cc = c + col0;
            const g_t* gg = grad_ + lo + k;
            float* vv = v + k;
            if (b_.state == nullptr) {
#pragma omp simd
              for (int64_t j = 0; j < run; ++j)
                vv[j] = int8_factored_value(vv[j], static_cast<float>(gg[j]) * gs, r, cc[j], divisor, alpha, nullptr, s_,
                                            false);
            } else {
              float* m = b_.state + lo + k;
              for (int64_t j = 0; j < run; ++j)
                vv[j] = int8_factored_value(vv[j], static_cast<float>(gg[j]) * gs, r, cc[j], divisor, alpha, m + j, s_,
                                            write_state);
            }
            k += run;
          }
          break;
        }
        case kInt8Lion: {
          float* m = b_.state + lo;
          if (write_state) {
#pragma omp simd
            for (int64_t k = 0; k < len; ++k) v[k] = int8_lion_value(v[k], static_cast<float>(grad_[lo + k]) * gs, m[k], s_, m[k]);
          } else {
#pragma omp simd
            for (int64_t k = 0; k < len; ++k) v[k] = int8_lion_value(v[k], static_cast<float>(grad_[lo + k]) * gs, m[k], s_, m_new[k]);
          }
          break;
        }
        case kInt8Lion8bit: {
          const float m_scale = b_.state_absmax[blk];
          float amax = 0.f;
          for (int64_t k = 0; k < len; ++k) {
            const float m = b_.state_code[b_.state_codes[lo + k]] * m_scale;
            v[k] = int8_lion_value(v[k], static_cast<float>(grad_[lo + k]) * gs, m, s_, m_new[k]);
            amax = std::max(amax, std::fabs(m_new[k]));
          }
          if (write_state) {  // requantized to the nearest code keeping the sign, as quantize_blockwise does
            b_.state_absmax[blk] = amax;
            const float divisor = amax > 0.f ? amax : 1.f;
            for (int64_t k = 0; k < len; ++k) b_.state_codes[lo + k] = lut_->nearest(m_new[k] / divisor, true);
          }
          break;
        }
      }
    }
    if (b_.mask != nullptr) {
      const bool* mask = b_.mask + lo;
#pragma omp simd
      for (int64_t k = 0; k < len; ++k) v[k] = mask[k] ? v[k] : 0.f;
    }
  }

  // The stochastic codes and new scale of a block whose outliers are already zeroed in v; noise: scratch for
  // blocksize + 8 floats.
  void store(int64_t blk, const float* v, float* noise) const {
    const int64_t bs = s_.blocksize, lo = blk * bs, len = std::min(lo + bs, b_.n) - lo;
    float block_max = 0.f;
#pragma omp simd reduction(max : block_max)
    for (int64_t k = 0; k < len; ++k) block_max = std::max(block_max, std::fabs(v[k]));
    const float absmax = int8_new_absmax(b_.absmax[blk], block_max, s_.refresh);
    b_.absmax[blk] = absmax;
    const float scale = int8_scale_of(absmax);
    uint8_t* codes = b_.codes + lo;
    if (!s_.stochastic) {
#pragma omp simd
      for (int64_t k = 0; k < len; ++k) codes[k] = int8_code_of(v[k], scale, 0.f, false);
      return;
    }
    const uint64_t first_group = static_cast<uint64_t>(lo) >> 2;
    const int64_t n_groups = static_cast<int64_t>(((static_cast<uint64_t>(lo + len - 1)) >> 2) - first_group + 1);
    rounding_noise_groups(first_group, n_groups, s_.seed, s_.step, noise);
    const float* u = noise + (lo - static_cast<int64_t>(first_group * 4));
#pragma omp simd
    for (int64_t k = 0; k < len; ++k) codes[k] = int8_code_of(v[k], scale, u[k], true);
  }

 private:
  const Int8Buffers& b_;
  const g_t* grad_;
  const Int8Scalars& s_;
  std::unique_ptr<CodeLut> lut_;
};

// Runs body(blk, v, m_new, noise) over every block in parallel, with one block of scratch per worker.
template <typename Body>
void for_blocks(int64_t n_blocks, int64_t blocksize, Body body) {
  at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> v(blocksize), m_new(blocksize), noise(blocksize + 8);
    for (int64_t blk = begin; blk < end; ++blk) body(blk, v.data(), m_new.data(), noise.data());
  });
}

// The 16-bit digit of magnitude bits at or below which the k-th largest lies, counting from the top bin; k is
// turned into the rank within that bin.
uint32_t digit_of_rank(const std::vector<int64_t>& hist, int64_t& k, int64_t& above) {
  for (int64_t d = 65535; d >= 0; --d) {
    if (hist[d] >= k) return static_cast<uint32_t>(d);
    k -= hist[d];
    above += hist[d];
  }
  return 0;
}

template <typename g_t>
void int8_update_impl(const Int8Buffers& b, const g_t* grad, const Int8Scalars& s) {
  const int64_t bs = s.blocksize, n_blocks = (b.n + bs - 1) / bs;
  BlockUpdater<g_t> up(b, grad, s);
  if (!s.refresh || b.n_outliers == 0) {
    for_blocks(n_blocks, bs, [&](int64_t blk, float* v, float* m_new, float* noise) {
      int64_t olo, ohi;
      up.values(blk, v, olo, ohi, true, m_new);
      const int64_t lo = blk * bs;
      for (int64_t j = olo; j < ohi; ++j) {  // this block's outliers only: no other worker touches them
        b.outlier_value[j] = v[b.outlier_index[j] - lo];
        v[b.outlier_index[j] - lo] = 0.f;
      }
      up.store(blk, v, noise);
    });
    return;
  }
  // A refresh: the n_outliers largest |θ'| (ties to the lower index) become the outliers.
  const int n_threads = at::get_num_threads();
  Selection sel;
  int64_t rank = b.n_outliers;
  for (const Pass pass : {Pass::kHistHigh, Pass::kHistLow}) {
    std::vector<int64_t> hist(static_cast<size_t>(n_threads) * 65536, 0);
    for_blocks(n_blocks, bs, [&](int64_t blk, float* v, float* m_new, float* noise) {
      int64_t olo, ohi;
      up.values(blk, v, olo, ohi, false, m_new);
      int64_t* mine = hist.data() + static_cast<size_t>(at::get_thread_num()) * 65536;
      const int64_t len = std::min(blk * bs + bs, b.n) - blk * bs;
      for (int64_t k = 0; k < len; ++k) {
        const uint32_t bits = int8_magnitude_bits(v[k]);
        if (pass == Pass::kHistHigh) ++mine[bits >> 16];
        else if ((bits >> 16) == sel.high) ++mine[bits & 0xFFFF];
      }
    });
    std::vector<int64_t> total(65536, 0);
    for (int t = 0; t < n_threads; ++t)
      for (int d = 0; d < 65536; ++d) total[d] += hist[static_cast<size_t>(t) * 65536 + d];
    const uint32_t digit = digit_of_rank(total, rank, sel.above);
    if (pass == Pass::kHistHigh) sel.high = digit;
    else sel.threshold = (sel.high << 16) | digit;
  }
  sel.above_in_block.assign(n_blocks, 0);
  sel.ties_in_block.assign(n_blocks, 0);
  for_blocks(n_blocks, bs, [&](int64_t blk, float* v, float* m_new, float* noise) {
    int64_t olo, ohi, above = 0, ties = 0;
    up.values(blk, v, olo, ohi, false, m_new);
    const int64_t len = std::min(blk * bs + bs, b.n) - blk * bs;
    for (int64_t k = 0; k < len; ++k) {
      const uint32_t bits = int8_magnitude_bits(v[k]);
      above += bits > sel.threshold;
      ties += bits == sel.threshold;
    }
    sel.above_in_block[blk] = above;
    sel.ties_in_block[blk] = ties;
  });
  // Ties at T fill the remaining places in index order; each block's first new outlier goes at its offset.
  sel.offset.assign(n_blocks, 0);
  sel.ties_taken.assign(n_blocks, 0);
  int64_t ties_left = b.n_outliers - sel.above, placed = 0;
  for (int64_t blk = 0; blk < n_blocks; ++blk) {
    sel.ties_taken[blk] = std::min(ties_left, sel.ties_in_block[blk]);
    ties_left -= sel.ties_taken[blk];
    sel.offset[blk] = placed;
    placed += sel.above_in_block[blk] + sel.ties_taken[blk];
  }
  sel.new_index.assign(b.n_outliers, 0);
  sel.new_value.assign(b.n_outliers, 0.f);
  for_blocks(n_blocks, bs, [&](int64_t blk, float* v, float* m_new, float* noise) {
    int64_t olo, ohi;
    up.values(blk, v, olo, ohi, true, m_new);
    const int64_t lo = blk * bs, len = std::min(lo + bs, b.n) - lo;
    int64_t at = sel.offset[blk], ties = sel.ties_taken[blk];
    for (int64_t k = 0; k < len; ++k) {
      const uint32_t bits = int8_magnitude_bits(v[k]);
      if (bits > sel.threshold || (bits == sel.threshold && ties > 0)) {
        if (bits == sel.threshold) --ties;
        sel.new_index[at] = static_cast<int32_t>(lo + k);
        sel.new_value[at] = v[k];
        ++at;
        v[k] = 0.f;
      }
    }
    up.store(blk, v, noise);
  });
  std::memcpy(b.outlier_index, sel.new_index.data(), sizeof(int32_t) * b.n_outliers);
  std::memcpy(b.outlier_value, sel.new_value.data(), sizeof(float) * b.n_outliers);
}

void int8_update_cpu(at::Tensor codes, at::Tensor absmax, at::Tensor outlier_index, at::Tensor outlier_value,
                     const at::Tensor& grad_in, const at::Tensor& mask, at::Tensor state, at::Tensor state_absmax,
                     const at::Tensor& state_code, const at::Tensor& coef, const at::Tensor& grad_scale_t, int64_t rule,
                     double lr, double weight_decay, double beta1, double beta2, int64_t seed, int64_t step,
                     bool refresh, bool stochastic, int64_t blocksize) {
  const Int8Shape shape = check_int8_update_args(codes, absmax, outlier_index, outlier_value, grad_in, mask, state,
                                                 state_absmax, state_code, coef, rule, blocksize);
  const float grad_scale = host_scalar(grad_scale_t, codes, "int8_update_", "grad_scale");
  const at::Tensor grad = grad_in.contiguous();
  Int8Buffers b{codes.data_ptr<uint8_t>(), absmax.data_ptr<float>(), outlier_index.data_ptr<int32_t>(),
                outlier_value.data_ptr<float>(), codes.numel(), outlier_index.numel(),
                mask.numel() ? mask.data_ptr<bool>() : nullptr,
                (rule == kInt8Lion8bit || state.numel() == 0) ? nullptr : state.data_ptr<float>(),
                rule == kInt8Lion8bit ? state.data_ptr<uint8_t>() : nullptr,
                rule == kInt8Lion8bit ? state_absmax.data_ptr<float>() : nullptr,
                rule == kInt8Lion8bit ? state_code.data_ptr<float>() : nullptr,
                rule == kInt8Factored ? coef.data_ptr<float>() : nullptr, shape.rows, grad_scale};
  const Int8Scalars s = int8_scalars(rule, lr, weight_decay, beta1, beta2, seed, step, refresh, stochastic, blocksize,
                                     shape.cols);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "int8_update_cpu", [&] {
    int8_update_impl<scalar_t>(b, grad.data_ptr<scalar_t>(), s);
  });
}

// The factored rules' reductions: pass 1 over the gradient (row sums and, per worker, column sums, in double),
// pass 2 over it again (Σu², u = g·r·c), one pass over the codes and outliers (Σθ²).
template <typename g_t>
void factored_prepare_impl(const uint8_t* codes, const float* absmax, const float* outlier_value, int64_t n_outliers,
                           const g_t* grad, float* row, float* col, int64_t rows, int64_t cols, int64_t blocksize,
                           float grad_scale, FactoredStep t, float eps1, double clip_threshold, double eps2,
                           bool scale_parameter, float* out) {
  const int64_t n = rows * cols;
  float* r = out;
  float* c = out + rows;
  factored_statistics(GradRows<g_t>(grad, nullptr, cols), row, col, 1, rows, cols, grad_scale, eps1, t.beta2t, r, c);
  const double sum_u2 = at::parallel_reduce(0, rows, 1, 0.0, [&](int64_t begin, int64_t end, double acc) {
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t j = 0; j < cols; ++j) {
        const float u = (static_cast<float>(grad[i * cols + j]) * grad_scale) * (r[i] * c[j]);
        acc += static_cast<double>(u) * u;
      }
    }
    return acc;
  }, std::plus<double>());
  out[rows + cols] = static_cast<float>(std::max(1.0, std::sqrt(sum_u2 / n) / clip_threshold));
  double alpha = t.rho;
  if (scale_parameter) {
    double code_sq[256];
    for (int k = 0; k < 256; ++k) code_sq[k] = static_cast<double>(int8_linear_value(k)) * int8_linear_value(k);
    const int64_t n_blocks = (n + blocksize - 1) / blocksize;
    double sum_sq = at::parallel_reduce(0, n_blocks, 16, 0.0, [&](int64_t begin, int64_t end, double acc) {
      for (int64_t blk = begin; blk < end; ++blk) {
        double block = 0.0;
        for (int64_t i = blk * blocksize; i < std::min(n, blk * blocksize + blocksize); ++i) block += code_sq[codes[i]];
        const double a = absmax[blk];
        acc += block * a * a;
      }
      return acc;
    }, std::plus<double>());
    for (int64_t j = 0; j < n_outliers; ++j) sum_sq += static_cast<double>(outlier_value[j]) * outlier_value[j];
    alpha = t.rho * std::max(eps2, std::sqrt(sum_sq / n));
  }
  out[rows + cols + 1] = static_cast<float>(alpha);
}

at::Tensor int8_factored_prepare_cpu(const at::Tensor& codes, const at::Tensor& absmax, const at::Tensor& outlier_value,
                                     const at::Tensor& grad_in, at::Tensor row, at::Tensor col, const at::Tensor& step_t,
                                     const at::Tensor& grad_scale_t, double lr, bool relative_step, double decay_rate,
                                     double eps1, double clip_threshold, double eps2, bool scale_parameter,
                                     int64_t blocksize) {
  check_int8_prepare_args(codes, absmax, outlier_value, grad_in, row, col, blocksize);
  const int64_t rows = grad_in.size(0), cols = grad_in.size(1);
  const double step = host_scalar(step_t, codes, "int8_factored_prepare", "step");
  const float grad_scale = host_scalar(grad_scale_t, codes, "int8_factored_prepare", "grad_scale");
  const FactoredStep t = factored_step(step, lr, relative_step, decay_rate);
  const at::Tensor grad = grad_in.contiguous();
  at::Tensor out = at::empty({rows + cols + 2}, codes.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "int8_factored_prepare_cpu", [&] {
    factored_prepare_impl<scalar_t>(codes.data_ptr<uint8_t>(), absmax.data_ptr<float>(), outlier_value.data_ptr<float>(),
                                    outlier_value.numel(), grad.data_ptr<scalar_t>(), row.data_ptr<float>(),
                                    col.data_ptr<float>(), rows, cols, blocksize, grad_scale, t,
                                    static_cast<float>(eps1), clip_threshold, eps2, scale_parameter,
                                    out.data_ptr<float>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowmem, CPU, m) {
  m.impl("int8_update_", &int8_update_cpu);
  m.impl("int8_factored_prepare", &int8_factored_prepare_cpu);
}

}  // namespace lowmem
