// Small helpers for the torch-facing kernel bindings (CPU and CUDA): shared argument checks, so every
// device refuses bad input with the same one-line message.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <vector>

namespace lowmem {

// Runs fn on a contiguous version of param and copies the result back if param was not contiguous, so
// kernels can assume dense row-major memory while callers may pass any strided view.
template <typename Fn>
void on_contiguous(at::Tensor& param, Fn fn) {
  if (param.is_contiguous()) {
    fn(param);
  } else {
    at::Tensor work = param.contiguous();
    fn(work);
    param.copy_(work);
  }
}

// The gradient as the kernels read it: in the weight's dtype when it already is, else as float32 (a float32
// gradient of a bfloat16 weight is read at full precision, never rounded down), contiguous.
inline at::Tensor float_or_same(const at::Tensor& grad, const at::Tensor& param) {
  return (grad.scalar_type() == param.scalar_type() ? grad : grad.to(at::kFloat)).contiguous();
}

// A 0-d float32 scalar argument (gradient scale, step count) that lives on the param's device.
inline void check_scalar(const at::Tensor& t, const at::Tensor& param, const char* op, const char* name) {
  TORCH_CHECK(t.numel() == 1 && t.scalar_type() == at::kFloat, "lowmem: ", op, ": ", name,
              " must be one float32 value, got ", t.numel(), " of ", t.scalar_type());
  TORCH_CHECK(t.device() == param.device(), "lowmem: ", op, ": ", name, " is on ", t.device(), ", param on ",
              param.device(), " (pass it on the param's device)");
}

// Its value, for a CPU kernel (host memory: no device is waited for).
inline float host_scalar(const at::Tensor& t, const at::Tensor& param, const char* op, const char* name) {
  check_scalar(t, param, op, name);
  return *t.data_ptr<float>();
}

// Its address, for a CUDA kernel to read on the device.
inline const float* device_scalar(const at::Tensor& t, const at::Tensor& param, const char* op, const char* name) {
  check_scalar(t, param, op, name);
  return t.data_ptr<float>();
}

// The blockwise quantization layout: one absmax per block of blocksize > 0 values, on the data's device.
inline void check_blocks(int64_t n, const at::Tensor& absmax, int64_t blocksize, const at::Tensor& like, const char* op) {
  TORCH_CHECK(blocksize > 0, "lowmem: ", op, ": blocksize must be positive, got ", blocksize);
  TORCH_CHECK(absmax.numel() == (n + blocksize - 1) / blocksize, "lowmem: ", op, ": absmax must hold one value per block of ",
              blocksize, " (", (n + blocksize - 1) / blocksize, "), got ", absmax.numel());
  TORCH_CHECK(absmax.device() == like.device(), "lowmem: ", op, ": absmax is on ", absmax.device(), ", data on ",
              like.device());
}

// The 256-entry float32 code map, on the data's device.
inline void check_code(const at::Tensor& code, const at::Tensor& like, const char* op) {
  TORCH_CHECK(code.scalar_type() == at::kFloat && code.numel() == 256, "lowmem: ", op,
              ": code must be a float32 tensor of 256 values");
  TORCH_CHECK(code.device() == like.device(), "lowmem: ", op, ": code is on ", code.device(), ", data on ",
              like.device());
}

// The gradient matches the param in size and device.
inline void check_grad(const at::Tensor& param, const at::Tensor& grad, const char* op) {
  TORCH_CHECK(param.numel() == grad.numel(), "lowmem: ", op, ": grad has ", grad.numel(), " elements, param ",
              param.numel());
  TORCH_CHECK(grad.device() == param.device(), "lowmem: ", op, ": grad is on ", grad.device(), ", param on ",
              param.device());
}

// A row-sparse gradient of a matrix param (rows × cols): values (k × cols) and slot (rows int32: row i's gradient is
// values[slot[i]], or zero where slot[i] < 0). Values past the slots' reach are not read; the CPU binding checks each
// slot is below k (CUDA cannot without waiting for the device: lowmem/ops/update.py builds the slots).
inline void check_rows_args(const at::Tensor& param, const at::Tensor& slot, const at::Tensor& values, const char* op) {
  TORCH_CHECK(param.dim() == 2, "lowmem: ", op, ": a row-sparse gradient needs a matrix param, got ", param.dim(),
              " dims");
  TORCH_CHECK(slot.scalar_type() == at::kInt && slot.is_contiguous() && slot.dim() == 1 &&
                  slot.numel() == param.size(0), "lowmem: ", op, ": slot must be contiguous int32 with one entry per "
              "row (", param.size(0), "), got ", slot.sizes(), " ", slot.scalar_type());
  TORCH_CHECK(values.dim() == 2 && values.size(1) == param.size(1), "lowmem: ", op, ": values must be k × ",
              param.size(1), ", got ", values.sizes());
  TORCH_CHECK(values.size(0) < (int64_t{1} << 31), "lowmem: ", op, ": more than 2^31 - 1 gradient rows");
  TORCH_CHECK(slot.device() == param.device() && values.device() == param.device(), "lowmem: ", op,
              ": slot and values must be on the param's device (", param.device(), ")");
}

// A factored step's view of the param: batch × rows × cols for a matrix (or stack of matrices), else a vector.
struct FactoredShape {
  int64_t batch, rows, cols;
  bool factored;
};

// Everything factored_update_ needs of its tensors besides the scalars, with the param's shape as the kernels see it.
inline FactoredShape check_factored_args(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& row,
                                         const at::Tensor& col, const at::Tensor& exp_avg,
                                         const char* op = "factored_update_") {
  if (grad.defined()) check_grad(param, grad, op);  // undefined: a row-sparse gradient, checked by check_rows_args
  TORCH_CHECK(row.scalar_type() == at::kFloat && row.is_contiguous() && col.scalar_type() == at::kFloat &&
                  col.is_contiguous(), "lowmem: ", op, ": row/col state must be contiguous float32");
  TORCH_CHECK(row.device() == param.device() && col.device() == param.device(), "lowmem: ", op,
              ": row/col state must be on the param's device (", param.device(), ")");
  const bool factored = col.numel() > 0;
  const int64_t cols = factored ? param.size(-1) : 1;
  const int64_t rows = factored ? param.size(-2) : 1;
  const int64_t batch = factored ? param.numel() / std::max<int64_t>(rows * cols, 1) : param.numel();
  TORCH_CHECK(!factored || (param.dim() >= 2 && row.numel() == batch * rows && col.numel() == batch * cols), "lowmem: ",
              op, ": row/col state hold ", row.numel(), "/", col.numel(), " values, the param needs ", batch * rows, "/",
              batch * cols);
  TORCH_CHECK(factored || row.numel() == param.numel(), "lowmem: ", op, ": the second moment of a vector holds ",
              row.numel(), " values, the param ", param.numel());
  TORCH_CHECK(exp_avg.numel() == 0 || (exp_avg.numel() == param.numel() && exp_avg.scalar_type() == at::kFloat &&
                                       exp_avg.is_contiguous() && exp_avg.device() == param.device()),
              "lowmem: ", op, ": exp_avg must be empty or match the param (float32, contiguous, same size and device)");
  return {batch, rows, cols, factored};
}

// Everything lion8bit_update_ needs of its tensors besides the scalar: sizes, dtypes, layout and devices.
inline void check_lion8bit_args(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& codes,
                                const at::Tensor& absmax, const at::Tensor& code, int64_t blocksize) {
  const char* op = "lion8bit_update_";
  check_grad(param, grad, op);
  TORCH_CHECK(codes.numel() == param.numel() && codes.device() == param.device(), "lowmem: ", op, ": codes (",
              codes.numel(), " on ", codes.device(), ") must match the param (", param.numel(), " on ", param.device(), ")");
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous(), "lowmem: ", op, ": codes must be contiguous uint8");
  check_blocks(param.numel(), absmax, blocksize, param, op);
  TORCH_CHECK(absmax.scalar_type() == at::kFloat && absmax.is_contiguous(), "lowmem: ", op,
              ": absmax must be contiguous float32");
  check_code(code, param, op);
}

// The int8 weight as the fused update sees it: n values in rows × cols (cols: the gradient's last dimension).
struct Int8Shape {
  int64_t rows, cols;
};

// Everything int8_update_ needs of its tensors besides the scalars (lowmem/ops/int8_update.py).
inline Int8Shape check_int8_update_args(const at::Tensor& codes, const at::Tensor& absmax, const at::Tensor& outlier_index,
                                        const at::Tensor& outlier_value, const at::Tensor& grad, const at::Tensor& mask,
                                        const at::Tensor& state, const at::Tensor& state_absmax,
                                        const at::Tensor& state_code, const at::Tensor& coef, int64_t rule,
                                        int64_t blocksize) {
  const char* op = "int8_update_";
  const int64_t n = codes.numel();
  TORCH_CHECK(rule >= 0 && rule <= 4, "lowmem: ", op, ": unknown rule ", rule);
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous(), "lowmem: ", op, ": codes must be contiguous uint8");
  check_blocks(n, absmax, blocksize, codes, op);
  TORCH_CHECK(absmax.scalar_type() == at::kFloat && absmax.is_contiguous(), "lowmem: ", op,
              ": absmax must be contiguous float32");
  TORCH_CHECK(outlier_index.scalar_type() == at::kInt && outlier_value.scalar_type() == at::kFloat &&
                  outlier_index.is_contiguous() && outlier_value.is_contiguous() &&
                  outlier_index.numel() == outlier_value.numel() && outlier_index.numel() <= n &&
                  outlier_index.device() == codes.device() && outlier_value.device() == codes.device(),
              "lowmem: ", op, ": outliers must be as many contiguous int32 positions as float32 values, on the codes' device");
  TORCH_CHECK(n < (int64_t{1} << 31), "lowmem: ", op, ": ", n, " values exceed int32 outlier positions");
  TORCH_CHECK(grad.numel() == n && grad.device() == codes.device(), "lowmem: ", op, ": grad has ", grad.numel(),
              " elements on ", grad.device(), ", the weight ", n, " on ", codes.device());
  TORCH_CHECK(mask.numel() == 0 || (mask.numel() == n && mask.scalar_type() == at::kBool && mask.is_contiguous() &&
                                    mask.device() == codes.device()),
              "lowmem: ", op, ": mask must be empty or a contiguous bool tensor of the weight's size and device");
  const int64_t cols = grad.dim() >= 2 ? grad.size(-1) : std::max<int64_t>(n, 1);
  const int64_t rows = n / std::max<int64_t>(cols, 1);
  if (rule == 1 || rule == 2) {  // factored (optional first moment), lion: float32 state of the weight's size
    TORCH_CHECK((rule == 1 && state.numel() == 0) || (state.numel() == n && state.scalar_type() == at::kFloat &&
                                                      state.is_contiguous() && state.device() == codes.device()),
                "lowmem: ", op, ": state must be a contiguous float32 tensor of the weight's size and device");
  }
  if (rule == 1) {
    TORCH_CHECK(grad.dim() == 2 && coef.numel() == rows + cols + 2 && coef.scalar_type() == at::kFloat &&
                    coef.is_contiguous() && coef.device() == codes.device(),
                "lowmem: ", op, ": the factored rule needs a 2-D gradient and rows + cols + 2 float32 coefficients");
  }
  if (rule == 3) {
    TORCH_CHECK(state.numel() == n && state.scalar_type() == at::kByte && state.is_contiguous() &&
                    state.device() == codes.device(), "lowmem: ", op, ": lion8bit's momentum codes must match the weight");
    TORCH_CHECK(state_absmax.numel() == absmax.numel() && state_absmax.scalar_type() == at::kFloat &&
                    state_absmax.is_contiguous() && state_absmax.device() == codes.device(),
                "lowmem: ", op, ": lion8bit's momentum blocks must be the weight's (", absmax.numel(), " float32 absmax)");
    check_code(state_code, codes, op);
  }
  return {rows, cols};
}

inline void check_int8_prepare_args(const at::Tensor& codes, const at::Tensor& absmax, const at::Tensor& outlier_value,
                                    const at::Tensor& grad, const at::Tensor& row, const at::Tensor& col,
                                    int64_t blocksize) {
  const char* op = "int8_factored_prepare";
  TORCH_CHECK(grad.dim() == 2 && grad.numel() == codes.numel() && grad.device() == codes.device(), "lowmem: ", op,
              ": grad must be a 2-D matrix of the weight's size and device");
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous(), "lowmem: ", op, ": codes must be contiguous uint8");
  check_blocks(codes.numel(), absmax, blocksize, codes, op);
  TORCH_CHECK(outlier_value.scalar_type() == at::kFloat && outlier_value.is_contiguous() &&
                  outlier_value.device() == codes.device(), "lowmem: ", op, ": outlier values must be contiguous float32");
  TORCH_CHECK(row.scalar_type() == at::kFloat && col.scalar_type() == at::kFloat && row.is_contiguous() &&
                  col.is_contiguous() && row.numel() == grad.size(0) && col.numel() == grad.size(1) &&
                  row.device() == codes.device() && col.device() == codes.device(),
              "lowmem: ", op, ": row/col statistics must be contiguous float32 of ", grad.size(0), "/", grad.size(1),
              " values on the weight's device");
}

// The layout of a token-block gather or scatter (lowmem/ops/blocks.py): x is [x_batch, length, ...] with x_batch
// 1 (broadcast) or batch, blocks [batch, kept] int64; each kept block is block_size rows, then the tail.
struct TokenBlocks {
  int64_t batch, x_batch, length, full_blocks, kept, tail, rows, row_bytes;
};

inline TokenBlocks check_token_blocks(const at::Tensor& x, const at::Tensor& blocks, int64_t block_size, const char* op) {
  TORCH_CHECK(block_size > 0, "lowmem: ", op, ": block_size must be positive, got ", block_size);
  TORCH_CHECK(blocks.scalar_type() == at::kLong && blocks.dim() == 2 && blocks.is_contiguous(), "lowmem: ", op,
              ": blocks must be a contiguous [batch, kept] int64 tensor, got ", blocks.sizes(), " ", blocks.scalar_type());
  TORCH_CHECK(x.dim() >= 2 && x.is_contiguous(), "lowmem: ", op, ": expected a contiguous [batch, seq, ...] tensor, got ",
              x.sizes());
  TORCH_CHECK(blocks.device() == x.device(), "lowmem: ", op, ": blocks are on ", blocks.device(), ", data on ", x.device());
  TokenBlocks t;
  t.batch = blocks.size(0);
  t.x_batch = x.size(0);
  TORCH_CHECK(t.x_batch == t.batch || t.x_batch == 1, "lowmem: ", op, ": data has batch ", t.x_batch, ", blocks ",
              t.batch, " (they must match, or the data's be 1)");
  t.length = x.size(1);
  t.full_blocks = t.length / block_size;
  t.kept = blocks.size(1);
  TORCH_CHECK(t.kept <= t.full_blocks, "lowmem: ", op, ": ", t.kept, " blocks kept of ", t.full_blocks);
  t.tail = t.length - t.full_blocks * block_size;
  t.rows = t.kept * block_size + t.tail;
  t.row_bytes = (t.length > 0 ? x.numel() / (t.x_batch * t.length) : 0) * static_cast<int64_t>(x.element_size());
  return t;
}

// The shape of x's kept rows: [batch, rows, ...].
inline std::vector<int64_t> packed_shape(const at::Tensor& x, const TokenBlocks& t) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape[0] = t.batch;
  shape[1] = t.rows;
  return shape;
}

// scatter_blocks' src: base's kept rows, same dtype and device, contiguous; base is not broadcast.
inline void check_scatter_src(const at::Tensor& base, const at::Tensor& src, const TokenBlocks& t) {
  TORCH_CHECK(t.x_batch == t.batch, "lowmem: scatter_blocks: base has batch ", t.x_batch, ", blocks ", t.batch);
  const std::vector<int64_t> packed = packed_shape(base, t);
  TORCH_CHECK(src.sizes() == at::IntArrayRef(packed) && src.scalar_type() == base.scalar_type() && src.is_contiguous() &&
                  src.device() == base.device(),
              "lowmem: scatter_blocks: src must be contiguous ", base.scalar_type(), " of shape ", at::IntArrayRef(packed),
              " on ", base.device(), ", got ", src.scalar_type(), " of shape ", src.sizes(), " on ", src.device());
}

inline void check_pool_args(const at::Tensor& scores, int64_t block_size) {
  TORCH_CHECK(block_size > 0 && scores.dim() == 2, "lowmem: pool_blocks: expected [batch, seq] scores and a positive "
              "block_size, got ", scores.sizes(), " and ", block_size);
}

}  // namespace lowmem
