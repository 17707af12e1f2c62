"""Ahead-of-time build of the C++/CUDA extension in ``csrc/`` (used by setup.py).

    EDT_KERNELS_BUILD_EXT=1 pip install -e . --no-build-isolation

builds ``edt_kernels._C`` (CPU kernels and the operator schemas) and, where
torch has CUDA and nvcc is found, ``edt_kernels._C_cuda`` (CUDA token kernels).
``edt_kernels._ext`` then loads them instead of compiling on first use, as long
as they were built from the current sources.  ``--no-build-isolation`` makes
the build use the torch already installed (an isolated build would download
another one).  Options: ``EDT_KERNELS_NATIVE=1`` adds ``-march=native`` (off
by default here: a prebuilt library may be copied to another machine);
``EDT_KERNELS_BUILD_CUDA=0`` skips the CUDA module.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Dict, List, Tuple

ROOT = Path(__file__).resolve().parent


def _load_ext_module():
    """edt_kernels/_ext.py without importing the package (its __init__ may need
    optional dependencies that a build environment lacks)."""
    spec = importlib.util.spec_from_file_location("_edt_kernels_ext_build", ROOT / "edt_kernels" / "_ext.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_extensions() -> Tuple[List, Dict]:
    """``(ext_modules, cmdclass)`` for ``setuptools.setup``."""
    import torch
    from torch.utils import cpp_extension

    ext = _load_ext_module()
    native = os.environ.get("EDT_KERNELS_NATIVE", "0") == "1"
    gen_dir = ext.write_hash_header(ROOT / "build" / "edt_kernels_gen")
    rel = lambda names: [os.path.relpath(ext.CSRC_DIR / n, ROOT) for n in names]  # noqa: E731
    modules = [
        cpp_extension.CppExtension(
            "edt_kernels._C",
            sources=rel(ext.CPU_SOURCES),
            extra_compile_args={"cxx": ext.cpu_cflags(native, gen_dir)},
            extra_link_args=["-fopenmp"],
        )
    ]
    want_cuda = os.environ.get("EDT_KERNELS_BUILD_CUDA", "1") != "0"
    if want_cuda and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None:
        modules.append(
            cpp_extension.CUDAExtension(
                "edt_kernels._C_cuda",
                sources=rel(ext.CUDA_SOURCES),
                extra_compile_args={"cxx": ["-O3", f"-I{gen_dir}", "-DEDT_KERNELS_HAVE_HASH_HEADER"],
                                    "nvcc": ext.cuda_cflags(gen_dir)},
            )
        )
    return modules, {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}
