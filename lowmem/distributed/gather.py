"""The final export of a distributed run: an HF folder identical to a one-process export, written by rank 0 while
every rank takes part in gathering each tensor, one at a time in the writer's order (``lowmem.hf_folder``'s entries).
The other ranks drop each whole tensor at once; rank 0 holds one shard of the weights at a time. (Checkpoints stay
sharded: ``sharded_checkpoint.py``.)"""

from __future__ import annotations

from pathlib import Path

from lowmem import checkpoint as ckpt
from lowmem.distributed.shard import is_sharded
from lowmem.distributed.world import World
from lowmem.hf_folder import hf_entries


def take_part_in_hf_write(model, merge: bool = False) -> None:
    """What a rank other than 0 does while rank 0 writes the model: gather each sharded tensor in the same order."""
    for entry in hf_entries(model, merge):
        value = entry.make()
        if is_sharded(value):
            value.full_tensor()


def export_final(world: World, output_dir: Path, model, tokenizer) -> Path:
    """The final HF folder, gathered to rank 0 tensor by tensor; identical to a one-process export."""
    if world.is_main:
        path = ckpt.export_final(output_dir, model, tokenizer)
    else:
        take_part_in_hf_write(model, merge=True)
        path = output_dir / "final"
    world.barrier()
    return path
