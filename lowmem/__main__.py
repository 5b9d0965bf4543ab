"""``python -m lowmem`` (and ``torchrun -m lowmem train …``): the command line."""

from lowmem.cli import main

main()
