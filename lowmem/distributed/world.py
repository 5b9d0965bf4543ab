"""The process group a distributed run trains in, from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

log = logging.getLogger("lowmem")


@dataclass(frozen=True)
class World:
    """This process's place: ``active`` when launched by torchrun (even with one process: the FSDP2 path)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    active: bool = False
    host_group: object = None  # gloo, for host integers (None: the default group, gloo itself on CPU)
    owns_group: bool = False  # joined by setup (and left by teardown), not by a caller that runs several trainings

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce ``tensor`` in place (a sum over ranks); itself in one process."""
        if self.active and self.size > 1:
            torch.distributed.all_reduce(tensor)
        return tensor

    def sum_counts(self, *counts: int) -> list[int]:
        """Host integers summed over ranks, in host memory (a gloo all-reduce: nothing waits for the device)."""
        if not (self.active and self.size > 1):
            return list(counts)
        values = torch.tensor(counts, dtype=torch.int64)
        torch.distributed.all_reduce(values, group=self.host_group)
        return [int(v) for v in values.tolist()]

    def barrier(self) -> None:
        if self.active and self.size > 1:
            torch.distributed.barrier()


def launched() -> bool:
    """Whether torchrun started this process."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup(device_name: str) -> tuple[World, str]:
    """Join the process group torchrun describes (gloo on CPU, NCCL on CUDA), and the device this rank trains on
    (``cuda:LOCAL_RANK``). Outside torchrun: one process, the device as given."""
    if not launched():
        return World(), device_name
    import torch.distributed as dist

    from lowmem.errors import UserError

    rank, size, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if device_name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device is cuda but torch sees no CUDA GPU (use train.device=cpu or auto)")
    cuda = device_name != "cpu" and torch.cuda.is_available()
    if cuda and local >= torch.cuda.device_count():
        raise UserError(f"distributed: process {local} on this machine has no GPU of its own (it has "
                        f"{torch.cuda.device_count()}); use at most --nproc {torch.cuda.device_count()}")
    if cuda:
        torch.cuda.set_device(local)
        device_name = f"cuda:{local}"
    else:
        device_name = "cpu"
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if cuda else "gloo")
    world = World(rank, size, local, True, dist.new_group(backend="gloo") if cuda else None, owns)
    if not world.is_main:  # one process speaks: the others log errors only
        logging.getLogger("lowmem").setLevel(logging.ERROR)
    log.info("distributed: %d processes (%s), FSDP2", size, "nccl" if cuda else "gloo")
    return world, device_name


def teardown(world: World) -> None:
    """Leave what :func:`setup` joined: the host-count group always, the default group when setup made it."""
    if not (world.active and torch.distributed.is_initialized()):
        return
    if world.host_group is not None:
        torch.distributed.destroy_process_group(world.host_group)
    if world.owns_group:
        torch.distributed.destroy_process_group()
