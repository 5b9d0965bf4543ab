"""Checkpoints and the final export of a distributed run: rank 0 writes the one-process format (full tensors), and
every rank takes part in gathering each tensor, one at a time in the writer's order (``lowmem.hf_folder``'s entries;
the rule state in sorted order). The other ranks drop each whole tensor at once; rank 0 holds one shard of the weights
at a time, but the whole rule state while it writes ``optimizer.safetensors`` (one file, as a one-process run)."""

from __future__ import annotations

from pathlib import Path

from lowmem import checkpoint as ckpt
from lowmem.distributed.shard import gather_state, is_sharded, state_layout
from lowmem.distributed.world import World
from lowmem.hf_folder import hf_entries


class GatheredState:
    """A strategy's state already gathered whole: what :func:`lowmem.checkpoint.save_checkpoint` saves."""

    def __init__(self, flat):
        self.flat = flat

    def state_dict(self):
        return self.flat


def take_part_in_hf_write(model, merge: bool = False) -> None:
    """What a rank other than 0 does while rank 0 writes the model: gather each sharded tensor in the same order."""
    for entry in hf_entries(model, merge):
        value = entry.make()
        if is_sharded(value):
            value.full_tensor()


def save_checkpoint(world: World, output_dir: Path, step: int, model, tokenizer, update, trainer_state,
                    keep_last: int) -> None:
    """:func:`lowmem.checkpoint.save_checkpoint` for a distributed run: the rule state and weights gathered whole,
    written by rank 0, atomically as ever."""
    state = GatheredState(gather_state(update.state_dict(), *state_layout(update), keep=world.is_main))
    if world.is_main:
        ckpt.save_checkpoint(output_dir, step, model, tokenizer, state, {**trainer_state, "world_size": world.size},
                             keep_last)
    else:
        take_part_in_hf_write(model)
    world.barrier()


def export_final(world: World, output_dir: Path, model, tokenizer) -> Path:
    """The final HF folder, gathered to rank 0 tensor by tensor; identical to a one-process export."""
    if world.is_main:
        path = ckpt.export_final(output_dir, model, tokenizer)
    else:
        take_part_in_hf_write(model, merge=True)
        path = output_dir / "final"
    world.barrier()
    return path
