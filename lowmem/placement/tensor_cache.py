"""A cache for functions that make constant tensors (code maps, scalars) once per device.

The tensors are always real: each is made with any fake tensor mode unset, so a trace under ``FakeTensorMode``
(HiFT's unit discovery, a memory plan) that is the first to ask for one does not leave a fake tensor in the cache
for every real step after it. The memory plan counts what the caches hold (:func:`cached_tensors`).
"""

from __future__ import annotations

import functools
from collections import OrderedDict

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

_CACHES: list["_Cache"] = []


class _Cache:
    """``make(*args)`` remembered by its arguments, the ``maxsize`` most recently used (all with None)."""

    def __init__(self, make, maxsize: int | None):
        self.make, self.maxsize = make, maxsize
        self.values: OrderedDict = OrderedDict()
        functools.update_wrapper(self, make)
        _CACHES.append(self)

    def __call__(self, *args):
        with unset_fake_temporarily():
            if args in self.values:
                self.values.move_to_end(args)
                return self.values[args]
            value = self.values[args] = self.make(*args)
            if self.maxsize is not None and len(self.values) > self.maxsize:
                self.values.popitem(last=False)
            return value

    def cache_clear(self) -> None:
        self.values.clear()


def tensor_cache(maxsize: int | None = None):
    return lambda make: _Cache(make, maxsize)


def clear_tensor_caches() -> None:
    """Forget every cached constant, so the next run makes (and a storage accountant counts) them again: two counted
    runs then see the same storages whichever ran first."""
    for cache in _CACHES:
        cache.cache_clear()


def cached_tensors() -> list[torch.Tensor]:
    """Every constant the caches hold now."""
    return [value for cache in _CACHES for value in cache.values.values() if isinstance(value, torch.Tensor)]
