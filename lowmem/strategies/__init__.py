"""Update strategies: when and on which tensors the rule runs.

The training loop drives a strategy through four calls per optimizer step:
    ``prepare(lr)``        before the step's micro-batches,
    ``backward(loss)``     once per micro-batch (loss already normalized by the step's label tokens),
    ``step() -> dict``     after the last micro-batch: finish the update, return stats (``grad_norm``, ...),
and, for checkpoints, ``state_dict()`` / ``load_state_dict()`` (flat name → tensor, safetensors-ready)
plus ``state_bytes()``.
"""

from __future__ import annotations

from lowmem.strategies.fused import FusedStrategy
from lowmem.strategies.standard import StandardStrategy

STRATEGIES = {"standard": StandardStrategy, "fused": FusedStrategy}


def make_strategy(name: str, model, rule, update_config):
    """Build the strategy named by ``update.strategy`` over the model's trainable parameters."""
    return STRATEGIES[name](model, rule, update_config)
