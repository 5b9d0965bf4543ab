"""The standard strategy: backward over all micro-batches, clip by the global norm, then the rule steps
over every gradient. Every gradient exists at once; this is the baseline the others are measured against."""

from __future__ import annotations

import torch

from lowmem.distributed.shard import is_sharded, local
from lowmem.weights.int8 import trainable_tensors
from lowmem.weights.masks import GradientMasks
from lowmem.strategies.state import (
    LossScaler,
    RuleState,
    apply_rule,
    clip_coefficient,
    grad_norm,
    load_strategy_state,
    overflowed,
    strategy_state_dict,
)


class StandardStrategy:
    name = "standard"

    def __init__(self, model: torch.nn.Module, rule, update_config):
        self.rule = rule
        self.clip_grad_norm = update_config.clip_grad_norm
        # Parameters (a tied weight once, so it is updated once) and int8 weights.
        self.params = trainable_tensors(model)
        # FSDP2 (lowmem.distributed): the rule steps on each rank's local shard; the norm sums over the ranks
        self.sharded = any(is_sharded(p) for p in self.params.values())
        self.masks = GradientMasks(model, self.params)  # pruned weights (PERP): updates keep their zeros
        self.state = RuleState(rule)
        self.scaler = LossScaler.for_model(model, update_config)
        self.lr = 0.0

    def prepare(self, lr: float) -> None:
        self.lr = lr

    def backward(self, loss: torch.Tensor) -> None:
        (loss * self.scaler.scale if self.scaler.enabled else loss).backward()

    def step(self) -> dict[str, float | torch.Tensor]:
        with_grad = {n: p for n, p in self.params.items() if p.grad is not None}
        # A pruned weight's gradient is masked before anything reads it: the norm, clipping and the rule's state
        # see only the entries that may change, as they would for a weight parametrized by W ⊙ M.
        if self.masks:
            for n, p in with_grad.items():
                self.masks.mask_grad_(n, p.grad)  # one unpacked mask at a time
        grads = {n: local(p.grad) for n, p in with_grad.items()}
        grad_bytes = sum(g.numel() * g.element_size() for g in grads.values())
        norm = grad_norm(list(grads.values()), across_ranks=self.sharded)
        skipped = False
        if self.scaler.enabled:
            norm = norm / self.scaler.scale
            skipped = overflowed(norm)
        # Unscaling and clipping fold into the rule's own pass: no scaled copy of any gradient is made. The
        # clipping coefficient stays on the device.
        grad_scale = clip_coefficient(norm, self.clip_grad_norm)
        if self.scaler.enabled:
            grad_scale = grad_scale / self.scaler.scale
        with torch.no_grad():
            for name, param in with_grad.items():
                if not skipped:
                    apply_rule(self.rule, param, grads[name], self.state.get(name, param), self.lr, grad_scale,
                               self.masks.get(name, param.grad) if self.masks else None)
                param.grad = None
        self.scaler.update(found_inf=skipped)
        stats = {"grad_norm": norm, "grad_bytes_peak": grad_bytes, "state_bytes": self.state.nbytes()}
        if self.scaler.enabled:
            stats.update(loss_scale=self.scaler.scale, skipped=int(skipped))
        return stats

    def state_dict(self) -> dict[str, torch.Tensor]:
        return strategy_state_dict(self.state, self.scaler)

    def load_state_dict(self, flat: dict[str, torch.Tensor], keep_on_host: bool = False) -> None:
        load_strategy_state(flat, self.state, self.scaler, self.params, keep_on_host)

    def state_bytes(self) -> int:
        return self.state.nbytes()
