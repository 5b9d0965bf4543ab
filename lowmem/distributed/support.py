"""What a distributed run supports today, and the one-line refusal of the rest (nothing runs unsharded silently)."""

from __future__ import annotations

from pathlib import Path

from lowmem import assets
from lowmem.errors import UserError

# on shards: the element-wise rules alone, the factored ones with their whole-tensor statistics summed over the ranks
SHARDED_RULES = ("sgd", "adamw", "lion", "lion8bit", "adafactor", "adalomo")
SHARDED_STRATEGIES = ("standard", "fused", "hift")


def check_supported(config, weights: str, planning: bool = False) -> None:
    """Refuse in one line what the FSDP2 path does not run yet (``planning``: for ``lowmem plan --nproc``, which
    checks no budget of a run)."""
    from lowmem.weights.masks import MASKS_FILE

    u = config.update
    masks = (Path(assets.resolve(weights)) / MASKS_FILE).is_file()
    refusals = [
        (u.strategy not in SHARDED_STRATEGIES,
         f"update.strategy={u.strategy} is not supported on several processes yet (use "
         f"{' or '.join(SHARDED_STRATEGIES)})"),
        (u.rule not in SHARDED_RULES,
         f"update.rule={u.rule} is not supported on several processes yet; use one of {', '.join(SHARDED_RULES)}"),
        (config.model.weight_format != "float", "model.weight_format=int8 is not supported on several processes"),
        (config.prune.criterion != "none" or u.trainable != "all" or masks,
         "pruning, sparsity masks and update.trainable (PERP) are not supported on several processes yet"),
        (config.tokens.eliminate, "tokens.eliminate is not supported on several processes yet"),
        (config.memory.offload_frozen_weights or config.memory.offload_embeddings,
         "memory.offload_frozen_weights and memory.offload_embeddings are not supported on several processes (FSDP2 "
         "shards the weights instead; memory.offload_states works)"),
        (config.memory.budget_gb is not None and not planning,
         "memory.budget_gb is not checked before a run on several processes yet (plan it with lowmem plan --nproc "
         "N); set memory.budget_gb=null"),
    ]
    for refused, why in refusals:
        if refused:
            raise UserError(f"distributed: {why}")


def check_rule_on_shards(rule, params: dict) -> None:
    """Refuse, before the first step, what the rule cannot do on these parameters' shards (lion8bit: a quantized
    matrix whose rows are not whole blocks)."""
    from lowmem.rules.lion import check_whole_blocks

    if getattr(rule, "quantize", False):
        for name, param in params.items():
            if rule.quantized(param, name):
                check_whole_blocks(rule, name, param)


def check_resume(config, sharded_checkpoint: bool) -> None:
    """Refuse a resume the sharded run cannot make: lion8bit's state saved by one process (its blocks in one flat
    row) is not cut into shards."""
    if config.update.rule == "lion8bit" and not sharded_checkpoint:
        raise UserError("distributed: a one-process lion8bit checkpoint does not resume on several processes (its "
                        "blocks are saved flat); resume it in one process, or start a new run")
