"""How a weight is stored and parametrized: int8 blocks with float32 outliers (QFT, ``int8``), pruning masks that
updates keep (``masks``), and the PERP adapters trained on a pruned weight (``adapters``)."""
