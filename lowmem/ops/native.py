"""Loading the native extension: the prebuilt ``lowmem._C``, else a just-in-time build of the same
sources, else the pure-PyTorch references. Importing lowmem never fails because of it; the first op
call loads it and logs once which implementation runs.

``LOWMEM_JIT=0`` forbids the just-in-time build; ``LOWMEM_NATIVE=0`` forces the references.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

log = logging.getLogger("lowmem")


@dataclass
class NativeStatus:
    """What runs the ops: ``source`` is ``prebuilt``, ``jit`` or ``reference``, with the reason."""

    source: str
    reason: str
    with_cuda: bool = False

    @property
    def loaded(self) -> bool:
        return self.source in ("prebuilt", "jit")


_status: NativeStatus | None = None
_lock = threading.Lock()


def ensure_loaded() -> NativeStatus:
    """Load the extension once (registering its kernels with the dispatcher) and report what runs."""
    global _status
    if _status is not None:
        return _status
    with _lock:
        if _status is None:
            import lowmem.ops.blocks  # noqa: F401  (the op schemas must exist before kernels register)
            import lowmem.ops.int8_update  # noqa: F401
            import lowmem.ops.quant  # noqa: F401
            import lowmem.ops.update  # noqa: F401
            import lowmem.ops.update_rows  # noqa: F401

            _status = _load()
            level = logging.INFO if _status.loaded else logging.WARNING
            log.log(level, "native ops: %s (%s)", _status.source, _status.reason)
    return _status


def _load() -> NativeStatus:
    if os.environ.get("LOWMEM_NATIVE") == "0":
        return NativeStatus("reference", "LOWMEM_NATIVE=0")
    try:
        from lowmem import _C  # type: ignore[attr-defined]

        return NativeStatus("prebuilt", f"lowmem._C from {_C.__file__}", bool(_C.with_cuda))
    except ImportError as err:
        prebuilt_error = f"lowmem._C not built ({err})"
    if os.environ.get("LOWMEM_JIT") == "0":
        return NativeStatus("reference", f"{prebuilt_error}; LOWMEM_JIT=0")
    try:
        module = _jit_build()
    except Exception as err:  # any compiler or loader failure means: use the references
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return NativeStatus("reference", f"{prebuilt_error}; just-in-time build failed: {first_line}")
    return NativeStatus("jit", f"built just in time into {module.__file__}", bool(module.with_cuda))


def _jit_build():
    import torch
    from torch.utils.cpp_extension import load

    from lowmem.ops import build

    csrc = build.csrc_dir()
    if not (csrc / "module.cpp").exists():
        raise FileNotFoundError(f"sources not found at {csrc} (installed without a source checkout)")
    with_cuda, _ = build.want_cuda(torch.version.cuda)
    sources = build.cpu_sources(csrc) + (build.cuda_sources(csrc) if with_cuda else [])
    log.info("native ops: building lowmem._C just in time (about 30 s, cached afterwards)")
    return load(
        name="lowmem_C",
        sources=[str(s) for s in sources],
        extra_cflags=build.CXX_FLAGS + (["-DLOWMEM_WITH_CUDA"] if with_cuda else []),
        extra_cuda_cflags=build.NVCC_FLAGS + ["-DLOWMEM_WITH_CUDA"],
        extra_ldflags=build.LD_FLAGS,
        verbose=False,
    )


def status() -> NativeStatus:
    """The extension's status, loading it first if needed."""
    return ensure_loaded()
