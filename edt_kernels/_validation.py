"""Argument checks shared by every public op: one tensor check, one AMM
coercion, one square-grid inference.  Each raises ``TypeError``/``ValueError``
naming the argument, what was expected and what was given."""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch

from ._tracing import is_tracing
from .backends import check_values
from .amm import AMM

__all__ = ["check_tensor", "check_shape", "check_eps", "coerce_amm", "infer_grid", "check_ids",
           "check_id_values", "check_tokens"]


def check_tensor(name: str, t, ndim: Optional[int] = None, dims: str = "", *, device=None,
                 floating: bool = True, allow_none: bool = False) -> None:
    """``t`` is a tensor (or None when ``allow_none``) with ``ndim`` dims
    (described by ``dims``, e.g. ``"[B, L, C]"``), floating point when asked, on
    ``device`` when given."""
    if t is None and allow_none:
        return
    if not isinstance(t, torch.Tensor):
        what = f" {dims}" if dims else ""
        raise TypeError(f"{name} must be a torch.Tensor{what}{' or None' if allow_none else ''}, "
                        f"got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {dims}, got shape {list(t.shape)}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on the device of x ({device}), got {t.device}")


def check_shape(name: str, t: torch.Tensor, expected: Tuple[int, ...], dims: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must be {dims} = {list(expected)}, got {list(t.shape)}")


def check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    return float(eps)


def coerce_amm(amm: Union[None, bool, AMM], name: str = "amm") -> Optional[AMM]:
    """The one meaning of the ``amm`` argument: ``None`` or ``False`` = no AMM,
    ``True`` = the published AMM (``AMM()``), an ``AMM`` = that configuration."""
    if amm is None or amm is False:
        return None
    if amm is True:
        return AMM()
    if isinstance(amm, AMM):
        return amm
    raise TypeError(f"{name} must be None, True/False or an edt_kernels.AMM config, got {type(amm).__name__}")


def infer_grid(num_tokens: int, name: str = "N") -> int:
    """The side ``n`` of the square grid of ``num_tokens = n * n`` tokens (used
    when no ``grid`` is given); ``ValueError`` naming ``name`` when it is not a square."""
    side = math.isqrt(num_tokens) if num_tokens >= 0 else -1
    if side < 0 or side * side != num_tokens:
        raise ValueError(f"grid not given and {name} = {num_tokens} is not a square: pass grid=(rows, cols)")
    return side


def check_ids(name: str, ids, B: int, dims: str, count: Optional[int], device) -> None:
    """int64 ``[B, count]`` (any count when None) on ``device``."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be an int64 torch.Tensor {dims}, got {type(ids).__name__}")
    if ids.dtype != torch.int64:
        raise TypeError(f"{name} must be int64 {dims}, got {ids.dtype}")
    if ids.dim() != 2 or ids.shape[0] != B or (count is not None and ids.shape[1] != count):
        want = f"[{B}, {count if count is not None else 'K'}]"
        raise ValueError(f"{name} must be {dims} = {want}, got {list(ids.shape)}")
    if ids.device != device:
        raise ValueError(f"{name} must be on the device of x ({device}), got {ids.device}")


def check_id_values(name: str, ids: torch.Tensor, upper: int, what: str) -> None:
    """Values in ``[0, upper)`` and unique per row: one host sync, so only when value checks
    are on (``edt_kernels.set_check_values``, ``EDT_KERNELS_CHECK_VALUES=1``) and not while
    tracing.  Unchecked, the kernels mask every index that is out of range."""
    if not check_values() or ids.numel() == 0 or is_tracing():
        return
    lo, hi = ids.aminmax()
    if ids.shape[1] > 1:
        s = ids.sort(dim=1).values
        dup = (s[:, 1:] == s[:, :-1]).any()
    else:
        dup = torch.zeros((), dtype=torch.bool, device=ids.device)
    lo, hi, dup = torch.stack([lo, hi, dup.long()]).tolist()
    if lo < 0 or hi >= upper:
        raise ValueError(f"{name} must lie in [0, {upper}) ({what}), got values in [{lo}, {hi}]")
    if dup:
        raise ValueError(f"{name} must not repeat an index within a row ({what}); "
                         f"found a duplicate")


def check_tokens(name: str, x) -> Tuple[int, int, int]:
    check_tensor(name, x, 3, "[B, L, C]")
    return tuple(x.shape)
