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
backends would take the inputs.  ``EDT_KERNELS_BACKEND`` replaces ``"auto"``
for every op that has a backend of that name; other ops stay on ``"auto"``.

The choice is cached per call signature: every call object has a
``signature()`` (device type, dtypes, which optional inputs are present, the
shape facts a reason looks at), and a backend's reasons may depend on nothing
else of the inputs.  The environment (``EDT_KERNELS_BACKEND``,
``EDT_KERNELS_CUDA_TOKENS``, ``EDT_KERNELS_CHECK_VALUES``, ``EDT_KERNELS_ALLOW_TF32``) is read once, at
import; :func:`set_backend`, :func:`set_check_values` and :func:`refresh` (re-read
the environment) change the settings at run time and clear the cache.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Optional

import torch

__all__ = [
    "Backend",
    "set_backend",
    "set_check_values",
    "check_values",
    "cuda_tokens_opted_in",
    "allow_tf32",
    "refresh",
    "FunctionBackend",
    "register",
    "backends_of",
    "available",
    "select",
    "env_backend",
    "ENV_VAR",
    "OpCall",
]

ENV_VAR = "EDT_KERNELS_BACKEND"
CHECK_VALUES_VAR = "EDT_KERNELS_CHECK_VALUES"
CUDA_TOKENS_VAR = "EDT_KERNELS_CUDA_TOKENS"
ALLOW_TF32_VAR = "EDT_KERNELS_ALLOW_TF32"


class _Settings:
    """The process-wide settings, from the environment at import (:func:`refresh`)."""

    backend = "auto"
    check_values = False
    cuda_tokens = False
    allow_tf32 = False


_CHOICES: Dict[tuple, "Backend"] = {}  # (op, backend, signature) -> the backend select() picked
_CHOICES_LIMIT = 4096


def _flag(var: str) -> bool:
    return os.environ.get(var, "0") == "1"


def refresh() -> None:
    """Read ``EDT_KERNELS_BACKEND``, ``EDT_KERNELS_CUDA_TOKENS``, ``EDT_KERNELS_CHECK_VALUES``
    and ``EDT_KERNELS_ALLOW_TF32`` again (after changing ``os.environ`` at run time) and
    forget every cached backend choice."""
    _Settings.backend = os.environ.get(ENV_VAR, "") or "auto"
    _Settings.check_values = _flag(CHECK_VALUES_VAR)
    _Settings.cuda_tokens = _flag(CUDA_TOKENS_VAR)
    _Settings.allow_tf32 = _flag(ALLOW_TF32_VAR)
    _CHOICES.clear()


def set_backend(name: str = "auto") -> None:
    """Run every op on backend ``name`` where it has one (as ``EDT_KERNELS_BACKEND``
    does), ``"auto"`` for the default choice; calls that name a backend keep it."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str, got {type(name).__name__}")
    _Settings.backend = name or "auto"
    _CHOICES.clear()


def set_check_values(enabled: bool) -> None:
    """Turn the value checks of index arguments on or off (``EDT_KERNELS_CHECK_VALUES=1``
    at start-up turns them on): attention ``positions`` in range, token ``ids`` in range
    and unique per row.  Each check reads the values back, a host sync on a GPU, so they
    are off by default; the kernels never read out of bounds either way."""
    _Settings.check_values = bool(enabled)


def check_values() -> bool:
    """Whether the index value checks run (see :func:`set_check_values`)."""
    return _Settings.check_values


def allow_tf32() -> bool:
    """Whether the Triton attention kernels may use tf32 dots on float32 inputs
    (``EDT_KERNELS_ALLOW_TF32=1``)."""
    return _Settings.allow_tf32


def cuda_tokens_opted_in() -> bool:
    """Whether ``"auto"`` may pick the CUDA token kernels (``EDT_KERNELS_CUDA_TOKENS=1``)."""
    return _Settings.cuda_tokens


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
    _CHOICES.clear()
    ranks = _RANKS.setdefault(op, {})
    ranks.pop(backend.name, None)
    if auto_rank is not None:
        ranks[backend.name] = auto_rank
    return backend


def backends_of(op: str) -> Dict[str, Backend]:
    return dict(_BACKENDS.get(op, {}))


def available(op: str) -> List[str]:
    """Names of the backends of ``op`` that can run on this machine."""
    return [n for n, b in backends_of(op).items() if b.unavailable_reason() is None]


def env_backend() -> str:
    """The backend every op runs on where it has one: ``EDT_KERNELS_BACKEND`` at
    start-up or :func:`set_backend` (``"auto"`` when unset or empty)."""
    return _Settings.backend


def _unavailable(backend: Backend) -> List[str]:
    why = backend.unavailable_reason()
    return [why] if why is not None else []


def select(op: str, inp: Any, backend: str = "auto") -> Backend:
    """The backend of ``op`` that will run ``inp``; ``ValueError`` with every
    backend's reasons when none fits.  Cached per ``(op, backend, inp.signature())``
    (a call object without ``signature``, or one traced by torch.compile, is not
    cached); a failed choice is not cached, so it raises again."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    sig = getattr(inp, "signature", None)
    if sig is None or torch.compiler.is_compiling():  # traced once per graph: no cache for Dynamo to guard on
        return _select(op, inp, backend)
    key = (op, backend, sig())
    chosen = _CHOICES.get(key)
    if chosen is None:
        chosen = _select(op, inp, backend)
        if len(_CHOICES) >= _CHOICES_LIMIT:
            _CHOICES.clear()
        _CHOICES[key] = chosen
    return chosen


def _select(op: str, inp: Any, backend: str) -> Backend:
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

    def signature(self) -> tuple:
        """What the token/adaLN backends' reasons look at: the device type, each
        tensor's dtype (None when absent) and its batch (first dim)."""
        return (self.device.type,) + tuple(
            None if t is None else (t.dtype, t.shape[0] if t.dim() else -1) for t in self.tensors.values())

    @property
    def device(self):
        return next(t.device for t in self.tensors.values() if t is not None)


refresh()
