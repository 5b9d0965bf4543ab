"""The standard strategy: backward over all micro-batches, clip by the global norm, then the rule steps
over every gradient. Every gradient exists at once; this is the baseline the others are measured against."""

from __future__ import annotations

import math

import torch

STATE_SEPARATOR = "::"


class RuleState:
    """Per-parameter rule state keyed by parameter name, flattened to ``name::key`` for safetensors."""

    def __init__(self, rule):
        self.rule = rule
        self.by_param: dict[str, dict[str, torch.Tensor]] = {}

    def get(self, name: str, param: torch.Tensor) -> dict[str, torch.Tensor]:
        state = self.by_param.get(name)
        if state is None:
            state = {k: v.to(param.device) for k, v in self.rule.init_state(param).items()}
            self.by_param[name] = state
        return state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            f"{name}{STATE_SEPARATOR}{key}": tensor
            for name, state in self.by_param.items()
            for key, tensor in state.items()
        }

    def load_state_dict(self, flat: dict[str, torch.Tensor], params: dict[str, torch.Tensor]) -> None:
        self.by_param = {}
        for full, tensor in flat.items():
            name, key = full.rsplit(STATE_SEPARATOR, 1)
            if name not in params:
                raise ValueError(f"optimizer state names parameter '{name}', which the model does not have")
            self.by_param.setdefault(name, {})[key] = tensor.to(params[name].device)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self.by_param.values() for t in s.values())


class StandardStrategy:
    name = "standard"

    def __init__(self, model: torch.nn.Module, rule, update_config):
        self.rule = rule
        self.clip_grad_norm = update_config.clip_grad_norm
        # named_parameters() yields a tied weight once, so it is updated once.
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.state = RuleState(rule)
        self.lr = 0.0

    def prepare(self, lr: float) -> None:
        self.lr = lr

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> dict[str, float]:
        with_grad = {n: p for n, p in self.params.items() if p.grad is not None}
        grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in with_grad.values())
        # max_norm=inf measures the norm without scaling anything.
        max_norm = self.clip_grad_norm if self.clip_grad_norm is not None else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(list(with_grad.values()), max_norm) if with_grad else torch.zeros(())
        with torch.no_grad():
            for name, param in with_grad.items():
                self.rule.update(param, param.grad, self.state.get(name, param), self.lr)
                param.grad = None
        return {"grad_norm": float(grad_norm), "grad_bytes_peak": grad_bytes, "state_bytes": self.state.nbytes()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.state.state_dict()

    def load_state_dict(self, flat: dict[str, torch.Tensor]) -> None:
        self.state.load_state_dict(flat, self.params)

    def state_bytes(self) -> int:
        return self.state.nbytes()
