"""``lowmem train RECIPE --nproc N``: N processes of ``lowmem train`` through ``torch.distributed.run`` on this machine.

Each process prints its own one-line error; torchrun stops the others when one fails (none waits in a collective for
a rank that is gone), and the launcher exits non-zero naming the rank."""

from __future__ import annotations

import logging

from lowmem.errors import UserError

log = logging.getLogger("lowmem")


def launch_train(nproc: int, recipe: str, overrides: tuple[str, ...]) -> None:
    launch(nproc, ["train", recipe, *overrides])


def launch(nproc: int, argv: list[str], module: str = "lowmem") -> None:
    """Run ``python -m MODULE ARGV`` in ``nproc`` processes on this machine (torchrun's standalone rendezvous); a
    failure of any becomes one line naming the rank (its own message is printed above it)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "--module", module, *argv])
    try:
        run(args)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()  # torchrun stopped the others
        raise UserError(f"{argv[0]} --nproc {nproc}: rank {rank} failed (exit code {failure.exitcode}); its error is "
                        "printed above") from None
