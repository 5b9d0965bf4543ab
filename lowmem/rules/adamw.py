"""AdamW, the baseline: follows torch.optim.AdamW (single-tensor path) operation for operation."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowmem.ops.update import in_slices, math_dtype, scaled_grad


@dataclass
class AdamW:
    """Decoupled weight decay Adam; float32 moments (8 bytes per parameter), math in float32 (float64 for float64
    weights: :func:`lowmem.ops.update.math_dtype`).

    Weights in bfloat16/float16 are updated in float32 and written back (no master copy: small updates
    may round away, which is the price of 2-byte weights; later rules add stochastic rounding).
    """

    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    name: str = "adamw"

    @classmethod
    def from_config(cls, update) -> "AdamW":
        return cls(beta1=update.beta1, beta2=update.beta2, eps=update.eps, weight_decay=update.weight_decay)

    def init_state(self, param: torch.Tensor, name: str = "") -> dict[str, torch.Tensor]:
        dtype = math_dtype(param.dtype)
        return {
            # made where the weight is: made on the host and moved, it would be a synchronizing copy inside a step
            "step": torch.zeros((), dtype=torch.float32, device=param.device),
            "exp_avg": torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format),
        }

    @torch.no_grad()
    def update(self, param: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor], lr: float,
               grad_scale: float | torch.Tensor = 1.0) -> None:
        # The step count stays a tensor on the parameter's device and the bias corrections are computed there, in
        # float64 as torch.optim.AdamW computes them on the host: reading the count on the host would stall the
        # device once per tensor. The update is torch's ``param.addcdiv_(exp_avg, denom, value=-step_size)``
        # written with a device-side step size (same operations and rounding, and lr = 0 stays exact).
        # Element-wise, so it runs in slices (``in_slices``): its float32 temporaries exist one slice at a time.
        state["step"] += 1
        step = state["step"].double()
        bias_correction1 = 1 - torch.pow(self.beta1, step)
        bias_correction2 = 1 - torch.pow(self.beta2, step)
        for p, g, exp_avg, exp_avg_sq in in_slices(param, grad, state["exp_avg"], state["exp_avg_sq"]):
            work = p if p.dtype == exp_avg.dtype else p.to(exp_avg.dtype)
            g = scaled_grad(g, grad_scale, exp_avg.dtype)
            work.mul_(1 - lr * self.weight_decay)
            exp_avg.lerp_(g, 1 - self.beta1)
            exp_avg_sq.mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
            denom = (exp_avg_sq.sqrt() / bias_correction2.sqrt()).add_(self.eps)
            work.add_(torch.div(exp_avg, denom, out=denom).mul_(-lr / bias_correction1))
            if work is not p:
                p.copy_(work)
