"""Public ``amm_attention``: validation and dispatch over backends.

Backends (xformers-style): each says which inputs it supports and why not;
``backend="auto"`` takes the first that fits in the order
``triton`` (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` when asked
explicitly), ``cpp`` (CPU tensors, the compiled extension from ``csrc/``) and
``torch`` (the materialising reference, any device and dtype); ``eager`` (the
authors' published code path) runs only when named.  The environment variable
``EDT_KERNELS_BACKEND`` replaces ``"auto"`` (see :mod:`edt_kernels.backends`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch

from . import backends as _backends
from ._tracing import is_tracing
from ._validation import check_tensor, coerce_amm, infer_grid
from .amm import AMM, GridLike, cached_amm_offset_table, normalize_grid
from .reference.attention import eager_attention, reference_attention

__all__ = [
    "amm_attention",
    "amm_attention_qkvpacked",
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
    # amm_attention_qkvpacked: the [B, N, 3, H, D] tensor that q, k, v are views of
    qkv: Optional[torch.Tensor] = None

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
        # float64 inputs get the float64 AMM; every other dtype computes with the float32 one
        dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        return cached_amm_offset_table((self.rows, self.cols), self.amm, device=self.device, dtype=dtype)

    def kernel_args(self) -> Tuple:
        """Positional arguments of the backend custom ops (see ``ops/_attention_op``)."""
        return (self.q, self.k, self.v, self.table, self.positions, self.amm_table(),
                self.bias, self.modulation, self.scale, self.rows, self.cols)

    def packed_kernel_args(self) -> Tuple:
        """Positional arguments of the packed-qkv custom ops: ``kernel_args`` with
        ``qkv [B, N, 3, H, D]`` in place of ``q, k, v``."""
        return (self.qkv,) + self.kernel_args()[3:]


class AttentionBackend(_backends.Backend):
    """One way of computing ``amm_attention`` (see :mod:`edt_kernels.backends`)."""

    name: str = "?"

    def not_supported_reasons(self, inp: AttentionInputs) -> List[str]:
        raise NotImplementedError

    def apply(self, inp: AttentionInputs) -> torch.Tensor:
        raise NotImplementedError

    def apply_qkvpacked(self, inp: AttentionInputs) -> torch.Tensor:
        """``amm_attention_qkvpacked``: ``[B, N, H, D]`` from ``inp.qkv``.

        This default runs :meth:`apply` on ``inp.q/k/v``, the ``qkv.unbind(2)``
        views, so autograd stacks their three gradients into one new
        ``[B, N, 3, H, D]`` tensor (one copy); a backend whose kernels write
        through strides overrides it to write ``dqkv`` in place (triton)."""
        return self.apply(inp).transpose(1, 2)


class TorchBackend(AttentionBackend):
    """The materialising PyTorch reference: any device/dtype, O(N^2) memory."""

    name = "torch"

    def not_supported_reasons(self, inp):
        return []

    def apply(self, inp):
        return reference_attention(inp.q, inp.k, inp.v, scale=inp.scale, rel_pos_bias=inp.table,
                                   grid=(inp.rows, inp.cols), positions=inp.positions,
                                   amm=inp.amm, bias=inp.bias, modulation=inp.modulation)


class EagerBackend(AttentionBackend):
    """The authors' published materialising code path (``eager_attention``):
    any device/dtype; chosen only when asked for by name."""

    name = "eager"

    def not_supported_reasons(self, inp):
        return []

    def auto_reasons(self, inp):
        return ["'auto' never picks the published eager path (ask backend='eager')"]

    def apply(self, inp):
        return eager_attention(inp.q, inp.k, inp.v, scale=inp.scale, rel_pos_bias=inp.table,
                               grid=(inp.rows, inp.cols), positions=inp.positions,
                               amm=inp.amm, bias=inp.bias, modulation=inp.modulation)


OP = "amm_attention"


def register_backend(backend: AttentionBackend, auto_rank: Optional[int] = None) -> None:
    """Add a backend of ``amm_attention``; ``auto_rank`` places it in the
    ``"auto"`` order (lower first), whatever the order in which backends register."""
    _backends.register(OP, backend, auto_rank)


def available_backends() -> List[str]:
    """The ``amm_attention`` backends that can run on this machine (``triton``
    only where triton imports and is supported, ``cpp`` only where the extension
    is prebuilt or a compiler and ninja can build it)."""
    return _backends.available(OP)


_load_optional_backends = _backends._load_optional
_IMPORT_ERRORS = _backends._IMPORT_ERRORS

register_backend(TorchBackend(), auto_rank=100)
register_backend(EagerBackend())


def select_backend(inp: AttentionInputs, backend: str = "auto") -> AttentionBackend:
    """The backend that will run ``inp``; raises ``ValueError`` listing every
    backend's reasons when none fits."""
    return _backends.select(OP, inp, backend)


# ----------------------------------------------------------------------------- validation

def _check_tensor(name: str, t, allow_none: bool = True) -> None:
    check_tensor(name, t, floating=False, allow_none=allow_none)


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
                    amm=None, bias=None, modulation=None, n_name: str = "q.shape[2]") -> AttentionInputs:
    """Check every argument of ``amm_attention``; raise ``TypeError``/``ValueError``
    naming the argument and the expected shape or type (``n_name``: where the
    messages say the token count N comes from)."""
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

    amm = coerce_amm(amm)

    uses_grid = rel_pos_bias is not None or amm is not None
    if grid is None:
        if positions is not None and uses_grid:
            raise ValueError("grid must be given with positions (the token grid is not N)")
        if uses_grid:
            rows = cols = infer_grid(N, f"N = {n_name}")
        else:  # the grid is unused: the square side when there is one, else one row
            side = math.isqrt(N)
            rows, cols = (side, side) if side * side == N else (1, N)
    else:
        rows, cols = normalize_grid(grid)
    if positions is None and uses_grid and rows * cols != N:
        raise ValueError(f"without positions, N = {n_name} = {N} must equal rows*cols of "
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
        backend: ``"auto"``, ``"triton"``, ``"cpp"``, ``"torch"`` (the
            float64-grade reference) or ``"eager"`` (the authors' published
            materialising code path, never picked by ``"auto"``).

    Returns:
        ``[B, H, N, D]`` in q's dtype.
    """
    inp = validate_inputs(q, k, v, scale=scale, rel_pos_bias=rel_pos_bias, grid=grid,
                          positions=positions, amm=amm, bias=bias, modulation=modulation)
    return select_backend(inp, backend).apply(inp)


# ----------------------------------------------------------------------------- packed qkv

def validate_qkvpacked(qkv, **kwargs) -> AttentionInputs:
    """Check the arguments of ``amm_attention_qkvpacked``: ``qkv`` is
    ``[B, N, 3, H, D]``; the keyword options as in :func:`validate_inputs`.
    The returned inputs hold ``qkv`` and its ``[B, H, N, D]`` views
    ``q, k, v = qkv.unbind(2)`` transposed (no copy)."""
    _check_tensor("qkv", qkv, allow_none=False)
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError("qkv must be [B, N, 3, H, D] (the fused qkv projection's output reshaped, "
                         f"without a permute), got shape {tuple(qkv.shape)}")
    if qkv.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"qkv must be float16, bfloat16, float32 or float64, got {qkv.dtype}")
    if not 1 <= qkv.shape[-1] <= MAX_HEAD_DIM:
        raise ValueError(f"head dim D = qkv.shape[-1] must be in 1..{MAX_HEAD_DIM}, got {qkv.shape[-1]}")
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # (B, H, N, D) views
    inp = validate_inputs(q, k, v, n_name="qkv.shape[1]", **kwargs)
    inp.qkv = qkv
    return inp


def amm_attention_qkvpacked(qkv: torch.Tensor, *,
                            scale: Optional[float] = None,
                            rel_pos_bias: Optional[torch.Tensor] = None,
                            grid: Optional[GridLike] = None,
                            positions: Optional[torch.Tensor] = None,
                            amm: Union[None, bool, AMM] = None,
                            bias: Optional[torch.Tensor] = None,
                            modulation: Optional[torch.Tensor] = None,
                            backend: str = "auto") -> torch.Tensor:
    """:func:`amm_attention` of ``q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))``,
    from one packed tensor::

        qkv = attn.qkv(x).reshape(B, N, 3, H, D)       # timm / DiT / MDT / EDT, no permute
        out = amm_attention_qkvpacked(qkv, rel_pos_bias=table, grid=16, amm=True)
        x = attn.proj(out.reshape(B, N, H * D))

    Args:
        qkv: ``[B, N, 3, H, D]``, any strides (read in place); dtypes as
            :func:`amm_attention`.
        scale, rel_pos_bias, grid, positions, amm, bias, modulation, backend:
            as :func:`amm_attention` (N is ``qkv.shape[1]``).

    Returns:
        ``[B, N, H, D]`` in qkv's dtype: the tokens' layout, so that
        ``out.reshape(B, N, H * D)`` is a view on the ``triton`` backend (whose
        output is contiguous); other backends may return a strided ``[B, N, H, D]``.

    Gradient: on the ``triton`` backend the backward kernels write ``dq, dk, dv``
    straight into one ``[B, N, 3, H, D]`` buffer, which autograd passes on as
    qkv's gradient (no stack, no copy).  The ``cpp``, ``torch`` and ``eager``
    backends compute ``dq, dk, dv`` apart and autograd stacks them into one
    new ``[B, N, 3, H, D]`` tensor (one copy).
    """
    inp = validate_qkvpacked(qkv, scale=scale, rel_pos_bias=rel_pos_bias, grid=grid,
                             positions=positions, amm=amm, bias=bias, modulation=modulation)
    chosen = select_backend(inp, backend)
    # A backend registered from outside may be a plain backends.Backend: the default applies.
    packed = getattr(type(chosen), "apply_qkvpacked", AttentionBackend.apply_qkvpacked)
    return packed(chosen, inp)
