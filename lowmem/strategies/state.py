"""Per-parameter rule state and the loss scaler: what a strategy checkpoints (flat name → tensor)."""

from __future__ import annotations

import math

import torch

from lowmem.distributed.shard import is_sharded
from lowmem.placement.host_sync import read
from lowmem.weights.int8 import Int8Weight
from lowmem.ops.update import math_dtype

STATE_SEPARATOR = "::"


def apply_rule(rule, param, grad: torch.Tensor, state: dict[str, torch.Tensor], lr: float,
               grad_scale: float | torch.Tensor, mask: torch.Tensor | None = None) -> None:
    """One step of ``rule`` on a parameter, or on an int8 weight (dequantize → step → requantize).

    ``param`` may be an FSDP2 DTensor, with ``grad`` this rank's shard of its reduced gradient.
    ``mask`` (a pruned weight's bool sparsity mask, ``lowmem.weights.masks``): the weight is multiplied by it after the
    step, so its pruned entries stay exactly zero whatever the rule computed (int8: before requantizing)."""
    if isinstance(param, Int8Weight):
        param.update_with(rule, grad, state, lr, grad_scale=grad_scale, mask=mask)
        return
    if is_sharded(param):  # FSDP2: ``grad`` is this rank's shard (lowmem.distributed)
        if hasattr(rule, "update_sharded"):  # whole-tensor statistics, summed over the ranks
            rule.update_sharded(param, grad, state, lr, grad_scale=grad_scale)
        else:  # element-wise: exact on the shard alone
            rule.update(param.to_local(), grad, state, lr, grad_scale=grad_scale)
        return
    rule.update(param, grad, state, lr, grad_scale=grad_scale)
    if mask is not None:
        param.mul_(mask)


class RuleState:
    """Per-parameter rule state keyed by parameter name, flattened to ``name::key`` for safetensors."""

    def __init__(self, rule):
        self.rule = rule
        self.by_param: dict[str, dict[str, torch.Tensor]] = {}

    def get(self, name: str, param: torch.Tensor) -> dict[str, torch.Tensor]:
        state = self.by_param.get(name)
        if state is None:
            if is_sharded(param):  # this rank's share: the rule's own layout, or the local shard's state
                init = getattr(self.rule, "init_state_sharded", None)
                made = init(param, name) if init is not None else self.rule.init_state(param.to_local(), name)
                state = {k: v.to(param.to_local().device) for k, v in made.items()}
            else:
                like = param.template() if isinstance(param, Int8Weight) else param
                state = {k: v.to(param.device) for k, v in self.rule.init_state(like, name).items()}
            self.by_param[name] = state
        return state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            f"{name}{STATE_SEPARATOR}{key}": tensor
            for name, state in self.by_param.items()
            for key, tensor in state.items()
        }

    def load_state_dict(self, flat: dict[str, torch.Tensor], params: dict[str, torch.Tensor],
                        keep_on_host: bool = False) -> None:
        """Load ``flat`` onto each parameter's device, or leave it where it was loaded (``keep_on_host``: the
        residency scheduler places it)."""
        self.by_param = {}
        for full, tensor in flat.items():
            name, key = full.rsplit(STATE_SEPARATOR, 1)
            if name not in params:
                raise ValueError(f"optimizer state names parameter '{name}', which the model does not have")
            self.by_param.setdefault(name, {})[key] = tensor if keep_on_host else tensor.to(params[name].device)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self.by_param.values() for t in s.values())


class LossScaler:
    """Dynamic loss scaling for float16 weights: the loss is multiplied by ``scale`` so small gradients do
    not flush to zero; a step whose gradients overflow is skipped and the scale halved; after
    ``growth_interval`` good steps in a row it doubles again. Disabled (scale 1) for other dtypes."""

    PREFIX = "__loss_scaler__"

    def __init__(self, enabled: bool, init_scale: float = 65536.0, growth_interval: int = 1000, min_scale: float = 1.0):
        self.enabled = enabled
        self.scale = init_scale if enabled else 1.0
        self.growth_interval = growth_interval
        self.min_scale = min_scale
        self.good_steps = 0

    @classmethod
    def for_model(cls, model: torch.nn.Module, update_config) -> "LossScaler":
        enabled = any(p.dtype == torch.float16 for p in model.parameters() if p.requires_grad)
        c = update_config.loss_scale
        return cls(enabled, c.init_scale, c.growth_interval, c.min_scale)

    def update(self, found_inf: bool) -> None:
        if not self.enabled:
            return
        if found_inf:
            self.scale = max(self.min_scale, self.scale / 2)
            self.good_steps = 0
            return
        self.good_steps += 1
        if self.good_steps % self.growth_interval == 0:
            self.scale *= 2

    def state_dict(self) -> dict[str, torch.Tensor]:
        if not self.enabled:
            return {}
        return {f"{self.PREFIX}{STATE_SEPARATOR}scale": torch.tensor(self.scale, dtype=torch.float64),
                f"{self.PREFIX}{STATE_SEPARATOR}good_steps": torch.tensor(self.good_steps, dtype=torch.int64)}

    def load_state_dict(self, flat: dict[str, torch.Tensor]) -> None:
        key = f"{self.PREFIX}{STATE_SEPARATOR}"
        if f"{key}scale" in flat:
            self.scale = float(flat[f"{key}scale"])
            self.good_steps = int(flat[f"{key}good_steps"])


def strategy_state_dict(rule_state: RuleState, scaler: LossScaler) -> dict[str, torch.Tensor]:
    """What a strategy checkpoints: its rule state and its loss scaler, as one flat dict."""
    return {**rule_state.state_dict(), **scaler.state_dict()}


def load_strategy_state(flat: dict[str, torch.Tensor], rule_state: RuleState, scaler: LossScaler,
                        params: dict[str, torch.Tensor], keep_on_host: bool = False) -> None:
    """Inverse of :func:`strategy_state_dict`."""
    prefix = LossScaler.PREFIX + STATE_SEPARATOR
    scaler.load_state_dict({k: v for k, v in flat.items() if k.startswith(prefix)})
    rule_state.load_state_dict({k: v for k, v in flat.items() if not k.startswith(prefix)}, params, keep_on_host)


def grad_norm(grads, across_ranks: bool = False) -> torch.Tensor:
    """Global L2 norm of ``grads`` in float32 (float64 when one is float64: ``math_dtype``), the norm of per-tensor
    norms as torch's clip_grad_norm_, on their device: never read on the host here. ``across_ranks``: ``grads`` are
    this rank's shards, and the squares are summed over the ranks (an all-reduce of one number)."""
    norms = [torch.linalg.vector_norm(g, 2, dtype=math_dtype(g.dtype)) for g in grads]
    norm = torch.linalg.vector_norm(stacked(norms), 2) if norms else torch.zeros(())
    return norm_over_ranks(norm) if across_ranks else norm


def norm_over_ranks(norm: torch.Tensor) -> torch.Tensor:
    """The norm of a tensor sharded over the ranks, from this rank's shard's ``norm``: the squares summed over the
    ranks (an all-reduce of one number)."""
    squares = norm.square()
    torch.distributed.all_reduce(squares)
    return squares.sqrt()


def stacked(scalars: list[torch.Tensor]) -> torch.Tensor:
    """0-d tensors stacked in the widest of their dtypes (a float64 model's norms beside float32 adapters')."""
    dtype = scalars[0].dtype
    for t in scalars[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return torch.stack([t.to(dtype) for t in scalars])


def clip_coefficient(norm: torch.Tensor, max_norm: float | None) -> torch.Tensor | float:
    """torch's clip_grad_norm_ coefficient min(1, max_norm / (norm + 1e-6)), computed on the norm's device (1
    where the norm is not finite); the number 1.0 without clipping."""
    if max_norm is None:
        return 1.0
    coef = (max_norm / (norm + 1e-6)).clamp_(max=1.0)
    return coef.masked_fill_(~torch.isfinite(norm), 1.0)


def overflowed(norm: torch.Tensor) -> bool:
    """Whether an unscaled float16 gradient norm is not finite: the one host read of a loss-scaled step, made
    before any weight changes so the step can be skipped (torch's GradScaler reads the same flag)."""
    return not math.isfinite(read(norm, "float16 overflow check"))