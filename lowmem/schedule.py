"""Learning-rate schedules with linear warmup, as a pure function of the optimizer step.

The multipliers follow transformers' ``get_scheduler`` (``constant_with_warmup``, ``linear``, ``cosine``)
exactly, step for step, so a run reads the same as an HF Trainer run; being a function of the step, the
schedule needs no state to checkpoint.
"""

from __future__ import annotations

import math


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """HF's rule: ceil(total × ratio)."""
    return math.ceil(total_steps * warmup_ratio)


def lr_multiplier(step: int, total_steps: int, warmup: int, kind: str) -> float:
    """Multiplier of the base lr at 0-based optimizer step ``step``."""
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    if kind == "linear":
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))
    if kind == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ValueError(f"unknown lr schedule {kind}")


def learning_rate(step: int, base_lr: float, total_steps: int, warmup_ratio: float, kind: str) -> float:
    return base_lr * lr_multiplier(step, total_steps, warmup_steps(total_steps, warmup_ratio), kind)
