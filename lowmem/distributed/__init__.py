"""Several processes on PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``): one process per GPU (NCCL), or
gloo on CPU, launched by ``lowmem train RECIPE --nproc N`` (``torch.distributed.run``) or ``torchrun -m lowmem train``.

    world.py    the process group from torchrun's environment, and the few reductions a step needs
    shard.py    each decoder layer and the root sharded; a DTensor's local shard; a rule state as DTensors, re-sliced
    factored.py Adafactor and AdaLomo on row shards (their statistics summed over the ranks)
    sharded_checkpoint.py  checkpoints: each rank writes and reads its rows (torch.distributed.checkpoint, safetensors)
    gather.py   the final export written by rank 0, tensor by tensor gathered from every rank
    launch.py   ``--nproc``: torch.distributed.run, and a failing rank's message as the run's one line
    support.py  what several processes refuse, in one line

A distributed checkpoint is read back on any number of processes (one process reads it whole), so a run resumes on
another number as long as the global micro-batch (``nproc × train.batch_size``) stays the same.
"""
