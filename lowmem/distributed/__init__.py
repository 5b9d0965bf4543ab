"""Several processes on PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``): one process per GPU (NCCL), or
gloo on CPU, launched by ``lowmem train RECIPE --nproc N`` (``torch.distributed.run``) or ``torchrun -m lowmem train``.

    world.py    the process group from torchrun's environment, and the few reductions a step needs
    shard.py    each decoder layer and the root sharded; a DTensor's local shard; a rule state gathered / re-sliced
    gather.py   checkpoints and the final export written by rank 0, tensor by tensor gathered from every rank
    launch.py   ``--nproc``: torch.distributed.run, and a failing rank's message as the run's one line

A checkpoint of a distributed run has the format of a one-process run (full tensors), so a run resumes on another
number of processes as long as the global micro-batch (``nproc × train.batch_size``) stays the same.
"""
