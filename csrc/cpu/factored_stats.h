// The factored rules' second-moment statistics of a gradient on CPU, shared by factored_update_ (update.cpp) and
// int8_factored_prepare (int8_update.cpp) so both sum alike.
#pragma once

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "grad_rows.h"

namespace lowmem {

// For each of `batch` rows × cols matrices of grad (dense or row-sparse: GradRows): one pass for the means of
// (s·g)² + eps1 by row (summed in double, in vector lanes) and by column (per-worker double accumulators, added in
// worker order), eps1 added to each mean rather than to each term (the same mean; a zero row then adds exactly
// nothing to the column sums, so a row-sparse gradient's zero rows are passed over), folded into row and col with
// weight
// `keep` (β₂ₜ) on the old value; then r_i = 1 / √(row_i / mean(row)) into r_factor (batch × rows) and
// c_j = 1 / √col_j into c_factor (batch × cols).
template <typename g_t>
void factored_statistics(const GradRows<g_t>& grad, float* row, float* col, int64_t batch, int64_t rows, int64_t cols,
                         float grad_scale, float eps1, float keep, float* r_factor, float* c_factor) {
  const float take = static_cast<float>(1.0 - keep);
  const int n_threads = at::get_num_threads();
  std::vector<double> col_acc(static_cast<size_t>(n_threads) * batch * cols, 0.0);
  at::parallel_for(0, batch * rows, 1, [&](int64_t begin, int64_t end) {
    double* mine = col_acc.data() + static_cast<size_t>(at::get_thread_num()) * batch * cols;
    for (int64_t br = begin; br < end; ++br) {
      const int64_t b = br / rows;
      double sum = 0.0;  // a zero row's: its squares add +0 to every sum, which leaves them as they are
      if (!grad.absent(br)) {
        const g_t* g_row = grad.row(br);
        double* acc = mine + b * cols;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < cols; ++j) {
          const float g = static_cast<float>(g_row[j]) * grad_scale;
          const float sq = g * g;
          sum += sq;
          acc[j] += sq;
        }
      }
      row[br] = row[br] * keep + take * static_cast<float>(sum / cols + eps1);
    }
  });
  for (int64_t k = 0; k < batch * cols; ++k) {
    double sum = 0.0;
    for (int t = 0; t < n_threads; ++t) sum += col_acc[static_cast<size_t>(t) * batch * cols + k];
    col[k] = col[k] * keep + take * static_cast<float>(sum / rows + eps1);
  }
  for (int64_t b = 0; b < batch; ++b) {
    double row_sum = 0.0;
    for (int64_t i = 0; i < rows; ++i) row_sum += row[b * rows + i];
    const float row_mean = static_cast<float>(row_sum / rows);
    for (int64_t i = 0; i < rows; ++i) r_factor[b * rows + i] = 1.f / std::sqrt(row[b * rows + i] / row_mean);
  }
  for (int64_t k = 0; k < batch * cols; ++k) c_factor[k] = 1.f / std::sqrt(col[k]);
}

}  // namespace lowmem
