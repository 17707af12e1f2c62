"""Whether the installed Triton can run this package's kernels.

The supported range is the one declared in ``pyproject.toml`` and tested in
CI (``.ci/run``): ``MIN_TRITON <= triton < MAX_TRITON``.  Known failures
outside it or with a mismatched numpy:

- triton <= 3.3: ``triton.autotune`` looks up a GPU driver when the kernel is
  decorated, so merely importing the kernels raises on a machine without a GPU;
- triton 3.4 - 3.6 in interpreter mode (``TRITON_INTERPRET=1``) with
  numpy >= 2.4: the interpreter calls ``int()`` on one-element arrays, which
  numpy 2.4 rejects, so every kernel fails at its first loop bound.

``triton_unavailable_reason()`` is called before any ``@triton.jit`` module is
imported; a non-``None`` answer costs the Triton backend (with that sentence
as the reason), never ``import edt_kernels``.
"""
from __future__ import annotations

import os
import re
from typing import Optional, Tuple

MIN_TRITON = (3, 6)
MAX_TRITON = (3, 10)  # exclusive
SUPPORTED_RANGE = f">={MIN_TRITON[0]}.{MIN_TRITON[1]},<{MAX_TRITON[0]}.{MAX_TRITON[1]}"
# Last triton whose interpreter needs numpy < 2.4 (fixed in 3.7).
_LAST_INTERPRETER_NEEDING_OLD_NUMPY = (3, 6)


def parse_version(text: str) -> Tuple[int, ...]:
    """``"3.6.0+git1234"`` -> ``(3, 6, 0)``; leading integer fields only."""
    out = []
    for part in re.split(r"[.+-]", str(text)):
        m = re.match(r"\d+", part)
        if not m:
            break
        out.append(int(m.group()))
        if m.group() != part:
            break
    return tuple(out)


def interpreting() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``):
    the one answer, read by every Triton launcher and backend."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_versions(triton_version: Optional[str], numpy_version: Optional[str],
                   interpret: bool) -> Optional[str]:
    """The pure rule behind :func:`triton_unavailable_reason` (testable without
    installing other versions).  ``triton_version=None``: triton not installed."""
    if triton_version is None:
        return f"triton is not installed (pip install 'triton{SUPPORTED_RANGE}'; Linux only)"
    tv = parse_version(triton_version)
    if tv[:2] < MIN_TRITON:
        return (f"triton {triton_version} is older than {MIN_TRITON[0]}.{MIN_TRITON[1]}, the oldest version "
                f"edt-kernels supports (pip install 'triton{SUPPORTED_RANGE}')")
    if interpret and tv[:2] <= _LAST_INTERPRETER_NEEDING_OLD_NUMPY and numpy_version is not None \
            and parse_version(numpy_version)[:2] >= (2, 4):
        return (f"Triton {triton_version}'s interpreter (TRITON_INTERPRET=1) does not work with numpy "
                f"{numpy_version}: pip install 'numpy<2.4' (or triton>=3.7)")
    return None


def installed_versions() -> Tuple[Optional[str], Optional[str]]:
    """(triton version, numpy version) of the installed distributions, without
    importing triton (``None`` for a missing one)."""
    from importlib import metadata

    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    tv = version("triton")
    if tv is None:
        try:  # e.g. a source build registered under another distribution name
            import triton

            tv = getattr(triton, "__version__", None)
        except ImportError:
            tv = None
    return tv, version("numpy")


_cached: "dict" = {}


def _import_error() -> Optional[str]:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure costs the Triton backends only
        return f"triton import failed: {type(exc).__name__}: {exc}"
    return None


def triton_unavailable_reason() -> Optional[str]:
    """``None`` when the installed Triton can run the kernels here, else one
    sentence saying why not: the version rule of :func:`check_versions`, or
    ``triton import failed: <error>``.  The one answer to "can Triton run?";
    reads ``TRITON_INTERPRET`` at the call (Triton itself reads it when it is
    first imported)."""
    key = interpreting()
    if key not in _cached:
        tv, nv = installed_versions()
        _cached[key] = check_versions(tv, nv, key) or _import_error()
    return _cached[key]
