"""A rank that fails after joining the process group (tests/test_distributed.py): run as ``python -m
distributed_fault RECIPE OUT`` by torchrun; rank 1 raises as its data is built, rank 0 goes on into the step's first
collective."""

import sys

import lowmem.trainer as trainer
from lowmem.config import load_config
from lowmem.distributed.world import launched

assert launched()
real_build = trainer.build_datasets


def build_datasets(*args, **kwargs):
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise RuntimeError("rank 1 fails on purpose")
    return real_build(*args, **kwargs)


trainer.build_datasets = build_datasets
recipe, out = sys.argv[1:3]
trainer.train(load_config(recipe, ["train.device=cpu", "train.max_steps=2", f"checkpoint.output_dir={out}"]))
