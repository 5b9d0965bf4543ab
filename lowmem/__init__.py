"""lowmem: memory-efficient full-parameter fine-tuning of LLMs on one consumer GPU or a CPU.

The public API (``lowmem.api``): :func:`load_model`, :func:`load_tokenizer`, :class:`Update`, :func:`lm_loss`,
:func:`save_pretrained`, :func:`plan`, :func:`prune`, :func:`eliminate_tokens`; HF Trainer integration in
``lowmem.hf``. They are imported on first use, so importing lowmem is cheap, and it never fails because the native
extension is missing: the first op that needs it loads it (or falls back to the pure-PyTorch reference) and logs
which runs.
"""

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

__version__ = "0.1.0"
__all__ = ["load_model", "load_tokenizer", "Update", "lm_loss", "save_pretrained", "plan", "prune", "eliminate_tokens"]


def __getattr__(name: str):
    if name in __all__:
        from lowmem import api

        return getattr(api, name)
    raise AttributeError(f"module 'lowmem' has no attribute '{name}'")


# Modules moved when the package was regrouped (2026-12-05); the old names still import, with a warning.
MOVED = {
    "lowmem.int8_weights": "lowmem.weights.int8", "lowmem.masks": "lowmem.weights.masks",
    "lowmem.adapters": "lowmem.weights.adapters", "lowmem.loss": "lowmem.activations.loss",
    "lowmem.tokens": "lowmem.activations.tokens", "lowmem.units": "lowmem.placement.units",
    "lowmem.residency": "lowmem.placement.residency", "lowmem.movers": "lowmem.placement.movers",
    "lowmem.tensor_cache": "lowmem.placement.tensor_cache", "lowmem.host_embedding": "lowmem.placement.host_embedding",
    "lowmem.host_sync": "lowmem.placement.host_sync", "lowmem.calibration": "lowmem.perp.calibration",
    "lowmem.embedding_rows": "lowmem.strategies.embedding_rows",
}

FUNCTIONS_NOW = {"lowmem.plan": "lowmem.planner.plan", "lowmem.prune": "lowmem.perp.prune"}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``import lowmem.<old name>`` gives the module at its new place (the same object), with a warning."""

    def find_spec(self, name, path=None, target=None):
        if name in FUNCTIONS_NOW:
            raise ImportError(f"{name} is the API function now; the module moved to {FUNCTIONS_NOW[name]}")
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec):
        warnings.warn(f"{spec.name} moved to {MOVED[spec.name]}", DeprecationWarning, stacklevel=2)
        module = importlib.import_module(MOVED[spec.name])
        spec.loader_state = module.__spec__  # the import system is about to set the alias's spec on the module
        return module

    def exec_module(self, module):
        module.__spec__ = module.__spec__.loader_state  # its own spec back


sys.meta_path.append(_MovedModules())
