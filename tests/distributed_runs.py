"""Several trainings in one pair of processes (tests/test_distributed.py): run by torchrun as ``python -m
distributed_runs SPEC.json``, where SPEC is a list of [recipe, [overrides...]]; the process group is joined once, so
the runs pay one start-up."""

import json
import sys

import torch.distributed as dist

from lowmem.config import load_config
from lowmem.trainer import train

dist.init_process_group("gloo")
for recipe, overrides in json.loads(open(sys.argv[1]).read()):
    train(load_config(recipe, overrides))
    dist.barrier()
dist.destroy_process_group()
