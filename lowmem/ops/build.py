"""The one source list of the native extension, shared by the ahead-of-time build (``setup.py``) and the
just-in-time build (``lowmem.ops.native``), as DeepSpeed's op_builder does.

This module imports nothing from torch or lowmem at import time so ``setup.py`` can load it by path.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

EXTENSION_NAME = "lowmem._C"
# The extension is built on the machine that runs it (pip --no-build-isolation or just in time), so, like
# DeepSpeed's op_builder, it targets that CPU: AVX2/FMA where present (torch picks such kernels at run time).
# LOWMEM_PORTABLE=1 builds for baseline x86-64 instead (e.g. a build machine that differs from the runner).
# No -std flag: torch's cpp_extension adds the C++ standard its own headers need, for the ahead-of-time and the
# just-in-time build alike (C++20 with torch 2.13 and 2.14; 2.14's headers refuse to compile under C++17, which
# a hard-coded -std=c++17 here forced).
# -fno-trapping-math: no code here reads floating-point exception flags, and without it GCC keeps floor() and the
# float comparisons of the int8 requantization scalar (a 4× slower loop); results are the same bits either way.
CXX_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math"] + (
    [] if os.environ.get("LOWMEM_PORTABLE") == "1" else ["-march=native"]
)
LD_FLAGS = ["-fopenmp"]
# --fmad=false for the same reason as -ffp-contract=off: no fused multiply-adds the reference does not do.
NVCC_FLAGS = ["-O3", "--fmad=false"]


def csrc_dir(repo_root: Path | None = None) -> Path:
    """The ``csrc/`` folder: beside the package in a source checkout."""
    root = repo_root if repo_root is not None else Path(__file__).resolve().parents[2]
    return root / "csrc"


def cpu_sources(csrc: Path) -> list[Path]:
    """C++ sources built into every extension: the module plus every kernel under ``csrc/cpu``."""
    return [csrc / "module.cpp", *sorted((csrc / "cpu").glob("*.cpp"))]


def cuda_sources(csrc: Path) -> list[Path]:
    """CUDA kernels (``.cu``) and their torch bindings, built only against a CUDA torch."""
    return [*sorted((csrc / "cuda").glob("*.cu")), *sorted((csrc / "cuda").glob("*_binding.cpp"))]


def cu_files(csrc: Path) -> list[Path]:
    """Every ``.cu`` file: the test suite compiles each with ``nvcc -c`` when nvcc exists."""
    return sorted((csrc / "cuda").glob("*.cu"))


def find_nvcc() -> str | None:
    """Path of nvcc from ``CUDA_HOME`` or ``PATH``, or None."""
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return str(Path(cuda_home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def want_cuda(torch_cuda_version: str | None) -> tuple[bool, str]:
    """Whether to build the CUDA kernels, and why (for ``lowmem env`` and build logs)."""
    if os.environ.get("LOWMEM_NO_CUDA") == "1":
        return False, "LOWMEM_NO_CUDA=1"
    if torch_cuda_version is None:
        return False, "torch is a CPU build"
    if find_nvcc() is None:
        return False, "nvcc not found (set CUDA_HOME)"
    return True, f"torch CUDA {torch_cuda_version} and nvcc found"
