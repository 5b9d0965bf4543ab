"""A cache for functions that make constant tensors (code maps, scalars) once per device.

The tensors are always real: each is made with any fake tensor mode unset, so a trace under ``FakeTensorMode``
(HiFT's unit discovery, a memory plan) that is the first to ask for one does not leave a fake tensor in the cache
for every real step after it.
"""

from __future__ import annotations

import functools

from torch._subclasses.fake_tensor import unset_fake_temporarily

_CACHES = []


def tensor_cache(maxsize: int | None = None):
    def decorate(make):
        cached = functools.lru_cache(maxsize=maxsize)(make)

        @functools.wraps(make)
        def real(*args):
            with unset_fake_temporarily():
                return cached(*args)

        real.cache_clear = cached.cache_clear
        _CACHES.append(cached)
        return real

    return decorate


def clear_tensor_caches() -> None:
    """Forget every cached constant, so the next run makes (and a storage accountant counts) them again: two counted
    runs then see the same storages whichever ran first."""
    for cached in _CACHES:
        cached.cache_clear()
