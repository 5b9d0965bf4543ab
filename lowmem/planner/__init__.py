"""What fits: the step simulated on fake tensors, the storage accountant and ``--fit`` (``plan``), and the CUDA
terms measured on a GPU (``calibration``). The Python entry point is :func:`lowmem.plan`."""
