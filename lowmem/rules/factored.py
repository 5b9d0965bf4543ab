"""Adafactor (Shazeer & Stern 2018) and AdaLomo (Lv et al. 2023): factored second moments.

A matrix keeps row and column means of g² + ε₁ (O(n + m) floats instead of O(nm)), a vector its full
second moment; the update is clipped to RMS d and scaled by max(ε₂, RMS(θ)). AdaLomo is this rule with
no first moment and an external learning rate, which is what makes it fit LOMO's fused backward: its
state is tiny and needs only the tensor's own gradient.

Conventions (each tested against the implementation named):
    second moment, ε₁ added to g², update clipping, α-scaled weight decay, first moment ``beta1``:
        transformers' ``Adafactor``;
    ``relative_step``: ρₜ = min(lr, 1/√t): ``torch.optim.Adafactor`` (transformers' relative_step is
        the same with lr = 1e-2);
    ``scale_parameter``: α = ρ·max(ε₂, RMS(θ)): both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from lowmem.ops.update import factored_shapes, factored_update_, math_dtype
from lowmem.ops.update_rows import factored_update_rows_


@dataclass
class Factored:
    relative_step: bool = False
    scale_parameter: bool = True
    beta1: Optional[float] = None
    clip_threshold: float = 1.0
    decay_rate: float = -0.8
    eps1: float = 1e-30
    eps2: float = 1e-3
    weight_decay: float = 0.0
    name: str = "adafactor"

    def init_state(self, param: torch.Tensor, name: str = "") -> dict[str, torch.Tensor]:
        row_shape, col_shape = factored_shapes(param.shape)
        dtype = math_dtype(param.dtype)
        state = {
            # made where the weight is: made on the host and moved, it would be a synchronizing copy inside a step
            "step": torch.zeros((), dtype=torch.float32, device=param.device),
            "exp_avg_sq_row": torch.zeros(row_shape, dtype=dtype, device=param.device),
            "exp_avg_sq_col": torch.zeros(col_shape, dtype=dtype, device=param.device),
        }
        if self.beta1 is not None:
            state["exp_avg"] = torch.zeros(param.shape, dtype=dtype, device=param.device)
        return state

    @torch.no_grad()
    def update(self, param: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor], lr: float,
               grad_scale: float | torch.Tensor = 1.0) -> None:
        # The step count stays on the device; β₂ₜ and ρₜ are derived from it there by the op.
        state["step"] += 1
        exp_avg = state.get("exp_avg")
        if exp_avg is None:
            exp_avg = param.new_empty((0,), dtype=state["exp_avg_sq_row"].dtype)
        factored_update_(
            param, grad, state["exp_avg_sq_row"], state["exp_avg_sq_col"], exp_avg, step=state["step"],
            grad_scale=grad_scale, lr=lr, relative_step=self.relative_step, decay_rate=self.decay_rate,
            eps1=self.eps1, clip_threshold=self.clip_threshold, eps2=self.eps2,
            scale_parameter=self.scale_parameter, weight_decay=self.weight_decay, beta1=self.beta1 or 0.0,
        )


    # what is the same on every rank when the parameter is sharded by rows (lowmem.distributed): the rest is sharded
    replicated_state = ("step", "exp_avg_sq_col")

    def update_sharded(self, param, grad: torch.Tensor, state: dict[str, torch.Tensor], lr: float,
                       grad_scale: float | torch.Tensor = 1.0) -> None:
        """:meth:`update` of a DTensor parameter sharded by rows, from this rank's shard of the reduced gradient:
        the whole-tensor statistics summed over the ranks (``lowmem.distributed.factored``)."""
        from lowmem.distributed.factored import sharded_factored_update_

        sharded_factored_update_(self, param, grad, state, lr, grad_scale)

    @property
    def row_sparse_exact(self) -> bool:
        """Without a first moment a zero gradient row only decays (and adds ε₁ to the statistics): the update from
        the rows of the batch's tokens equals the dense one. A first moment keeps moving every row."""
        return self.beta1 is None

    @torch.no_grad()
    def update_rows(self, param: torch.Tensor, rows: torch.Tensor, values: torch.Tensor, state: dict[str, torch.Tensor],
                    lr: float, grad_scale: float | torch.Tensor = 1.0) -> None:
        """:meth:`update` of a matrix from a row-sparse gradient (``values[p]`` is row ``rows[p]``; other rows zero);
        only without a first moment (:attr:`row_sparse_exact`)."""
        if not self.row_sparse_exact:
            raise ValueError(f"{self.name} with beta1 keeps a first moment: its update needs the dense gradient")
        state["step"] += 1
        factored_update_rows_(
            param, rows, values, state["exp_avg_sq_row"], state["exp_avg_sq_col"], step=state["step"],
            grad_scale=grad_scale, lr=lr, relative_step=self.relative_step, decay_rate=self.decay_rate,
            eps1=self.eps1, clip_threshold=self.clip_threshold, eps2=self.eps2,
            scale_parameter=self.scale_parameter, weight_decay=self.weight_decay,
        )


class Adafactor(Factored):
    @classmethod
    def from_config(cls, update) -> "Adafactor":
        c = update.adafactor
        return cls(relative_step=c.relative_step, scale_parameter=c.scale_parameter, beta1=c.beta1,
                   clip_threshold=c.clip_threshold, decay_rate=c.decay_rate, eps1=c.eps1, eps2=c.eps2,
                   weight_decay=update.weight_decay, name="adafactor")


class AdaLomo(Factored):
    """AdaLomo: no first moment, lr from the schedule, α = lr·max(ε₂, RMS(θ)), θ ← θ(1 − α·wd) − α·u."""

    @classmethod
    def from_config(cls, update) -> "AdaLomo":
        c = update.adalomo
        return cls(relative_step=False, scale_parameter=True, beta1=None, clip_threshold=c.clip_threshold,
                   decay_rate=c.decay_rate, eps1=c.eps1, eps2=c.eps2, weight_decay=update.weight_decay,
                   name="adalomo")
