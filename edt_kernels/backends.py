"""One backend registry for every op (``amm_attention``, the token ops, the adaLN ops).

Each op has named backends.  A backend says

- ``unavailable_reason()``: why it cannot run at all on this machine (triton
  failed to import, no C++ compiler ...), or None; input independent and cheap;
- ``not_supported_reasons(inp)``: why it cannot take these inputs (device,
  dtype, shape ...), empty when it can;
- ``auto_reasons(inp)``: why ``backend="auto"`` should not pick it although it
  could run (default: the same list);
- ``apply(inp)``: the result.

``backend="auto"`` takes, in rank order, the first backend with no reasons;
an explicit name is checked the same way and its error says which other
backends would take the inputs.  The environment variable
``EDT_KERNELS_BACKEND`` (read only by :func:`env_backend`) replaces ``"auto"``
for every op that has a backend of that name; other ops stay on ``"auto"``.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Any, Callable, Dict, List, Optional

__all__ = [
    "Backend",
    "FunctionBackend",
    "register",
    "backends_of",
    "available",
    "select",
    "env_backend",
    "triton_unavailable_reason",
    "ENV_VAR",
    "OpCall",
    "cpp_unavailable_reason",
]

ENV_VAR = "EDT_KERNELS_BACKEND"


class Backend:
    """One way of computing one op."""

    name: str = "?"

    def unavailable_reason(self) -> Optional[str]:
        return None

    def not_supported_reasons(self, inp: Any) -> List[str]:
        return []

    def auto_reasons(self, inp: Any) -> List[str]:
        return self.not_supported_reasons(inp)

    def apply(self, inp: Any):
        raise NotImplementedError


class FunctionBackend(Backend):
    """A backend from functions: ``fn(inp)`` computes, ``reasons(inp)`` (optional)
    says why not, ``auto`` (optional) why ``"auto"`` should not pick it,
    ``unavailable`` (optional) why it cannot run here at all."""

    def __init__(self, name: str, fn: Callable, reasons: Optional[Callable] = None,
                 auto: Optional[Callable] = None, unavailable: Optional[Callable] = None):
        self.name = name
        self._fn, self._reasons, self._auto, self._unavailable = fn, reasons, auto, unavailable

    def unavailable_reason(self):
        return self._unavailable() if self._unavailable is not None else None

    def not_supported_reasons(self, inp):
        why = self.unavailable_reason()
        if why is not None:
            return [why]
        return list(self._reasons(inp)) if self._reasons is not None else []

    def auto_reasons(self, inp):
        why = self.not_supported_reasons(inp)
        if not why and self._auto is not None:
            why = list(self._auto(inp))
        return why

    def apply(self, inp):
        return self._fn(inp)


_BACKENDS: Dict[str, Dict[str, Backend]] = {}
_RANKS: Dict[str, Dict[str, int]] = {}


def register(op: str, backend: Backend, auto_rank: Optional[int] = None) -> Backend:
    """Add (or replace) ``backend`` of ``op``; ``auto_rank`` places it in the
    ``"auto"`` order (lower first), None keeps it out of ``"auto"``."""
    _BACKENDS.setdefault(op, {})[backend.name] = backend
    ranks = _RANKS.setdefault(op, {})
    ranks.pop(backend.name, None)
    if auto_rank is not None:
        ranks[backend.name] = auto_rank
    return backend


def backends_of(op: str) -> Dict[str, Backend]:
    _load_optional()
    return dict(_BACKENDS.get(op, {}))


def available(op: str) -> List[str]:
    """Names of the backends of ``op`` that can run on this machine."""
    return [n for n, b in backends_of(op).items() if b.unavailable_reason() is None]


def env_backend() -> str:
    """The backend ``EDT_KERNELS_BACKEND`` asks for (``"auto"`` when unset or empty)."""
    return os.environ.get(ENV_VAR, "") or "auto"


def _unavailable(backend: Backend) -> List[str]:
    why = backend.unavailable_reason()
    return [why] if why is not None else []


def select(op: str, inp: Any, backend: str = "auto") -> Backend:
    """The backend of ``op`` that will run ``inp``; ``ValueError`` with every
    backend's reasons when none fits."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    table = backends_of(op)
    if backend == "auto":
        wanted = env_backend()
        if wanted != "auto" and wanted in table:
            backend = wanted
    if backend == "auto":
        reasons = {}
        for name in sorted(_RANKS.get(op, {}), key=_RANKS[op].__getitem__):
            # auto_reasons first: it is the cheap gate on the hot path (device, opt-in flags)
            why = table[name].auto_reasons(inp) or _unavailable(table[name])
            if not why:
                return table[name]
            reasons[name] = why
        raise ValueError(f"no {op} backend supports these inputs: " + "; ".join(
            f"{n}: {', '.join(w)}" for n, w in reasons.items()))
    if backend not in table:
        raise ValueError(f"backend must be one of {['auto'] + sorted(table)} for {op}, got {backend!r}")
    why = _unavailable(table[backend]) or table[backend].not_supported_reasons(inp)
    if why:
        others = [n for n, b in table.items()
                  if n != backend and not (_unavailable(b) or b.not_supported_reasons(inp))]
        raise ValueError(f"{op}: backend {backend!r} does not support these inputs: {'; '.join(why)}"
                         + (f" (supported by: {', '.join(others)})" if others else ""))
    return table[backend]


class OpCall:
    """The inputs of one call of a token/adaLN op: ``args`` for the backend,
    ``tensors`` (named) for its checks."""

    __slots__ = ("args", "tensors")

    def __init__(self, args: tuple, **tensors):
        self.args, self.tensors = args, tensors

    @property
    def device(self):
        return next(t.device for t in self.tensors.values() if t is not None)


# ----------------------------------------------------------------------------- optional backends

def cpp_unavailable_reason(kind: str = "cpu") -> Optional[str]:
    """Why the compiled extension (``kind`` "cpu" or "cuda") cannot be had here,
    without building it: the recorded load error once it was tried, else None
    when a prebuilt library exists or a compiler and ninja could build it."""
    import shutil

    from . import _ext

    if kind in _ext._state:
        return _ext._state[kind]
    if _ext._prebuilt("edt_kernels._C" if kind == "cpu" else "edt_kernels._C_cuda") is not None:
        return None
    if os.environ.get("EDT_KERNELS_JIT", "1") == "0":
        return "no prebuilt extension and EDT_KERNELS_JIT=0"
    if _ext.source_hash() is None:
        return f"extension sources not found in {_ext.CSRC_DIR}"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler found (CXX={cxx!r} is not on PATH)"
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        return "ninja not found (pip install ninja)"
    if kind == "cuda" and cpp_extension.CUDA_HOME is None:
        return "CUDA toolkit (nvcc) not found: set CUDA_HOME"
    return None


_TRITON_REASON: List[Optional[str]] = []


def triton_unavailable_reason() -> Optional[str]:
    """None when the Triton kernels can run here, else why not: the version
    check of ``edt_kernels._triton_support`` (where that module exists), or
    ``triton import failed: <error>``."""
    if not _TRITON_REASON:
        reason = None
        if importlib.util.find_spec(f"{__package__}._triton_support") is not None:
            support = importlib.import_module(f"{__package__}._triton_support")
            reason = support.triton_unavailable_reason()
        if reason is None:
            try:
                import triton  # noqa: F401
                import triton.language  # noqa: F401
            except Exception as exc:  # noqa: BLE001 - any import failure costs the backend only
                reason = f"triton import failed: {type(exc).__name__}: {exc}"
        _TRITON_REASON.append(reason)
    return _TRITON_REASON[0]


_IMPORT_ERRORS: Dict[str, str] = {}
_loaded: List[bool] = []


def _load_optional() -> None:
    """Import the modules that register the compiled backends (once; lazily, so
    that ``import edt_kernels`` stays cheap and triton optional).  A module that
    fails to import leaves a backend that reports the error."""
    if _loaded:
        return
    _loaded.append(True)
    for mod in ("ops.amm_attention", "ops.amm_attention_cpp"):
        if mod == "ops.amm_attention" and triton_unavailable_reason() is not None:
            _IMPORT_ERRORS[mod] = triton_unavailable_reason()
            continue
        try:
            importlib.import_module(f"{__package__}.{mod}")
        except Exception as exc:  # noqa: BLE001
            _IMPORT_ERRORS[mod] = f"{type(exc).__name__}: {exc}"
    if "ops.amm_attention" in _IMPORT_ERRORS and "triton" not in _BACKENDS.get("amm_attention", {}):
        why = _IMPORT_ERRORS["ops.amm_attention"]
        register("amm_attention", FunctionBackend("triton", _unreachable, unavailable=lambda: why))


def _unreachable(inp):  # pragma: no cover - guarded by unavailable_reason
    raise RuntimeError("unavailable backend called")
