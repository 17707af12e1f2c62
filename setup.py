"""setup.py: metadata lives in pyproject.toml.

A plain ``pip install -e .`` builds nothing (the C++/CUDA extension in
``csrc/`` is compiled on first use with ninja and cached).  For an
ahead-of-time build set ``EDT_KERNELS_BUILD_EXT=1`` and install with
``--no-build-isolation`` so that the torch already installed is used.

The C++/CUDA sources live in ``csrc/`` at the repository root; a built wheel
(``pip wheel .`` / ``pip install .``) carries a copy in ``edt_kernels/csrc/``
(``build_py`` below), which ``edt_kernels._ext`` finds there.  The sdist
carries ``csrc/`` through MANIFEST.in.
"""
import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CSRC_SUFFIXES = (".cpp", ".h", ".cu", ".cuh")


class build_py_with_csrc(build_py):
    """build_py that also copies ``csrc/*`` into ``<build_lib>/edt_kernels/csrc``."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):  # an editable install reads csrc/ in place
            return
        src = ROOT / "csrc"
        if not src.is_dir():
            raise RuntimeError(f"csrc/ not found beside setup.py ({src}): the C++ sources must ship")
        dest = Path(self.build_lib) / "edt_kernels" / "csrc"
        dest.mkdir(parents=True, exist_ok=True)
        for f in sorted(src.iterdir()):
            if f.is_file() and f.suffix in CSRC_SUFFIXES:
                shutil.copy2(f, dest / f.name)


ext_modules = []
cmdclass = {"build_py": build_py_with_csrc}
if os.environ.get("EDT_KERNELS_BUILD_EXT", "0") == "1":
    from edt_kernels_build import get_extensions  # noqa: E402  (csrc build description)

    ext_modules, ext_cmdclass = get_extensions()
    cmdclass.update(ext_cmdclass)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
