// Torch binding of the CUDA update kernels; compiled only when torch has CUDA (LOWMEM_WITH_CUDA).
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "../torch_utils.h"
#include "launch.h"

namespace lowmem {
namespace {

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "lowmem: CUDA update kernels support float32, float16 and bfloat16, got ",
                         t.scalar_type());
  }
}

void check(int err, const char* what) {
  TORCH_CHECK(err == 0, "lowmem: ", what, " failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

// The kernels read the gradient in the weight's dtype: a float32 gradient of a bfloat16 weight is rounded.
at::Tensor grad_like(const at::Tensor& grad, const at::Tensor& param) {
  return (grad.scalar_type() == param.scalar_type() ? grad : grad.to(param.scalar_type())).contiguous();
}

void sgd_update_cuda(at::Tensor param, const at::Tensor& grad_in, double lr, double weight_decay, double grad_scale) {
  TORCH_CHECK(param.numel() == grad_in.numel(), "lowmem: sgd_update_: grad and param sizes differ");
  const c10::cuda::CUDAGuard guard(param.device());
  const at::Tensor grad = grad_like(grad_in, param);
  on_contiguous(param, [&](at::Tensor& p) {
    check(sgd_update_cuda_launch(dtype_of(p), p.data_ptr(), grad.data_ptr(), p.numel(), static_cast<float>(lr),
                                 static_cast<float>(weight_decay), static_cast<float>(grad_scale),
                                 at::cuda::getCurrentCUDAStream()),
          "sgd_update_");
  });
}

void factored_update_cuda(at::Tensor param, const at::Tensor& grad_in, at::Tensor row, at::Tensor col,
                          at::Tensor exp_avg, double grad_scale, double beta2t, double eps1, double clip_threshold,
                          double rho, double eps2, bool scale_parameter, double weight_decay, double beta1) {
  TORCH_CHECK(param.numel() == grad_in.numel(), "lowmem: factored_update_: grad and param sizes differ");
  TORCH_CHECK(row.is_contiguous() && col.is_contiguous() && row.scalar_type() == at::kFloat,
              "lowmem: factored_update_: row/col state must be contiguous float32");
  const c10::cuda::CUDAGuard guard(param.device());
  const bool factored = col.numel() > 0;
  const int64_t cols = factored ? param.size(-1) : 1;
  const int64_t rows = factored ? param.size(-2) : 1;
  const int64_t batch = factored ? param.numel() / std::max<int64_t>(rows * cols, 1) : param.numel();
  TORCH_CHECK(!factored || (row.numel() == batch * rows && col.numel() == batch * cols),
              "lowmem: factored_update_: row/col state shapes do not match the parameter");
  const at::Tensor grad = grad_like(grad_in, param);
  auto opts = param.options();
  at::Tensor r_factor = at::empty({factored ? batch * rows : 1}, opts.dtype(at::kFloat));
  at::Tensor row_param_sq = at::empty({factored ? batch * rows : 1}, opts.dtype(at::kDouble));
  at::Tensor scalars = at::empty({2}, opts.dtype(at::kDouble));
  const FactoredScalars s{static_cast<float>(grad_scale), static_cast<float>(beta2t), static_cast<float>(eps1),
                          static_cast<float>(clip_threshold), static_cast<float>(rho), static_cast<float>(eps2),
                          static_cast<float>(weight_decay), static_cast<float>(beta1), scale_parameter};
  const FactoredWorkspace ws{r_factor.data_ptr<float>(), row_param_sq.data_ptr<double>(), scalars.data_ptr<double>()};
  float* m = exp_avg.numel() > 0 ? exp_avg.data_ptr<float>() : nullptr;
  on_contiguous(param, [&](at::Tensor& p) {
    check(factored_update_cuda_launch(dtype_of(p), p.data_ptr(), grad.data_ptr(), row.data_ptr<float>(),
                                      factored ? col.data_ptr<float>() : nullptr, m, batch, rows, cols, factored, s,
                                      ws, at::cuda::getCurrentCUDAStream()),
          "factored_update_");
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lowmem, CUDA, m) {
  m.impl("sgd_update_", &sgd_update_cuda);
  m.impl("factored_update_", &factored_update_cuda);
}

}  // namespace lowmem
