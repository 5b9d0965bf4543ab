// Blockwise int8 quantization with a sorted 256-entry code map: CPU kernels.
//
// Specification: lowmem/ops/quant.py (quantize_blockwise_ref, dequantize_blockwise_ref). The math is
// kept operation-for-operation identical to the reference (float32 divide by the block absmax, search
// over the midpoints with ties going to the lower code), so codes match the reference exactly. Never
// build this with -ffast-math: a reciprocal-multiply would change which code a value rounds to.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <memory>

#include "../quant_common.h"
#include "../torch_utils.h"

namespace lowmem {

namespace {

template <typename scalar_t>
void quantize_cpu_impl(const scalar_t* x, int64_t n, const float* code, int64_t blocksize, bool preserve_sign,
                       uint8_t* out, float* absmax) {
  const CodeLut& lut = lut_for(code);  // ~17 KB: stays in L1 while blocks are quantized
  const int64_t n_blocks = (n + blocksize - 1) / blocksize;
  at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t lo = b * blocksize;
      const int64_t hi = std::min(lo + blocksize, n);
      float amax = 0.f;
      for (int64_t i = lo; i < hi; ++i) amax = std::max(amax, std::fabs(static_cast<float>(x[i])));
      absmax[b] = amax;
      const float scale = amax > 0.f ? amax : 1.f;
      for (int64_t i = lo; i < hi; ++i) out[i] = lut.nearest(static_cast<float>(x[i]) / scale, preserve_sign);
    }
  });
}

template <typename scalar_t>
void dequantize_cpu_impl(const uint8_t* codes, const float* absmax, const float* code, int64_t n,
                         int64_t blocksize, scalar_t* out) {
  const int64_t n_blocks = (n + blocksize - 1) / blocksize;
  at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t lo = b * blocksize;
      const int64_t hi = std::min(lo + blocksize, n);
      const float a = absmax[b];
#pragma omp simd
      for (int64_t i = lo; i < hi; ++i) out[i] = static_cast<scalar_t>(code[codes[i]] * a);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_cpu(const at::Tensor& x_in, const at::Tensor& code,
                                                          int64_t blocksize, bool preserve_sign) {
  TORCH_CHECK(blocksize > 0, "lowmem: quantize_blockwise: blocksize must be positive, got ", blocksize);
  check_code(code, x_in, "quantize_blockwise");
  const at::Tensor x = x_in.contiguous();
  const at::Tensor code_c = code.contiguous();
  const int64_t n = x.numel();
  auto out = at::empty(x.sizes(), x.options().dtype(at::kByte));
  auto absmax = at::empty({(n + blocksize - 1) / blocksize}, x.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "quantize_blockwise_cpu", [&] {
    quantize_cpu_impl<scalar_t>(x.data_ptr<scalar_t>(), n, code_c.data_ptr<float>(), blocksize, preserve_sign,
                                out.data_ptr<uint8_t>(), absmax.data_ptr<float>());
  });
  return {out, absmax};
}

at::Tensor dequantize_blockwise_cpu(const at::Tensor& codes_in, const at::Tensor& absmax_in, const at::Tensor& code,
                                    int64_t blocksize, at::ScalarType dtype) {
  TORCH_CHECK(codes_in.scalar_type() == at::kByte, "lowmem: dequantize_blockwise: codes must be uint8, got ",
              codes_in.scalar_type());
  check_blocks(codes_in.numel(), absmax_in, blocksize, codes_in, "dequantize_blockwise");
  check_code(code, codes_in, "dequantize_blockwise");
  const at::Tensor codes = codes_in.contiguous();
  const at::Tensor absmax = absmax_in.contiguous().to(at::kFloat);
  const at::Tensor code_c = code.contiguous();
  const int64_t n = codes.numel();
  auto out = at::empty(codes.sizes(), codes.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "dequantize_blockwise_cpu", [&] {
    dequantize_cpu_impl<scalar_t>(codes.data_ptr<uint8_t>(), absmax.data_ptr<float>(), code_c.data_ptr<float>(), n,
                                  blocksize, out.data_ptr<scalar_t>());
  });
  return out;
}

TORCH_LIBRARY_IMPL(lowmem, CPU, m) {
  m.impl("quantize_blockwise", &quantize_blockwise_cpu);
  m.impl("dequantize_blockwise", &dequantize_blockwise_cpu);
}

}  // namespace lowmem
