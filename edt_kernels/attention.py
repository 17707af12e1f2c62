"""Public ``amm_attention``: validation and dispatch over backends.

The backends live in ``edt_kernels.ops`` (``amm_attention`` Triton,
``amm_attention_cpp`` C++, ``amm_attention_torch`` the references), each
registered by its own module on import; this module imports them all, so that
every backend is known before the first call.

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
from typing import Dict, List, Optional, Union

import torch

from . import backends as _backends
from .backends import check_values
from ._tracing import is_tracing
from ._validation import check_tensor, coerce_amm, infer_grid
from .amm import AMM, GridLike, normalize_grid
from .ops import amm_attention as _triton, amm_attention_cpp as _cpp, amm_attention_torch as _torch  # noqa: F401
from .ops._attention_op import OP, AttentionBackend, AttentionInputs

__all__ = [
    "amm_attention",
    "amm_attention_qkvpacked",
    "available_backends",
    "select_backend",
    "MAX_HEAD_DIM",
]

MAX_HEAD_DIM = 256
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def available_backends() -> List[str]:
    """The ``amm_attention`` backends that can run on this machine (``triton``
    only where triton imports and is supported, ``cpp`` only where the extension
    is prebuilt or a compiler and ninja can build it)."""
    return _backends.available(OP)


def select_backend(inp: AttentionInputs, backend: str = "auto") -> AttentionBackend:
    """The backend that will run ``inp``; raises ``ValueError`` listing every
    backend's reasons when none fits."""
    return _backends.select(OP, inp, backend)


# ----------------------------------------------------------------------------- validation

def _check_tensor(name: str, t, allow_none: bool = True) -> None:
    check_tensor(name, t, floating=False, allow_none=allow_none)


_checked_positions: "Dict[tuple, torch.Tensor]" = {}


def _check_positions_range(positions: torch.Tensor, rows: int, cols: int) -> None:
    """Range check of the positions, run only when value checks are on
    (:func:`edt_kernels.set_check_values`, ``EDT_KERNELS_CHECK_VALUES=1``): it reads
    the values back, a host sync on a GPU.  A model passes the same ``ids_keep``
    tensor to every block of a step, so the last few tensors checked are remembered
    by identity and version: one sync per step, not per block."""
    key = (id(positions), positions._version, rows * cols)
    if _checked_positions.get(key) is positions:  # the cache holds the tensor: ids are not reused
        return
    lo, hi = positions.aminmax()
    lo, hi = torch.stack([lo, hi]).tolist()
    if lo < 0 or hi >= rows * cols:
        raise ValueError(f"positions must lie in [0, rows*cols) = [0, {rows * cols}) for "
                         f"grid ({rows}, {cols}), got values in [{lo}, {hi}]")
    if len(_checked_positions) >= 8:
        _checked_positions.pop(next(iter(_checked_positions)))
    _checked_positions[key] = positions


def _check_4d(name: str, t: torch.Tensor, B: int, H: int, N: int) -> None:
    """``t`` has at most 4 dims and is broadcastable to ``[B, H, N, N]``."""
    if t.dim() > 4:
        raise ValueError(f"{name} must have at most 4 dims broadcastable to [B, H, N, N] = "
                         f"[{B}, {H}, {N}, {N}], got shape {tuple(t.shape)}")
    while t.dim() < 4:
        t = t.unsqueeze(0)
    for got, want, dim in zip(t.shape, (B, H, N, N), "BHNN"):
        if got not in (1, want):
            raise ValueError(f"{name} of shape {tuple(t.shape)} is not broadcastable to "
                             f"[B, H, N, N] = [{B}, {H}, {N}, {N}] (dim {dim})")


def _plan(q, k, v, scale, rel_pos_bias, grid, positions, amm, bias, modulation, n_name: str) -> tuple:
    """Every check of the arguments that looks at types, shapes, dtypes and devices only;
    ``(rows, cols, scale, amm, uses_grid)``."""
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
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")

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
            rows, cols = (side, side) if side * side == N and N > 0 else (1, max(N, 1))
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
        _check_4d("bias", bias, B, H, N)
    if modulation is not None:
        _check_4d("modulation", modulation, B, H, N)
    return rows, cols, scale, amm, uses_grid


_PLANS: "Dict[tuple, tuple]" = {}  # _plan_key -> _plan's result
_PLANS_LIMIT = 1024


def _value_key(x):
    """``x`` (a scale, grid or amm argument) as a key that tells ``True`` from ``1``;
    ``TypeError`` for a value that is not kept (a list, a tensor ...)."""
    if x is None or type(x) in (int, float, bool, AMM):
        return type(x), x
    if type(x) is tuple:
        return tuple, tuple(map(_value_key, x))
    raise TypeError("not a plain value")


def _tensor_key(t):
    return None if t is None else (type(t), t.shape, t.dtype, t.device)


def validate_inputs(q, k, v, *, scale=None, rel_pos_bias=None, grid=None, positions=None,
                    amm=None, bias=None, modulation=None, n_name: str = "q.shape[2]") -> AttentionInputs:
    """Check every argument of ``amm_attention``; raise ``TypeError``/``ValueError``
    naming the argument and the expected shape or type (``n_name``: where the
    messages say the token count N comes from).

    The checks see types, shapes, dtypes and devices, so their outcome is kept per
    such signature: a repeated call costs one key and one look-up.  The values of
    ``positions`` are checked only when value checks are on
    (:func:`edt_kernels.set_check_values`); the kernels never read out of range either way."""
    key = plan = None
    if not torch.compiler.is_compiling():  # traced once per graph: no cache for Dynamo to guard on
        try:
            key = (_tensor_key(q), _tensor_key(k), _tensor_key(v), _tensor_key(rel_pos_bias),
                   _tensor_key(positions), _tensor_key(bias), _tensor_key(modulation), _value_key(scale),
                   _value_key(grid), _value_key(amm))
            plan = _PLANS.get(key)
        except (AttributeError, TypeError):  # not tensors / not plain values: the full checks say what is wrong
            key = None
    if plan is None:
        plan = _plan(q, k, v, scale, rel_pos_bias, grid, positions, amm, bias, modulation, n_name)
        if key is not None:
            if len(_PLANS) >= _PLANS_LIMIT:
                _PLANS.clear()
            _PLANS[key] = plan
    rows, cols, scale, amm, uses_grid = plan
    if positions is not None:
        if not uses_grid:
            positions = None  # positions only matter through the table / AMM
        else:
            if check_values() and positions.numel() and not is_tracing():
                _check_positions_range(positions, rows, cols)
            if positions.dtype is not torch.int64:
                positions = positions.long()
    if bias is not None and bias.dim() < 4:
        bias = bias[(None,) * (4 - bias.dim())]
    if modulation is not None and modulation.dim() < 4:
        modulation = modulation[(None,) * (4 - modulation.dim())]
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
