"""lowmem: memory-efficient full-parameter fine-tuning of LLMs on one consumer GPU or a CPU.

The public API (``lowmem.api``): :func:`load_model`, :func:`load_tokenizer`, :class:`Update`, :func:`lm_loss`,
:func:`save_pretrained`, :func:`plan`; HF Trainer integration in ``lowmem.hf``. They are imported on first use, so
importing lowmem is cheap, and it never fails because the native extension is missing: the first op that needs it
loads it (or falls back to the pure-PyTorch reference) and logs which runs.
"""

__version__ = "0.1.0"
__all__ = ["load_model", "load_tokenizer", "Update", "lm_loss", "save_pretrained", "plan"]


def __getattr__(name: str):
    if name in __all__:
        from lowmem import api

        return getattr(api, name)
    raise AttributeError(f"module 'lowmem' has no attribute '{name}'")
