// Torch binding of the CUDA quantization kernels; compiled only when torch has CUDA (LOWMEM_WITH_CUDA).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../torch_utils.h"
#include "launch.h"

namespace lowmem {
namespace {

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "lowmem: CUDA quantization supports float32, float16 and bfloat16, got ", t);
  }
}

void check_launch(int err, const char* what) {
  TORCH_CHECK(err == 0, "lowmem: ", what, " failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_cuda(const at::Tensor& x_in, const at::Tensor& code,
                                                           int64_t blocksize, bool preserve_sign) {
  TORCH_CHECK(blocksize > 0, "lowmem: quantize_blockwise: blocksize must be positive, got ", blocksize);
  check_code(code, x_in, "quantize_blockwise");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.numel();
  auto out = at::empty(x.sizes(), x.options().dtype(at::kByte));
  auto absmax = at::empty({(n + blocksize - 1) / blocksize}, x.options().dtype(at::kFloat));
  check_launch(quantize_blockwise_cuda_launch(to_dtype(x.scalar_type()), x.data_ptr(), n,
                                              code.contiguous().data_ptr<float>(), blocksize, preserve_sign,
                                              out.data_ptr<uint8_t>(), absmax.data_ptr<float>(),
                                              c10::cuda::getCurrentCUDAStream()),
               "quantize_blockwise");
  return {out, absmax};
}

at::Tensor dequantize_blockwise_cuda(const at::Tensor& codes_in, const at::Tensor& absmax, const at::Tensor& code,
                                     int64_t blocksize, at::ScalarType dtype) {
  TORCH_CHECK(codes_in.scalar_type() == at::kByte, "lowmem: dequantize_blockwise: codes must be uint8, got ",
              codes_in.scalar_type());
  check_blocks(codes_in.numel(), absmax, blocksize, codes_in, "dequantize_blockwise");
  check_code(code, codes_in, "dequantize_blockwise");
  const c10::cuda::CUDAGuard guard(codes_in.device());
  const at::Tensor codes = codes_in.contiguous();
  const int64_t n = codes.numel();
  auto out = at::empty(codes.sizes(), codes.options().dtype(dtype));
  check_launch(dequantize_blockwise_cuda_launch(to_dtype(dtype), codes.data_ptr<uint8_t>(),
                                                absmax.contiguous().to(at::kFloat).data_ptr<float>(),
                                                code.contiguous().data_ptr<float>(), n, blocksize, out.data_ptr(),
                                                c10::cuda::getCurrentCUDAStream()),
               "dequantize_blockwise");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowmem, CUDA, m) {
  m.impl("quantize_blockwise", &quantize_blockwise_cuda);
  m.impl("dequantize_blockwise", &dequantize_blockwise_cuda);
}

}  // namespace lowmem
