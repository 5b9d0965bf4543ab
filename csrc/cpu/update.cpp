// Fused per-tensor update rules on CPU: LOMO's SGD apply and the factored Adafactor/AdaLomo update.
//
// Specification: lowmem/ops/update.py (sgd_update_ref, factored_update_ref). The float32 operations
// follow the reference's order; sums are accumulated in double (the reference's float32 means use
// cascaded sums), so results agree to float32 rounding, not bit for bit.
//
// The factored update never allocates a gradient-sized temporary: pass 1 reads the gradient once for
// the row and column statistics (column sums in per-thread accumulators) and the weight's RMS; pass 2
// recomputes u = g·r_i·c_j for its RMS; pass 3 recomputes it again to apply.
//
// The *_rows_ variants take a row-sparse gradient (an embedding's: the batch's rows) through the same kernels
// (grad_rows.h): a missing row reads as zeros, so the result is bit for bit that of the dense gradient.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <cmath>
#include <vector>

#include "../torch_utils.h"
#include "../update_common.h"
#include "factored_stats.h"
#include "grad_rows.h"

namespace lowmem {
namespace {

constexpr int64_t kGrain = 4096;

// Multiplying by grad_scale = 1 or decay = 1 is exact, so the loops stay branch-free (and vectorize)
// while matching the reference, which skips those multiplications. A row-sparse gradient walks rows with the same
// element arithmetic, so it writes what the dense gradient would; a zero row without weight decay is passed over
// (θ·1 − lr·0 is θ, bit for bit), so a step touches only the batch's rows.
template <typename p_t, typename g_t>
void sgd_cpu_impl(p_t* param, const GradRows<g_t>& grad, int64_t rows, int64_t cols, float lr, float weight_decay,
                  float grad_scale) {
  const float decay = static_cast<float>(1.0 - static_cast<double>(lr) * weight_decay);
  const float neg_lr = -lr;
  auto apply = [&](p_t* p, const g_t* g_in, int64_t count) {
#pragma omp simd
    for (int64_t i = 0; i < count; ++i) {
      const float g = static_cast<float>(g_in[i]) * grad_scale;
      p[i] = static_cast<p_t>(static_cast<float>(p[i]) * decay + neg_lr * g);
    }
  };
  if (!grad.sparse()) {
    const g_t* flat = grad.row(0);
    at::parallel_for(0, rows * cols, kGrain, [&](int64_t begin, int64_t end) {
      apply(param + begin, flat + begin, end - begin);
    });
    return;
  }
  const bool skip_zero_rows = decay == 1.f;
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(cols, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (skip_zero_rows && grad.absent(i)) continue;
      apply(param + i * cols, grad.row(i), cols);
    }
  });
}

struct FactoredArgs {
  float grad_scale, beta2t, eps1, clip_threshold, rho, eps2, weight_decay, beta1;
  bool scale_parameter;
};

// Sum of x² over a tensor, in double (vector lanes: the additions reassociated, each exact to double rounding).
template <typename t>
double sum_squares(const t* x, int64_t n) {
  return at::parallel_reduce(0, n, kGrain, 0.0, [&](int64_t begin, int64_t end, double acc) {
#pragma omp simd reduction(+ : acc)
    for (int64_t i = begin; i < end; ++i) {
      const double v = static_cast<float>(x[i]);
      acc += v * v;
    }
    return acc;
  }, std::plus<double>());
}

template <typename p_t, typename g_t>
void factored_cpu_impl(p_t* param, const GradRows<g_t>& grad, float* row, float* col, float* exp_avg, int64_t batch,
                       int64_t rows, int64_t cols, bool factored, const FactoredArgs& a) {
  const int64_t n = batch * rows * cols;
  if (n == 0) return;
  double alpha = a.rho;
  if (a.scale_parameter) alpha = a.rho * std::max(static_cast<double>(a.eps2), std::sqrt(sum_squares(param, n) / n));
  const float keep = a.beta2t, take = static_cast<float>(1.0 - a.beta2t);

  // Row factor r (per batch row) and column factor c; for a vector, r is the full second moment.
  std::vector<float> r_factor, c_factor;
  if (factored) {
    r_factor.resize(batch * rows);
    c_factor.resize(batch * cols);
    factored_statistics(grad, row, col, batch, rows, cols, a.grad_scale, a.eps1, keep, r_factor.data(),
                        c_factor.data());
  } else {
    const g_t* flat = grad.row(0);  // a vector's gradient is dense
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const float g = static_cast<float>(flat[i]) * a.grad_scale;
        row[i] = row[i] * keep + take * (g * g + a.eps1);
      }
    });
  }
  // Passes 2 and 3 walk rows × columns (no per-element division); u = g·(r_i·c_j) for matrices, in the
  // reference's multiplication order, rsqrt(v)·g for vectors (one "row" of n values).
  const int64_t n_rows = factored ? batch * rows : 1;
  const int64_t width = factored ? cols : n;
  auto for_rows = [&](auto&& body) {
    at::parallel_for(0, n_rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(width, 1)),
                     [&](int64_t begin, int64_t end) {
                       for (int64_t br = begin; br < end; ++br) body(br);
                     });
  };
  std::vector<double> row_u2(n_rows, 0.0);
  for_rows([&](int64_t br) {
    if (grad.absent(br)) return;  // u = 0·r·c: a zero row adds exactly nothing (row_u2 stays 0)
    const g_t* g_row = grad.row(br);
    double acc = 0.0;
    if (factored) {
      const float r = r_factor[br];
      const float* c = c_factor.data() + (br / rows) * cols;
#pragma omp simd reduction(+ : acc)
      for (int64_t j = 0; j < width; ++j) {
        const float u = (static_cast<float>(g_row[j]) * a.grad_scale) * (r * c[j]);
        acc += static_cast<double>(u) * u;
      }
    } else {
      for (int64_t j = 0; j < width; ++j) {
        const float u = (1.f / std::sqrt(row[j])) * (static_cast<float>(g_row[j]) * a.grad_scale);
        acc += static_cast<double>(u) * u;
      }
    }
    row_u2[br] = acc;
  });
  double sum_u2 = 0.0;
  for (double v : row_u2) sum_u2 += v;
  const float denom = static_cast<float>(std::max(1.0, std::sqrt(sum_u2 / n) / a.clip_threshold));
  const float alpha_f = static_cast<float>(alpha);
  const float decay = static_cast<float>(-static_cast<double>(a.weight_decay) * alpha);
  const float beta1 = a.beta1, one_minus_beta1 = static_cast<float>(1.0 - a.beta1);
  // The loop is instantiated per (momentum, decay) so that it has no branch and vectorizes; each element's
  // operations are the same in every instance.
  // A zero gradient row without decay or momentum steps by (0 / denom)·α = 0: θ − 0 is θ, so it is passed over.
  auto apply = [&](auto momentum, auto decayed) {
    for_rows([&](int64_t br) {
      if constexpr (!decltype(momentum)::value && !decltype(decayed)::value) {
        if (grad.absent(br)) return;
      }
      const int64_t base = br * width;
      const g_t* g_row = grad.row(br);
      const float r = factored ? r_factor[br] : 0.f;
      const float* c = factored ? c_factor.data() + (br / rows) * cols : nullptr;
      p_t* p = param + base;
      float* m = momentum ? exp_avg + base : nullptr;
      const float* v = factored ? nullptr : row + base;  // a vector's second moment
      auto step = [&](int64_t j, float u) {
        float update = (u / denom) * alpha_f;
        if constexpr (decltype(momentum)::value) {
          m[j] = m[j] * beta1 + one_minus_beta1 * update;
          update = m[j];
        }
        float w = static_cast<float>(p[j]);
        if constexpr (decltype(decayed)::value) w = w + decay * w;
        p[j] = static_cast<p_t>(w - update);
      };
      if (factored) {
#pragma omp simd
        for (int64_t j = 0; j < width; ++j) step(j, (static_cast<float>(g_row[j]) * a.grad_scale) * (r * c[j]));
      } else {
        for (int64_t j = 0; j < width; ++j) {
          step(j, (1.f / std::sqrt(v[j])) * (static_cast<float>(g_row[j]) * a.grad_scale));
        }
      }
    });
  };
  const bool decayed = a.weight_decay != 0.f;
  if (exp_avg != nullptr && decayed) apply(std::true_type{}, std::true_type{});
  else if (exp_avg != nullptr) apply(std::true_type{}, std::false_type{});
  else if (decayed) apply(std::false_type{}, std::true_type{});
  else apply(std::false_type{}, std::false_type{});
}

// Runs fn(param, GradRows) for the param's dtype and the gradient's (the param's own, or float32).
template <typename Fn>
void dispatch_grad(at::Tensor& p, const at::Tensor& grad, const int32_t* slot, int64_t cols, Fn fn) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "lowmem_update_cpu", [&] {
    if (grad.scalar_type() == p.scalar_type()) {
      fn(p.data_ptr<scalar_t>(), GradRows<scalar_t>(grad.data_ptr<scalar_t>(), slot, cols));
    } else {
      fn(p.data_ptr<scalar_t>(), GradRows<float>(grad.data_ptr<float>(), slot, cols));
    }
  });
}

// The slots of a row-sparse gradient, each checked to point inside values.
const int32_t* checked_slots(const at::Tensor& slot, const at::Tensor& values, const char* op) {
  const int32_t* s = slot.data_ptr<int32_t>();
  const int64_t k = values.size(0);
  for (int64_t i = 0; i < slot.numel(); ++i) {
    TORCH_CHECK(s[i] < k, "lowmem: ", op, ": slot[", i, "] = ", s[i], " but values has ", k, " rows");
  }
  return s;
}

void sgd_cpu(at::Tensor param, const at::Tensor& grad, const int32_t* slot, double lr, double weight_decay,
             const at::Tensor& grad_scale_t, const char* op) {
  const float grad_scale = host_scalar(grad_scale_t, param, op, "grad_scale");
  const int64_t cols = slot != nullptr ? param.size(1) : 1;
  on_contiguous(param, [&](at::Tensor& p) {
    dispatch_grad(p, grad, slot, cols, [&](auto* p_ptr, const auto& g) {
      sgd_cpu_impl(p_ptr, g, p.numel() / cols, cols, lr, weight_decay, grad_scale);
    });
  });
}

void sgd_update_cpu(at::Tensor param, const at::Tensor& grad_in, double lr, double weight_decay,
                    const at::Tensor& grad_scale_t) {
  check_grad(param, grad_in, "sgd_update_");
  sgd_cpu(param, float_or_same(grad_in, param), nullptr, lr, weight_decay, grad_scale_t, "sgd_update_");
}

void sgd_update_rows_cpu(at::Tensor param, const at::Tensor& slot, const at::Tensor& values, double lr,
                         double weight_decay, const at::Tensor& grad_scale_t) {
  const char* op = "sgd_update_rows_";
  check_rows_args(param, slot, values, op);
  const at::Tensor v = float_or_same(values, param);
  sgd_cpu(param, v, checked_slots(slot, v, op), lr, weight_decay, grad_scale_t, op);
}

void factored_cpu(at::Tensor param, const at::Tensor& grad, const int32_t* slot, at::Tensor row, at::Tensor col,
                  at::Tensor exp_avg, const FactoredShape& shape, const at::Tensor& step_t,
                  const at::Tensor& grad_scale_t, double lr, bool relative_step, double decay_rate, double eps1,
                  double clip_threshold, double eps2, bool scale_parameter, double weight_decay, double beta1,
                  const char* op) {
  const bool momentum = exp_avg.numel() > 0;
  const double step = host_scalar(step_t, param, op, "step");
  const float grad_scale = host_scalar(grad_scale_t, param, op, "grad_scale");
  const FactoredStep t = factored_step(step, lr, relative_step, decay_rate);
  const FactoredArgs args{grad_scale, t.beta2t, static_cast<float>(eps1),
                          static_cast<float>(clip_threshold), t.rho, static_cast<float>(eps2),
                          static_cast<float>(weight_decay), static_cast<float>(beta1), scale_parameter};
  float* m = momentum ? exp_avg.data_ptr<float>() : nullptr;
  on_contiguous(param, [&](at::Tensor& p) {
    dispatch_grad(p, grad, slot, shape.cols, [&](auto* p_ptr, const auto& g) {
      factored_cpu_impl(p_ptr, g, row.data_ptr<float>(), col.data_ptr<float>(), m, shape.batch, shape.rows,
                        shape.cols, shape.factored, args);
    });
  });
}

void factored_update_cpu(at::Tensor param, const at::Tensor& grad_in, at::Tensor row, at::Tensor col,
                         at::Tensor exp_avg, const at::Tensor& step_t, const at::Tensor& grad_scale_t, double lr,
                         bool relative_step, double decay_rate, double eps1, double clip_threshold, double eps2,
                         bool scale_parameter, double weight_decay, double beta1) {
  const FactoredShape shape = check_factored_args(param, grad_in, row, col, exp_avg);
  factored_cpu(param, float_or_same(grad_in, param), nullptr, row, col, exp_avg, shape, step_t, grad_scale_t, lr,
               relative_step, decay_rate, eps1, clip_threshold, eps2, scale_parameter, weight_decay, beta1,
               "factored_update_");
}

void factored_update_rows_cpu(at::Tensor param, const at::Tensor& slot, const at::Tensor& values, at::Tensor row,
                              at::Tensor col, const at::Tensor& step_t, const at::Tensor& grad_scale_t, double lr,
                              bool relative_step, double decay_rate, double eps1, double clip_threshold, double eps2,
                              bool scale_parameter, double weight_decay) {
  const char* op = "factored_update_rows_";
  check_rows_args(param, slot, values, op);
  const at::Tensor no_momentum = at::empty({0}, param.options().dtype(at::kFloat));
  const FactoredShape shape = check_factored_args(param, at::Tensor(), row, col, no_momentum, op);
  TORCH_CHECK(shape.factored, "lowmem: ", op, ": needs the factored (row and column) statistics of a matrix");
  const at::Tensor v = float_or_same(values, param);
  factored_cpu(param, v, checked_slots(slot, v, op), row, col, no_momentum, shape, step_t, grad_scale_t, lr,
               relative_step, decay_rate, eps1, clip_threshold, eps2, scale_parameter, weight_decay, 0.0, op);
}

}  // namespace

TORCH_LIBRARY_IMPL(lowmem, CPU, m) {
  m.impl("sgd_update_", &sgd_update_cpu);
  m.impl("factored_update_", &factored_update_cpu);
  m.impl("sgd_update_rows_", &sgd_update_rows_cpu);
  m.impl("factored_update_rows_", &factored_update_rows_cpu);
}

}  // namespace lowmem
