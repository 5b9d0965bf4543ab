// Torch binding of the CUDA token-block kernels; compiled only when torch has CUDA (LOWMEM_WITH_CUDA). The argument
// checks are the CPU binding's (torch_utils.h), except the block indices' range, which only the kernel can check
// without waiting for the device (it traps).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../torch_utils.h"
#include "launch.h"

namespace lowmem {
namespace {

void check_launch(int err, const char* what) {
  TORCH_CHECK(err == 0, "lowmem: ", what, " failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

at::Tensor gather_blocks_cuda(const at::Tensor& x, const at::Tensor& blocks, int64_t block_size) {
  const TokenBlocks t = check_token_blocks(x, blocks, block_size, "gather_blocks");
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty(packed_shape(x, t), x.options());
  check_launch(copy_token_blocks_cuda_launch(true, out.data_ptr(), x.data_ptr(), blocks.data_ptr<int64_t>(), t.batch,
                                             t.x_batch, t.length, t.full_blocks, t.kept, block_size, t.row_bytes,
                                             c10::cuda::getCurrentCUDAStream()),
               "gather_blocks");
  return out;
}

at::Tensor scatter_blocks_cuda(const at::Tensor& base, const at::Tensor& src, const at::Tensor& blocks,
                               int64_t block_size) {
  const TokenBlocks t = check_token_blocks(base, blocks, block_size, "scatter_blocks");
  check_scatter_src(base, src, t);
  const c10::cuda::CUDAGuard guard(base.device());
  auto out = base.clone();
  check_launch(copy_token_blocks_cuda_launch(false, out.data_ptr(), src.data_ptr(), blocks.data_ptr<int64_t>(), t.batch,
                                             t.x_batch, t.length, t.full_blocks, t.kept, block_size, t.row_bytes,
                                             c10::cuda::getCurrentCUDAStream()),
               "scatter_blocks");
  return out;
}

at::Tensor pool_blocks_cuda(const at::Tensor& scores_in, int64_t block_size) {
  check_pool_args(scores_in, block_size);
  DType dtype;
  switch (scores_in.scalar_type()) {
    case at::kFloat: dtype = DType::kFloat32; break;
    case at::kHalf: dtype = DType::kFloat16; break;
    case at::kBFloat16: dtype = DType::kBFloat16; break;
    default: TORCH_CHECK(false, "lowmem: pool_blocks: CUDA supports float32, float16 and bfloat16 scores, got ",
                         scores_in.scalar_type());
  }
  const c10::cuda::CUDAGuard guard(scores_in.device());
  const at::Tensor scores = scores_in.contiguous();
  auto out = at::empty({scores.size(0), scores.size(1) / block_size}, scores.options().dtype(at::kFloat));
  check_launch(pool_blocks_cuda_launch(dtype, scores.data_ptr(), scores.size(0), scores.size(1), block_size,
                                       out.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()),
               "pool_blocks");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowmem, CUDA, m) {
  m.impl("gather_blocks", &gather_blocks_cuda);
  m.impl("scatter_blocks", &scatter_blocks_cuda);
  m.impl("pool_blocks", &pool_blocks_cuda);
}

}  // namespace lowmem
