// Token-block gather, scatter and pooling for LeMo's token elimination: CUDA kernels against raw pointers and a
// stream. Specification: lowmem/ops/blocks.py; the binding is blocks_binding.cpp.
//
// Gather and scatter are copies of whole segments (a kept block's block_size rows, or the tail): one CUDA block per
// segment, moving the widest word (16, 8, 4, 2 or 1 bytes) that divides the row size and both base addresses, so
// any dtype is copied bit for bit. Block indices are read on the device: the host never waits for them.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "dtype.cuh"
#include "launch.h"

namespace lowmem {
namespace {

constexpr int kThreads = 256;

struct Segments {
  int64_t batch, x_batch, length, full_blocks, kept, block_size, rows, row_words;
};

template <typename Word>
__global__ void copy_segments_kernel(bool to_packed, Word* __restrict__ dst, const Word* __restrict__ src,
                                     const int64_t* __restrict__ blocks, Segments s) {
  const int64_t segments = s.kept + (s.rows > s.kept * s.block_size ? 1 : 0);
  const int64_t b = blockIdx.x / segments, k = blockIdx.x % segments;
  const bool is_tail = k == s.kept;
  int64_t full_row = s.full_blocks * s.block_size;
  if (!is_tail) {
    const int64_t block = blocks[b * s.kept + k];
    if (block < 0 || block >= s.full_blocks) __trap();  // an index the host could not check without waiting
    full_row = block * s.block_size;
  }
  const int64_t full_batch = s.x_batch == 1 ? 0 : b;
  const int64_t full = (full_batch * s.length + full_row) * s.row_words;
  const int64_t packed = (b * s.rows + k * s.block_size) * s.row_words;
  const int64_t words = (is_tail ? s.rows - s.kept * s.block_size : s.block_size) * s.row_words;
  Word* out = dst + (to_packed ? packed : full);
  const Word* in = src + (to_packed ? full : packed);
  for (int64_t i = threadIdx.x; i < words; i += blockDim.x) out[i] = in[i];
}

template <typename Word>
int launch_copy(bool to_packed, void* dst, const void* src, const int64_t* blocks, Segments s, cudaStream_t stream) {
  const int64_t grid = s.batch * (s.kept + (s.rows > s.kept * s.block_size ? 1 : 0));
  if (grid == 0 || s.row_words == 0) return 0;
  copy_segments_kernel<Word><<<grid, kThreads, 0, stream>>>(to_packed, static_cast<Word*>(dst),
                                                            static_cast<const Word*>(src), blocks, s);
  return static_cast<int>(cudaGetLastError());
}

// One thread per (sequence, block): the block's scores summed in double in token order, as the CPU kernel does.
template <typename T>
__global__ void pool_kernel(const T* __restrict__ scores, int64_t batch, int64_t length, int64_t block_size,
                            float* __restrict__ out) {
  const int64_t n_blocks = length / block_size;
  const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (i >= batch * n_blocks) return;
  const T* block = scores + (i / n_blocks) * length + (i % n_blocks) * block_size;
  double sum = 0.0;
  for (int64_t j = 0; j < block_size; ++j) sum += static_cast<double>(to_float(block[j]));
  out[i] = static_cast<float>(sum);
}

template <typename T>
int launch_pool(const void* scores, int64_t batch, int64_t length, int64_t block_size, float* out,
                cudaStream_t stream) {
  const int64_t n = batch * (length / block_size);
  if (n == 0) return 0;
  pool_kernel<T><<<(n + kThreads - 1) / kThreads, kThreads, 0, stream>>>(static_cast<const T*>(scores), batch, length,
                                                                         block_size, out);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int copy_token_blocks_cuda_launch(bool to_packed, void* dst, const void* src, const int64_t* blocks, int64_t batch,
                                  int64_t x_batch, int64_t length, int64_t full_blocks, int64_t kept, int64_t block_size,
                                  int64_t row_bytes, cudaStream_t stream) {
  const int64_t rows = kept * block_size + (length - full_blocks * block_size);
  const auto aligned = [&](int64_t word) {
    return row_bytes % word == 0 && reinterpret_cast<uintptr_t>(dst) % word == 0 &&
           reinterpret_cast<uintptr_t>(src) % word == 0;
  };
  const auto segments = [&](int64_t word) {
    return Segments{batch, x_batch, length, full_blocks, kept, block_size, rows, row_bytes / word};
  };
  if (aligned(16)) return launch_copy<uint4>(to_packed, dst, src, blocks, segments(16), stream);
  if (aligned(8)) return launch_copy<uint2>(to_packed, dst, src, blocks, segments(8), stream);
  if (aligned(4)) return launch_copy<uint32_t>(to_packed, dst, src, blocks, segments(4), stream);
  if (aligned(2)) return launch_copy<uint16_t>(to_packed, dst, src, blocks, segments(2), stream);
  return launch_copy<uint8_t>(to_packed, dst, src, blocks, segments(1), stream);
}

int pool_blocks_cuda_launch(DType dtype, const void* scores, int64_t batch, int64_t length, int64_t block_size,
                            float* out, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return launch_pool<float>(scores, batch, length, block_size, out, stream);
    case DType::kFloat16: return launch_pool<__half>(scores, batch, length, block_size, out, stream);
    case DType::kBFloat16: return launch_pool<__nv_bfloat16>(scores, batch, length, block_size, out, stream);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace lowmem
