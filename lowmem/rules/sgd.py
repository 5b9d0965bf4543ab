"""SGD without momentum: LOMO's rule. No state at all, which is what makes fused updates nearly free."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SGD:
    """θ ← θ·(1 − lr·wd) − lr·g, in float32, written back in the weight's dtype.

    Without momentum, decoupled weight decay equals torch.optim.SGD's L2 ``weight_decay`` (same math).
    """

    weight_decay: float = 0.0
    name: str = "sgd"

    @classmethod
    def from_config(cls, update) -> "SGD":
        return cls(weight_decay=update.weight_decay)

    def init_state(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    @torch.no_grad()
    def update(self, param: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor], lr: float) -> None:
        work = param if param.dtype == torch.float32 else param.float()
        if self.weight_decay:
            work.mul_(1 - lr * self.weight_decay)
        work.add_(grad.to(torch.float32), alpha=-lr)
        if work is not param:
            param.copy_(work)
