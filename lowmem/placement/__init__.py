"""Where bytes live and when they move: the model's units (``units``), HiFT's residency scheduler and weight
streaming (``residency``, ``movers``, ``tensor_cache``), the input embedding kept in host memory
(``host_embedding``), and the rule that a step reads no device value on the host (``host_sync``)."""
