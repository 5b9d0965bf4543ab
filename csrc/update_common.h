// Update-rule scalars shared by the CPU and CUDA kernels (host and device), so both derive them alike.
#pragma once

#include <cmath>

#include "quant_common.h"  // LOWMEM_HD

namespace lowmem {

// The step-dependent scalars of one Adafactor/AdaLomo update at step t (already counted): the second-moment
// decay beta2t = 1 - t^decay_rate and the step size rho = min(lr, 1/sqrt(t)) with relative_step, else lr.
// Computed in double and rounded once to float, as lowmem/ops/update.py's reference does.
struct FactoredStep {
  float beta2t, rho;
};

LOWMEM_HD FactoredStep factored_step(double t, double lr, bool relative_step, double decay_rate) {
  const double rho = relative_step ? fmin(lr, 1.0 / sqrt(t)) : lr;
  return {static_cast<float>(1.0 - pow(t, decay_rate)), static_cast<float>(rho)};
}

}  // namespace lowmem
