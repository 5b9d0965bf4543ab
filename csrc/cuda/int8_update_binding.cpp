// Torch binding of the CUDA fused int8-weight update; compiled only when torch has CUDA (LOWMEM_WITH_CUDA). The
// argument checks are the CPU binding's (torch_utils.h); scratch comes from torch's caching allocator on the stream.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../int8_update_common.h"
#include "../torch_utils.h"
#include "binding_utils.h"
#include "launch.h"

namespace lowmem {
namespace {

constexpr int64_t kMaxBlocksize = 4096;  // the kernel holds one block's values in shared memory

void int8_update_cuda(at::Tensor codes, at::Tensor absmax, at::Tensor outlier_index, at::Tensor outlier_value,
                      const at::Tensor& grad_in, const at::Tensor& mask, at::Tensor state, at::Tensor state_absmax,
                      const at::Tensor& state_code, const at::Tensor& coef, const at::Tensor& grad_scale, int64_t rule,
                      double lr, double weight_decay, double beta1, double beta2, int64_t seed, int64_t step,
                      bool refresh, bool stochastic, int64_t blocksize) {
  const char* op = "int8_update_";
  const Int8Shape shape = check_int8_update_args(codes, absmax, outlier_index, outlier_value, grad_in, mask, state,
                                                 state_absmax, state_code, coef, rule, blocksize);
  TORCH_CHECK(blocksize <= kMaxBlocksize, "lowmem: ", op, ": blocksize ", blocksize, " exceeds the CUDA kernel's ",
              kMaxBlocksize);
  const float* scale = device_scalar(grad_scale, codes, op, "grad_scale");
  const c10::cuda::CUDAGuard guard(codes.device());
  const at::Tensor grad = grad_in.contiguous();
  const bool lion8bit = rule == kInt8Lion8bit;
  Int8DeviceBuffers b{codes.data_ptr<uint8_t>(), absmax.data_ptr<float>(), outlier_index.data_ptr<int32_t>(),
                      outlier_value.data_ptr<float>(), codes.numel(), outlier_index.numel(),
                      mask.numel() ? mask.data_ptr<bool>() : nullptr,
                      (lion8bit || state.numel() == 0) ? nullptr : state.data_ptr<float>(),
                      lion8bit ? state.data_ptr<uint8_t>() : nullptr, lion8bit ? state_absmax.data_ptr<float>() : nullptr,
                      lion8bit ? state_code.data_ptr<float>() : nullptr,
                      rule == kInt8Factored ? coef.data_ptr<float>() : nullptr, shape.rows};
  const Int8Scalars s = int8_scalars(rule, lr, weight_decay, beta1, beta2, seed, step, refresh, stochastic, blocksize,
                                     shape.cols);
  Int8RefreshWorkspace ws{nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};
  at::Tensor hist, selection, counts, offsets, new_index, new_value;
  if (refresh && outlier_index.numel() > 0) {
    const int64_t n_blocks = absmax.numel();
    const auto longs = codes.options().dtype(at::kLong);
    hist = at::empty({65536}, longs);
    selection = at::empty({4}, longs);
    counts = at::empty({2 * n_blocks}, longs);
    offsets = at::empty({2 * n_blocks}, longs);
    new_index = at::empty({outlier_index.numel()}, codes.options().dtype(at::kInt));
    new_value = at::empty({outlier_index.numel()}, codes.options().dtype(at::kFloat));
    ws = {reinterpret_cast<unsigned long long*>(hist.data_ptr<int64_t>()),
          reinterpret_cast<long long*>(selection.data_ptr<int64_t>()),
          reinterpret_cast<long long*>(counts.data_ptr<int64_t>()),
          reinterpret_cast<long long*>(offsets.data_ptr<int64_t>()), new_index.data_ptr<int32_t>(),
          new_value.data_ptr<float>()};
  }
  check_launch(int8_update_cuda_launch(dtype_of(grad, op), grad.data_ptr(), b, s, scale, ws,
                                c10::cuda::getCurrentCUDAStream()),
        op);
}

at::Tensor int8_factored_prepare_cuda(const at::Tensor& codes, const at::Tensor& absmax, const at::Tensor& outlier_value,
                                      const at::Tensor& grad_in, at::Tensor row, at::Tensor col, const at::Tensor& step,
                                      const at::Tensor& grad_scale, double lr, bool relative_step, double decay_rate,
                                      double eps1, double clip_threshold, double eps2, bool scale_parameter,
                                      int64_t blocksize) {
  const char* op = "int8_factored_prepare";
  check_int8_prepare_args(codes, absmax, outlier_value, grad_in, row, col, blocksize);
  const float* step_p = device_scalar(step, codes, op, "step");
  const float* scale = device_scalar(grad_scale, codes, op, "grad_scale");
  const c10::cuda::CUDAGuard guard(codes.device());
  const at::Tensor grad = grad_in.contiguous();
  const int64_t rows = grad.size(0), cols = grad.size(1);
  const auto doubles = codes.options().dtype(at::kDouble);
  at::Tensor row_partial = at::empty({rows}, doubles);
  at::Tensor col_partial = at::empty({int8_prepare_col_chunks(rows) * cols}, doubles);
  at::Tensor block_sq = at::empty({absmax.numel()}, doubles);
  at::Tensor out = at::empty({rows + cols + 2}, codes.options().dtype(at::kFloat));
  const FactoredScalars a{lr, decay_rate, static_cast<float>(eps1), static_cast<float>(clip_threshold),
                          static_cast<float>(eps2), 0.f, 0.f, relative_step, scale_parameter};
  const Int8PrepareWorkspace ws{row_partial.data_ptr<double>(), col_partial.data_ptr<double>(),
                                block_sq.data_ptr<double>()};
  check_launch(int8_factored_prepare_cuda_launch(dtype_of(grad, op), grad.data_ptr(), codes.data_ptr<uint8_t>(),
                                          absmax.data_ptr<float>(), outlier_value.data_ptr<float>(),
                                          outlier_value.numel(), row.data_ptr<float>(), col.data_ptr<float>(), rows,
                                          cols, blocksize, a, step_p, scale, ws, out.data_ptr<float>(),
                                          c10::cuda::getCurrentCUDAStream()),
        op);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowmem, CUDA, m) {
  m.impl("int8_update_", &int8_update_cuda);
  m.impl("int8_factored_prepare", &int8_factored_prepare_cuda);
}

}  // namespace lowmem
