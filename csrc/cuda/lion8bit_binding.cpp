// Torch binding of the CUDA Lion8bit kernel; compiled only when torch has CUDA (LOWMEM_WITH_CUDA). The argument
// checks are the CPU binding's (torch_utils.h).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../torch_utils.h"
#include "launch.h"

namespace lowmem {
namespace {

constexpr int64_t kMaxBlocksize = 4096;  // the kernel holds one block's new momentum in shared memory

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "lowmem: lion8bit_update_: unsupported dtype ", t.scalar_type());
  }
}

void lion8bit_update_cuda(at::Tensor param, const at::Tensor& grad_in, at::Tensor codes, at::Tensor absmax,
                          const at::Tensor& code, const at::Tensor& grad_scale, double lr, double beta1, double beta2,
                          double weight_decay, int64_t blocksize) {
  check_lion8bit_args(param, grad_in, codes, absmax, code, blocksize);
  TORCH_CHECK(blocksize <= kMaxBlocksize, "lowmem: lion8bit_update_: blocksize ", blocksize,
              " exceeds the CUDA kernel's ", kMaxBlocksize);
  const float* scale = device_scalar(grad_scale, param, "lion8bit_update_", "grad_scale");
  const c10::cuda::CUDAGuard guard(param.device());
  const at::Tensor grad = float_or_same(grad_in, param);
  const at::Tensor code_c = code.contiguous();
  const LionScalars s{static_cast<float>(lr), static_cast<float>(beta1), static_cast<float>(beta2),
                      static_cast<float>(1.0 - lr * weight_decay)};
  on_contiguous(param, [&](at::Tensor& p) {
    const int err = lion8bit_update_cuda_launch(dtype_of(p), dtype_of(grad), p.data_ptr(), grad.data_ptr(),
                                                codes.data_ptr<uint8_t>(), absmax.data_ptr<float>(),
                                                code_c.data_ptr<float>(), p.numel(), blocksize, s, scale,
                                                c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == 0, "lowmem: lion8bit_update_ failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lowmem, CUDA, m) { m.impl("lion8bit_update_", &lion8bit_update_cuda); }

}  // namespace lowmem
