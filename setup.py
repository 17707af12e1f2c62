"""setup.py: metadata lives in pyproject.toml.

A plain ``pip install -e .`` builds nothing (the C++/CUDA extension in
``csrc/`` is compiled on first use with ninja and cached).  For an
ahead-of-time build set ``EDT_KERNELS_BUILD_EXT=1`` and install with
``--no-build-isolation`` so that the torch already installed is used.
"""
import os

from setuptools import setup

ext_modules = []
cmdclass = {}
if os.environ.get("EDT_KERNELS_BUILD_EXT", "0") == "1":
    from edt_kernels_build import get_extensions  # noqa: E402  (csrc build description)

    ext_modules, cmdclass = get_extensions()

setup(ext_modules=ext_modules, cmdclass=cmdclass)
