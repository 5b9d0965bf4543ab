// Token-block gather, scatter and pooling for LeMo's token elimination: CPU kernels.
//
// Specification: lowmem/ops/blocks.py (gather_blocks_ref, scatter_blocks_ref, pool_blocks_ref). Gather and scatter
// are byte copies of whole blocks (one memcpy of block_size rows per kept block, one for the tail), so every dtype
// is copied exactly; pooling sums each block in double in token order and rounds once to float32.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstring>

#include "../torch_utils.h"

namespace lowmem {

namespace {

// Copies every kept segment of every sequence between the full tensor and the packed one, in either direction.
void copy_segments(bool to_packed, char* dst, const char* src, const int64_t* blocks, const TokenBlocks& t,
                   int64_t block_size) {
  const int64_t segments = t.kept + (t.tail > 0 ? 1 : 0);
  at::parallel_for(0, t.batch * segments, 1, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      const int64_t b = s / segments, k = s % segments;
      const bool is_tail = k == t.kept;
      const int64_t full_row = is_tail ? t.full_blocks * block_size : blocks[b * t.kept + k] * block_size;
      const int64_t packed_row = b * t.rows + k * block_size;
      const int64_t full_batch = t.x_batch == 1 ? 0 : b;  // a broadcast x (gather only: scatter checks batch)
      const int64_t full = (full_batch * t.length + full_row) * t.row_bytes, packed = packed_row * t.row_bytes;
      const int64_t bytes = (is_tail ? t.tail : block_size) * t.row_bytes;
      if (to_packed) {
        std::memcpy(dst + packed, src + full, bytes);
      } else {
        std::memcpy(dst + full, src + packed, bytes);
      }
    }
  });
}

void check_block_indices(const at::Tensor& blocks, const TokenBlocks& t, const char* op) {
  const int64_t* p = blocks.data_ptr<int64_t>();
  for (int64_t i = 0; i < blocks.numel(); ++i) {
    TORCH_CHECK(p[i] >= 0 && p[i] < t.full_blocks, "lowmem: ", op, ": block index ", p[i], " is outside [0, ",
                t.full_blocks, ")");
  }
}

}  // namespace

at::Tensor gather_blocks_cpu(const at::Tensor& x, const at::Tensor& blocks, int64_t block_size) {
  const TokenBlocks t = check_token_blocks(x, blocks, block_size, "gather_blocks");
  check_block_indices(blocks, t, "gather_blocks");
  auto out = at::empty(packed_shape(x, t), x.options());
  copy_segments(true, static_cast<char*>(out.data_ptr()), static_cast<const char*>(x.data_ptr()),
                blocks.data_ptr<int64_t>(), t, block_size);
  return out;
}

at::Tensor scatter_blocks_cpu(const at::Tensor& base, const at::Tensor& src, const at::Tensor& blocks,
                              int64_t block_size) {
  const TokenBlocks t = check_token_blocks(base, blocks, block_size, "scatter_blocks");
  check_scatter_src(base, src, t);
  check_block_indices(blocks, t, "scatter_blocks");
  auto out = base.clone();
  copy_segments(false, static_cast<char*>(out.data_ptr()), static_cast<const char*>(src.data_ptr()),
                blocks.data_ptr<int64_t>(), t, block_size);
  return out;
}

at::Tensor pool_blocks_cpu(const at::Tensor& scores_in, int64_t block_size) {
  check_pool_args(scores_in, block_size);
  const at::Tensor scores = scores_in.contiguous();
  const int64_t batch = scores.size(0), length = scores.size(1), n_blocks = length / block_size;
  auto out = at::empty({batch, n_blocks}, scores.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "pool_blocks_cpu", [&] {
    const scalar_t* s = scores.data_ptr<scalar_t>();
    at::parallel_for(0, batch * n_blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t* block = s + (i / n_blocks) * length + (i % n_blocks) * block_size;
        double sum = 0.0;
        for (int64_t j = 0; j < block_size; ++j) sum += static_cast<double>(static_cast<float>(block[j]));
        o[i] = static_cast<float>(sum);
      }
    });
  });
  return out;
}

TORCH_LIBRARY_IMPL(lowmem, CPU, m) {
  m.impl("gather_blocks", &gather_blocks_cpu);
  m.impl("scatter_blocks", &scatter_blocks_cpu);
  m.impl("pool_blocks", &pool_blocks_cpu);
}

}  // namespace lowmem
