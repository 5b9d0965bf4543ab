"""Update strategies: when and on which tensors the rule runs.

The training loop drives a strategy through four calls per optimizer step:
    ``prepare(lr)``        before the step's micro-batches,
    ``backward(loss)``     once per micro-batch (loss already normalized by the step's label tokens),
    ``step() -> dict``     after the last micro-batch: finish the update, return stats (``grad_norm``, ...),
and, for checkpoints, ``state_dict()`` / ``load_state_dict()`` (flat name → tensor, safetensors-ready)
plus ``state_bytes()``. A strategy may define ``schedule_step(step, total) -> (position, span)`` to move
the lr schedule differently from the optimizer step (HiFT's delayed schedule).
"""

from __future__ import annotations

from lowmem.strategies.fused import FusedStrategy
from lowmem.strategies.hift import HiftStrategy
from lowmem.strategies.standard import StandardStrategy

STRATEGIES = {"standard": StandardStrategy, "fused": FusedStrategy, "hift": HiftStrategy}


def make_strategy(name: str, model, rule, update_config, config=None, device=None):
    """Build the strategy named by ``update.strategy`` over the model's trainable parameters.

    ``hift`` also reads the recipe's ``hift``, ``memory`` and ``train.seed`` (pass the whole ``config``), and
    ``device``, where training runs, when the model was loaded in host memory to be placed by its plan.
    """
    if name == "hift":
        if config is None:
            from lowmem.config import Config

            config = Config(update=update_config)
        return HiftStrategy(model, rule, update_config, config, device)
    if name == "fused" and config is not None:
        return FusedStrategy(model, rule, update_config, config.memory.row_sparse_embeddings,
                             config.memory.offload_embeddings)
    return STRATEGIES[name](model, rule, update_config)
