"""What fits: the step simulated on fake tensors, the storage accountant and ``--fit`` (``plan``). The Python entry
point is :func:`lowmem.plan`."""
