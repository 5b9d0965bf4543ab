// A gradient as the CPU update kernels read it: dense (row i at grad + i·cols), or row-sparse (slot[i] ≥ 0: row i is
// row slot[i] of a compact values matrix; slot[i] < 0: row i is zero). The kernels read both through row(i), so
// an update from a row-sparse gradient runs the very arithmetic, in the very order, of the same update from the
// gradient made dense: their results are the same bits.
#pragma once

#include <cstdint>
#include <vector>

namespace lowmem {

template <typename g_t>
class GradRows {
 public:
  GradRows(const g_t* grad, const int32_t* slot, int64_t cols)
      : grad_(grad), slot_(slot), cols_(cols), zeros_(slot != nullptr ? cols : 0, g_t(0.f)) {}

  const g_t* row(int64_t i) const {
    if (slot_ == nullptr) return grad_ + i * cols_;
    const int32_t s = slot_[i];
    return s < 0 ? zeros_.data() : grad_ + static_cast<int64_t>(s) * cols_;
  }

  bool sparse() const { return slot_ != nullptr; }

  // Row i of a row-sparse gradient is zero (not one of the values' rows).
  bool absent(int64_t i) const { return slot_ != nullptr && slot_[i] < 0; }

 private:
  const g_t* grad_;
  const int32_t* slot_;
  int64_t cols_;
  std::vector<g_t> zeros_;
};

}  // namespace lowmem
