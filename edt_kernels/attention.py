"""Public ``amm_attention``: validation and dispatch over backends.

Backends (xformers-style): each says which inputs it supports and why not;
``backend="auto"`` takes the first that fits in the order
``triton`` (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` when asked
explicitly), ``cpp`` (CPU tensors, the compiled extension from ``csrc/``) and
``torch`` (the materialising reference, any device and dtype).  The environment
variable ``EDT_KERNELS_BACKEND`` overrides ``"auto"``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch

from ._tracing import is_tracing
from .amm import AMM, GridLike, cached_amm_offset_table, normalize_grid
from .reference.attention import reference_attention

__all__ = [
    "amm_attention",
    "AttentionInputs",
    "AttentionBackend",
    "register_backend",
    "available_backends",
    "select_backend",
    "MAX_HEAD_DIM",
]

MAX_HEAD_DIM = 256
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class AttentionInputs:
    """Validated, normalised arguments of one ``amm_attention`` call."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float
    rows: int
    cols: int
    table: Optional[torch.Tensor]  # [rows_t, H]
    positions: Optional[torch.Tensor]  # int64 [B, N] or [N]
    amm: Optional[AMM]
    bias: Optional[torch.Tensor]  # 4-d, broadcastable to [B, H, N, N]
    modulation: Optional[torch.Tensor]  # 4-d, broadcastable to [B, H, N, N]

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def head_dim(self) -> int:
        return self.q.shape[-1]

    def amm_table(self) -> Optional[torch.Tensor]:
        if self.amm is None:
            return None
        return cached_amm_offset_table((self.rows, self.cols), self.amm, device=self.device)

    def kernel_args(self) -> Tuple:
        """Positional arguments of the backend custom ops (see ``ops/_attention_op``)."""
        return (self.q, self.k, self.v, self.table, self.positions, self.amm_table(),
                self.bias, self.modulation, self.scale, self.rows, self.cols)


class AttentionBackend:
    """One way of computing ``amm_attention``."""

    name: str = "?"

    def not_supported_reasons(self, inp: AttentionInputs) -> List[str]:
        raise NotImplementedError

    def auto_reasons(self, inp: AttentionInputs) -> List[str]:
        """Why ``backend="auto"`` should not pick this backend (default: the same
        as for an explicit request)."""
        return self.not_supported_reasons(inp)

    def apply(self, inp: AttentionInputs) -> torch.Tensor:
        raise NotImplementedError


class TorchBackend(AttentionBackend):
    """The materialising PyTorch reference: any device/dtype, O(N^2) memory."""

    name = "torch"

    def not_supported_reasons(self, inp):
        return []

    def apply(self, inp):
        return reference_attention(inp.q, inp.k, inp.v, scale=inp.scale, rel_pos_bias=inp.table,
                                   grid=(inp.rows, inp.cols), positions=inp.positions,
                                   amm=inp.amm, bias=inp.bias, modulation=inp.modulation)


_BACKENDS: Dict[str, AttentionBackend] = {}
_AUTO_RANKS: Dict[str, int] = {}
_AUTO_ORDER: List[str] = []


def register_backend(backend: AttentionBackend, auto_rank: Optional[int] = None) -> None:
    """Add a backend; ``auto_rank`` places it in the ``"auto"`` order (lower first),
    whatever the order in which backends register."""
    _BACKENDS[backend.name] = backend
    _AUTO_RANKS.pop(backend.name, None)
    if auto_rank is not None:
        _AUTO_RANKS[backend.name] = auto_rank
    _AUTO_ORDER[:] = sorted(_AUTO_RANKS, key=_AUTO_RANKS.__getitem__)


def available_backends() -> List[str]:
    _load_optional_backends()
    return list(_BACKENDS)


_optional_loaded = False
_IMPORT_ERRORS: Dict[str, str] = {}


def _load_optional_backends() -> None:
    # Imported lazily so that `import edt_kernels` stays cheap and triton is optional.
    global _optional_loaded
    if _optional_loaded:
        return
    _optional_loaded = True
    import importlib

    for mod in ("amm_attention", "amm_attention_cpp"):  # register "triton" and "cpp"
        try:
            importlib.import_module(f"{__package__}.ops.{mod}")
        except ImportError as exc:  # triton missing / module absent: backend not offered
            _IMPORT_ERRORS[mod] = repr(exc)


register_backend(TorchBackend(), auto_rank=100)


def select_backend(inp: AttentionInputs, backend: str = "auto") -> AttentionBackend:
    """The backend that will run ``inp``; raises ``ValueError`` listing every
    backend's reasons when none fits."""
    _load_optional_backends()
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend == "auto":
        backend = os.environ.get("EDT_KERNELS_BACKEND", "auto") or "auto"
    if backend == "auto":
        reasons = {}
        for name in _AUTO_ORDER:
            why = _BACKENDS[name].auto_reasons(inp)
            if not why:
                return _BACKENDS[name]
            reasons[name] = why
        raise ValueError("no amm_attention backend supports these inputs: " + "; ".join(
            f"{n}: {', '.join(w)}" for n, w in reasons.items()))
    if backend not in _BACKENDS:
        missing = _IMPORT_ERRORS.get({"triton": "amm_attention", "cpp": "amm_attention_cpp"}.get(backend, ""))
        raise ValueError(f"backend must be 'auto' or one of {sorted(_BACKENDS)}, got {backend!r}"
                         + (f" (not available here: {missing})" if missing else ""))
    why = _BACKENDS[backend].not_supported_reasons(inp)
    if why:
        others = [n for n in _BACKENDS if n != backend and not _BACKENDS[n].not_supported_reasons(inp)]
        raise ValueError(f"backend {backend!r} does not support these inputs: {', '.join(why)}"
                         + (f" (supported by: {', '.join(others)})" if others else ""))
    return _BACKENDS[backend]


# ----------------------------------------------------------------------------- validation

def _check_tensor(name: str, t, allow_none: bool = True) -> None:
    if t is None and allow_none:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor{' or None' if allow_none else ''}, "
                        f"got {type(t).__name__}")


_checked_positions: "Dict[tuple, torch.Tensor]" = {}


def _check_positions_range(positions: torch.Tensor, rows: int, cols: int) -> None:
    """Range check of the positions (a host sync on GPU).  A model passes the same
    ``ids_keep`` tensor to every block of a step, so the last few tensors checked
    are remembered by identity and version: one sync per step, not per block."""
    key = (id(positions), positions._version, rows * cols)
    if _checked_positions.get(key) is positions:  # the cache holds the tensor: ids are not reused
        return
    lo, hi = int(positions.min()), int(positions.max())
    if lo < 0 or hi >= rows * cols:
        raise ValueError(f"positions must lie in [0, rows*cols) = [0, {rows * cols}) for "
                         f"grid ({rows}, {cols}), got values in [{lo}, {hi}]")
    if len(_checked_positions) >= 8:
        _checked_positions.pop(next(iter(_checked_positions)))
    _checked_positions[key] = positions


def _as_4d(name: str, t: torch.Tensor, B: int, H: int, N: int) -> torch.Tensor:
    if t.dim() > 4:
        raise ValueError(f"{name} must have at most 4 dims broadcastable to [B, H, N, N] = "
                         f"[{B}, {H}, {N}, {N}], got shape {tuple(t.shape)}")
    while t.dim() < 4:
        t = t.unsqueeze(0)
    for got, want, dim in zip(t.shape, (B, H, N, N), "BHNN"):
        if got not in (1, want):
            raise ValueError(f"{name} of shape {tuple(t.shape)} is not broadcastable to "
                             f"[B, H, N, N] = [{B}, {H}, {N}, {N}] (dim {dim})")
    return t


def validate_inputs(q, k, v, *, scale=None, rel_pos_bias=None, grid=None, positions=None,
                    amm=None, bias=None, modulation=None) -> AttentionInputs:
    """Check every argument of ``amm_attention``; raise ``TypeError``/``ValueError``
    naming the argument and the expected shape or type."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t, allow_none=False)
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, H, N, D], got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    B, H, N, D = q.shape
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{name} must have the shape of q [B, H, N, D] = {list(q.shape)}, "
                             f"got {list(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of q ({q.dtype}), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device ({q.device}), got {t.device}")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"head dim D = q.shape[-1] must be in 1..{MAX_HEAD_DIM}, got {D}")
    if scale is None:
        scale = D ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    scale = float(scale)

    for name, t in (("rel_pos_bias", rel_pos_bias), ("positions", positions), ("bias", bias),
                    ("modulation", modulation)):
        _check_tensor(name, t)
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} must be on q's device ({q.device}), got {t.device}")

    if amm is False:
        amm = None
    if amm is True:
        amm = AMM()
    if amm is not None and not isinstance(amm, AMM):
        raise TypeError(f"amm must be None, True/False or an edt_kernels.AMM config, "
                        f"got {type(amm).__name__}")

    uses_grid = rel_pos_bias is not None or amm is not None
    if grid is None:
        if positions is not None and uses_grid:
            raise ValueError("grid must be given with positions (the token grid is not N)")
        side = int(round(N ** 0.5))
        if uses_grid and side * side != N:
            raise ValueError(f"grid not given and N = {N} is not a square: pass grid=(rows, cols)")
        rows, cols = (side, side) if side * side == N else (1, N)
    else:
        rows, cols = normalize_grid(grid)
    if positions is None and uses_grid and rows * cols != N:
        raise ValueError(f"without positions, N = q.shape[2] = {N} must equal rows*cols of "
                         f"grid ({rows}, {cols}) = {rows * cols}; pass positions for a token subset")

    if positions is not None and uses_grid:
        if positions.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"positions must be int64 (flat grid indices), got {positions.dtype}")
        if positions.dim() == 1:
            if positions.shape[0] != N:
                raise ValueError(f"positions must be [N] or [B, N] = [{B}, {N}], got {list(positions.shape)}")
        elif positions.dim() == 2:
            if tuple(positions.shape) != (B, N):
                raise ValueError(f"positions must be [N] or [B, N] = [{B}, {N}], got {list(positions.shape)}")
        else:
            raise ValueError(f"positions must be [N] or [B, N] = [{B}, {N}], got {list(positions.shape)}")
        if positions.numel() and not is_tracing():
            _check_positions_range(positions, rows, cols)
        positions = positions.long()
    elif not uses_grid:
        positions = None  # positions only matter through the table / AMM

    if rel_pos_bias is not None:
        need = (2 * rows - 1) * (2 * cols - 1)
        if rel_pos_bias.dim() != 2 or rel_pos_bias.shape[1] != H or rel_pos_bias.shape[0] < need:
            raise ValueError(
                f"rel_pos_bias must be [(2*rows-1)*(2*cols-1) + extra, H] = [>= {need}, {H}] for "
                f"grid ({rows}, {cols}), got {list(rel_pos_bias.shape)}")
        if not rel_pos_bias.is_floating_point():
            raise TypeError(f"rel_pos_bias must be floating point, got {rel_pos_bias.dtype}")
    for name, t in (("bias", bias), ("modulation", modulation)):
        if t is not None and not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if bias is not None:
        bias = _as_4d("bias", bias, B, H, N)
    if modulation is not None:
        modulation = _as_4d("modulation", modulation, B, H, N)

    return AttentionInputs(q=q, k=k, v=v, scale=scale, rows=rows, cols=cols, table=rel_pos_bias,
                           positions=positions, amm=amm, bias=bias, modulation=modulation)


def amm_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                  scale: Optional[float] = None,
                  rel_pos_bias: Optional[torch.Tensor] = None,
                  grid: Optional[GridLike] = None,
                  positions: Optional[torch.Tensor] = None,
                  amm: Union[None, bool, AMM] = None,
                  bias: Optional[torch.Tensor] = None,
                  modulation: Optional[torch.Tensor] = None,
                  backend: str = "auto") -> torch.Tensor:
    """Fused attention with relative-position table, EDT's AMM and token subsets::

        out = (softmax(q k^T * scale + T[idx(p_i, p_j)] + bias) ⊙ M(p_i, p_j) ⊙ modulation) v

    Args:
        q, k, v: ``[B, H, N, D]`` float16/bfloat16/float32 (float64 on the torch
            and cpp backends), D <= 256; strided views are read in place.
        scale: softmax scale, default ``D ** -0.5``.
        rel_pos_bias: learned table ``[(2 rows - 1)(2 cols - 1) + extra, H]``
            (BEiT/Swin/MDT/EDT layout), gathered in-kernel; receives a gradient.
        grid: ``n`` or ``(rows, cols)``; default: ``sqrt(N)`` when N is square.
        positions: ``[B, N]`` or ``[N]`` int64 flat grid indices of the tokens
            (MDT's ``ids_keep``); default ``arange(N)``.
        amm: ``None``/``False``, ``True`` (the published AMM) or ``AMM(...)``;
            applied after the softmax, without renormalisation.
        bias: dense additive pre-softmax bias broadcastable to ``[B, H, N, N]``
            (receives a gradient).
        modulation: dense post-softmax multiplier broadcastable to ``[B, H, N, N]``
            (no gradient).
        backend: ``"auto"``, ``"triton"``, ``"cpp"`` or ``"torch"``.

    Returns:
        ``[B, H, N, D]`` in q's dtype.
    """
    inp = validate_inputs(q, k, v, scale=scale, rel_pos_bias=rel_pos_bias, grid=grid,
                          positions=positions, amm=amm, bias=bias, modulation=modulation)
    return select_backend(inp, backend).apply(inp)
