"""SGD without momentum: LOMO's rule. No state at all, which is what makes fused updates nearly free."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowmem.ops.update import sgd_update_
from lowmem.ops.update_rows import sgd_update_rows_


@dataclass
class SGD:
    """θ ← θ·(1 − lr·wd) − lr·g, in float32, written back in the weight's dtype.

    Without momentum, decoupled weight decay equals torch.optim.SGD's L2 ``weight_decay`` (same math).
    """

    weight_decay: float = 0.0
    name: str = "sgd"
    row_sparse_exact = True  # a zero gradient row steps by nothing: rows of the batch's tokens update exactly

    @classmethod
    def from_config(cls, update) -> "SGD":
        return cls(weight_decay=update.weight_decay)

    def init_state(self, param: torch.Tensor, name: str = "") -> dict[str, torch.Tensor]:
        return {}

    @torch.no_grad()
    def update(self, param: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor], lr: float,
               grad_scale: float | torch.Tensor = 1.0) -> None:
        sgd_update_(param, grad, lr, self.weight_decay, grad_scale)

    @torch.no_grad()
    def update_rows(self, param: torch.Tensor, rows: torch.Tensor, values: torch.Tensor, state: dict[str, torch.Tensor],
                    lr: float, grad_scale: float | torch.Tensor = 1.0) -> None:
        """:meth:`update` from a row-sparse gradient (``values[p]`` is row ``rows[p]``; other rows zero)."""
        sgd_update_rows_(param, rows, values, lr, self.weight_decay, grad_scale)
