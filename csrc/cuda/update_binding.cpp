// Torch binding of the CUDA update kernels; compiled only when torch has CUDA (LOWMEM_WITH_CUDA). The argument
// checks are the CPU binding's (torch_utils.h), so both devices refuse bad input with the same message.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../torch_utils.h"
#include "binding_utils.h"
#include "launch.h"

namespace lowmem {
namespace {

void sgd_cuda(at::Tensor param, const at::Tensor& grad, const at::Tensor& slot, double lr, double weight_decay,
              const at::Tensor& grad_scale, const char* op) {
  const float* scale = device_scalar(grad_scale, param, op, "grad_scale");
  const c10::cuda::CUDAGuard guard(param.device());
  const bool rows = slot.defined();
  on_contiguous(param, [&](at::Tensor& p) {
    check_launch(sgd_update_cuda_launch(dtype_of(p, op), dtype_of(grad, op), p.data_ptr(), grad.data_ptr(),
                                        rows ? slot.data_ptr<int32_t>() : nullptr, p.numel(), rows ? p.size(1) : 1,
                                        static_cast<float>(lr), static_cast<float>(weight_decay), scale,
                                        c10::cuda::getCurrentCUDAStream()),
                 op);
  });
}

void sgd_update_cuda(at::Tensor param, const at::Tensor& grad_in, double lr, double weight_decay,
                     const at::Tensor& grad_scale) {
  check_grad(param, grad_in, "sgd_update_");
  sgd_cuda(param, float_or_same(grad_in, param), at::Tensor(), lr, weight_decay, grad_scale, "sgd_update_");
}

void sgd_update_rows_cuda(at::Tensor param, const at::Tensor& slot, const at::Tensor& values, double lr,
                          double weight_decay, const at::Tensor& grad_scale) {
  check_rows_args(param, slot, values, "sgd_update_rows_");
  sgd_cuda(param, float_or_same(values, param), slot, lr, weight_decay, grad_scale, "sgd_update_rows_");
}

void factored_cuda(at::Tensor param, const at::Tensor& grad, const at::Tensor& slot, at::Tensor row, at::Tensor col,
                   at::Tensor exp_avg, const FactoredShape& shape, const at::Tensor& step,
                   const at::Tensor& grad_scale, double lr, bool relative_step, double decay_rate, double eps1,
                   double clip_threshold, double eps2, bool scale_parameter, double weight_decay, double beta1,
                   const char* op) {
  const float* step_p = device_scalar(step, param, op, "step");
  const float* scale_p = device_scalar(grad_scale, param, op, "grad_scale");
  const c10::cuda::CUDAGuard guard(param.device());
  const int64_t rows_total = shape.factored ? shape.batch * shape.rows : 1;
  TORCH_CHECK(rows_total < (int64_t{1} << 31) && shape.batch * ((shape.cols + 31) / 32) < (int64_t{1} << 31),
              "lowmem: ", op, ": ", rows_total, " rows of ", shape.cols, " exceed the CUDA kernels' grid");
  const int64_t partials = shape.factored ? factored_col_chunks(shape.rows) * shape.batch * shape.cols : 1;
  auto opts = param.options();
  at::Tensor r_factor = at::empty({rows_total}, opts.dtype(at::kFloat));
  at::Tensor row_param_sq = at::empty({rows_total}, opts.dtype(at::kDouble));
  at::Tensor col_partial = at::empty({partials}, opts.dtype(at::kDouble));
  at::Tensor scalars = at::empty({2}, opts.dtype(at::kDouble));
  const FactoredScalars s{lr, decay_rate, static_cast<float>(eps1),
                          static_cast<float>(clip_threshold), static_cast<float>(eps2),
                          static_cast<float>(weight_decay), static_cast<float>(beta1), relative_step, scale_parameter};
  const FactoredWorkspace ws{r_factor.data_ptr<float>(), row_param_sq.data_ptr<double>(),
                             col_partial.data_ptr<double>(), scalars.data_ptr<double>()};
  float* m = exp_avg.numel() > 0 ? exp_avg.data_ptr<float>() : nullptr;
  on_contiguous(param, [&](at::Tensor& p) {
    check_launch(factored_update_cuda_launch(dtype_of(p, op), dtype_of(grad, op), p.data_ptr(), grad.data_ptr(),
                                             slot.defined() ? slot.data_ptr<int32_t>() : nullptr,
                                             row.data_ptr<float>(), shape.factored ? col.data_ptr<float>() : nullptr,
                                             m, shape.batch, shape.rows, shape.cols, shape.factored, s, step_p,
                                             scale_p, ws, c10::cuda::getCurrentCUDAStream()),
                 op);
  });
}

void factored_update_cuda(at::Tensor param, const at::Tensor& grad_in, at::Tensor row, at::Tensor col,
                          at::Tensor exp_avg, const at::Tensor& step, const at::Tensor& grad_scale, double lr,
                          bool relative_step, double decay_rate, double eps1, double clip_threshold, double eps2,
                          bool scale_parameter, double weight_decay, double beta1) {
  const FactoredShape shape = check_factored_args(param, grad_in, row, col, exp_avg);
  factored_cuda(param, float_or_same(grad_in, param), at::Tensor(), row, col, exp_avg, shape, step, grad_scale, lr,
                relative_step, decay_rate, eps1, clip_threshold, eps2, scale_parameter, weight_decay, beta1,
                "factored_update_");
}

void factored_update_rows_cuda(at::Tensor param, const at::Tensor& slot, const at::Tensor& values, at::Tensor row,
                               at::Tensor col, const at::Tensor& step, const at::Tensor& grad_scale, double lr,
                               bool relative_step, double decay_rate, double eps1, double clip_threshold,
                               double eps2, bool scale_parameter, double weight_decay) {
  const char* op = "factored_update_rows_";
  check_rows_args(param, slot, values, op);
  const at::Tensor no_momentum = at::empty({0}, param.options().dtype(at::kFloat));
  const FactoredShape shape = check_factored_args(param, at::Tensor(), row, col, no_momentum, op);
  TORCH_CHECK(shape.factored, "lowmem: ", op, ": needs the factored (row and column) statistics of a matrix");
  factored_cuda(param, float_or_same(values, param), slot, row, col, no_momentum, shape, step, grad_scale, lr,
                relative_step, decay_rate, eps1, clip_threshold, eps2, scale_parameter, weight_decay, 0.0, op);
}

}  // namespace

TORCH_LIBRARY_IMPL(lowmem, CUDA, m) {
  m.impl("sgd_update_", &sgd_update_cuda);
  m.impl("factored_update_", &factored_update_cuda);
  m.impl("sgd_update_rows_", &sgd_update_rows_cuda);
  m.impl("factored_update_rows_", &factored_update_rows_cuda);
}

}  // namespace lowmem
