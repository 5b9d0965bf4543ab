"""What the forward keeps for backward: the chunked head and loss, whose full logits never exist (``loss``), and
LeMo's token elimination in the sparse layers (``tokens``)."""
