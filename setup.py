"""Builds the native extension lowmem._C ahead of time.

Install with ``pip install --no-build-isolation -e .``: the extension's ABI must match the torch that is
installed, and an isolated build would fetch another torch (a multi-GB CUDA one on a CPU machine).
Set ``LOWMEM_SKIP_BUILD=1`` to install without the extension (it then builds just in time on first use,
or falls back to the pure-PyTorch reference).
"""

import importlib.util
import os
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def _build_module():
    spec = importlib.util.spec_from_file_location("_lowmem_build", ROOT / "lowmem" / "ops" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _extensions():
    if os.environ.get("LOWMEM_SKIP_BUILD") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    build = _build_module()
    csrc = build.csrc_dir(ROOT)
    rel = lambda paths: [str(p.relative_to(ROOT)) for p in paths]  # noqa: E731
    with_cuda, why = build.want_cuda(torch.version.cuda)
    print(f"lowmem: building {build.EXTENSION_NAME} (CUDA kernels: {'yes' if with_cuda else 'no'}, {why})")
    if with_cuda:
        ext = CUDAExtension(
            build.EXTENSION_NAME,
            rel(build.cpu_sources(csrc) + build.cuda_sources(csrc)),
            define_macros=[("LOWMEM_WITH_CUDA", None)],
            extra_compile_args={"cxx": build.CXX_FLAGS, "nvcc": build.NVCC_FLAGS},
            extra_link_args=build.LD_FLAGS,
        )
    else:
        ext = CppExtension(
            build.EXTENSION_NAME,
            rel(build.cpu_sources(csrc)),
            extra_compile_args={"cxx": build.CXX_FLAGS},
            extra_link_args=build.LD_FLAGS,
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(
    # The recipes live in recipes/ of the checkout and ship inside the package as lowmem/recipes, so a wheel
    # install lists and copies them (`lowmem ls`, `lowmem cp`).
    # So do the model configs lowmem plan reads (model_configs/NAME/config.json as lowmem/model_configs).
    packages=[*find_packages(include=["lowmem", "lowmem.*"]), "lowmem.recipes", "lowmem.model_configs"],
    package_dir={"lowmem.recipes": "recipes", "lowmem.model_configs": "model_configs"},
    package_data={"lowmem.recipes": ["*.yaml"], "lowmem.model_configs": ["*/config.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
