// Lion with an int8 blockwise-quantized momentum on CPU: one fused pass per quantization block.
//
// Specification: lowmem/ops/update.py (lion8bit_update_ref). Per block of `blocksize` values: dequantize
// m, c = β1·m + (1−β1)·g, θ ← θ·(1 − lr·wd) − lr·sign(c), m ← β2·m + (1−β2)·g, new absmax, requantize m to the
// nearest code keeping its sign. The new momentum lives only in a block-sized buffer on the stack.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../quant_common.h"
#include "../torch_utils.h"

namespace lowmem {
namespace {

template <typename p_t, typename g_t>
void lion8bit_cpu_impl(p_t* param, const g_t* grad, uint8_t* codes, float* absmax, const float* code, int64_t n,
                       int64_t blocksize, float lr, float beta1, float beta2, float weight_decay, float grad_scale) {
  const CodeLut& lut = lut_for(code);
  const float decay = static_cast<float>(1.0 - static_cast<double>(lr) * weight_decay);
  const float one_minus_beta1 = static_cast<float>(1.0 - beta1), one_minus_beta2 = static_cast<float>(1.0 - beta2);
  const int64_t n_blocks = (n + blocksize - 1) / blocksize;
  at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> m_new(blocksize);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t lo = b * blocksize, hi = std::min(lo + blocksize, n);
      const float scale_in = absmax[b];
      float amax = 0.f;
      for (int64_t i = lo; i < hi; ++i) {
        const float m = code[codes[i]] * scale_in;
        const float g = static_cast<float>(grad[i]) * grad_scale;
        const float c = m * beta1 + one_minus_beta1 * g;
        const float sign = static_cast<float>((c > 0.f) - (c < 0.f));
        param[i] = static_cast<p_t>(static_cast<float>(param[i]) * decay + (-lr) * sign);
        const float updated = m * beta2 + one_minus_beta2 * g;
        m_new[i - lo] = updated;
        amax = std::max(amax, std::fabs(updated));
      }
      absmax[b] = amax;
      const float scale = amax > 0.f ? amax : 1.f;
      for (int64_t i = lo; i < hi; ++i) codes[i] = lut.nearest(m_new[i - lo] / scale, true);
    }
  });
}

void lion8bit_update_cpu(at::Tensor param, const at::Tensor& grad_in, at::Tensor codes, at::Tensor absmax,
                         const at::Tensor& code, const at::Tensor& grad_scale_t, double lr, double beta1,
                         double beta2, double weight_decay, int64_t blocksize) {
  check_lion8bit_args(param, grad_in, codes, absmax, code, blocksize);
  const float grad_scale = host_scalar(grad_scale_t, param, "lion8bit_update_", "grad_scale");
  const at::Tensor grad = float_or_same(grad_in, param);
  const at::Tensor code_c = code.contiguous();
  on_contiguous(param, [&](at::Tensor& p) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "lion8bit_update_cpu", [&] {
      if (grad.scalar_type() == p.scalar_type()) {
        lion8bit_cpu_impl<scalar_t, scalar_t>(p.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(),
                                              codes.data_ptr<uint8_t>(), absmax.data_ptr<float>(),
                                              code_c.data_ptr<float>(), p.numel(), blocksize, lr, beta1, beta2,
                                              weight_decay, grad_scale);
      } else {
        lion8bit_cpu_impl<scalar_t, float>(p.data_ptr<scalar_t>(), grad.data_ptr<float>(), codes.data_ptr<uint8_t>(),
                                           absmax.data_ptr<float>(), code_c.data_ptr<float>(), p.numel(), blocksize,
                                           lr, beta1, beta2, weight_decay, grad_scale);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lowmem, CPU, m) { m.impl("lion8bit_update_", &lion8bit_update_cpu); }

}  // namespace lowmem
