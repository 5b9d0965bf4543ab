"""PERP (prune, then retrain a tiny subset): pruning criteria and patterns (``prune``), wanda's layer-by-layer
calibration (``calibration``), and what retrains after pruning (``retrain``)."""


def __getattr__(name: str):
    """The names of the former ``lowmem/perp.py`` (``prepare``, ``Retraining``, ...), now in ``lowmem.perp.retrain``."""
    from lowmem.perp import retrain

    try:
        return getattr(retrain, name)
    except AttributeError:
        raise AttributeError(f"module 'lowmem.perp' has no attribute '{name}'") from None
