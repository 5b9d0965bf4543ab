// Torch binding of the CUDA Lion8bit kernel; compiled only when torch has CUDA (LOWMEM_WITH_CUDA).
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "../torch_utils.h"
#include "launch.h"

namespace lowmem {
namespace {

void lion8bit_update_cuda(at::Tensor param, const at::Tensor& grad_in, at::Tensor codes, at::Tensor absmax,
                          const at::Tensor& code, double lr, double beta1, double beta2, double weight_decay,
                          double grad_scale, int64_t blocksize) {
  TORCH_CHECK(param.numel() == grad_in.numel() && codes.numel() == param.numel(),
              "lowmem: lion8bit_update_: param, grad and codes must have the same number of elements");
  TORCH_CHECK(codes.scalar_type() == at::kByte && absmax.scalar_type() == at::kFloat && codes.is_contiguous() &&
                  absmax.is_contiguous(), "lowmem: lion8bit_update_: codes uint8 and absmax float32, contiguous");
  const c10::cuda::CUDAGuard guard(param.device());
  DType dtype;
  switch (param.scalar_type()) {
    case at::kFloat: dtype = DType::kFloat32; break;
    case at::kHalf: dtype = DType::kFloat16; break;
    case at::kBFloat16: dtype = DType::kBFloat16; break;
    default: TORCH_CHECK(false, "lowmem: lion8bit_update_: unsupported dtype ", param.scalar_type());
  }
  const at::Tensor grad = (grad_in.scalar_type() == param.scalar_type() ? grad_in : grad_in.to(param.scalar_type()))
                              .contiguous();
  const at::Tensor code_c = code.contiguous();
  const LionScalars s{static_cast<float>(lr), static_cast<float>(beta1), static_cast<float>(beta2),
                      static_cast<float>(1.0 - lr * weight_decay), static_cast<float>(grad_scale)};
  on_contiguous(param, [&](at::Tensor& p) {
    const int err = lion8bit_update_cuda_launch(dtype, p.data_ptr(), grad.data_ptr(), codes.data_ptr<uint8_t>(),
                                                absmax.data_ptr<float>(), code_c.data_ptr<float>(), p.numel(),
                                                blocksize, s, at::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == 0, "lowmem: lion8bit_update_ failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lowmem, CUDA, m) { m.impl("lion8bit_update_", &lion8bit_update_cuda); }

}  // namespace lowmem
