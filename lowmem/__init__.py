"""lowmem: memory-efficient full-parameter fine-tuning of LLMs on one consumer GPU or a CPU.

Importing lowmem is cheap and never fails because the native extension is missing: the first op that
needs it loads it (or falls back to the pure-PyTorch reference) and logs which runs.
"""

__version__ = "0.1.0"
