"""Gather and scatter of token rows (MDT's ``ids_keep``), each the other's backward.

    gather_tokens(x, ids)          out[b, k] = x[b, ids[b, k]]            [B, L, C], [B, K] -> [B, K, C]
    scatter_tokens(y, ids, length) out[b, ids[b, k]] = y[b, k], 0 elsewhere  [B, K, C] -> [B, length, C]

Custom ops ``edt_kernels::gather_tokens(Tensor x, Tensor ids) -> Tensor`` and
``edt_kernels::scatter_tokens(Tensor y, Tensor ids, SymInt length) -> Tensor``
(fake kernels, autograd).  Their schemas equal those of the compiled token
kernels (``csrc/``), the ``"cpp"`` backend.  The ops do not validate; their
kernels mask every index, so an out-of-range one reads as a zero row and a
scatter to it is dropped.  ``unshuffle_rows`` (one output row per inverse
index, with an optional fill row) also serves ``unshuffle_with_mask_token``.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _validation as V
from ..backends import OpCall
from . import _triton_utils as _tu
from ._triton_utils import (
    cdiv, check_launchable, common_alignment, dispatch, multiple_of, next_power_of_2, register_op, tile_config, tl,
    triton, unit_stride,
)
from ..reference.tokens import reference_gather_tokens, reference_scatter_tokens

__all__ = ["gather_tokens", "scatter_tokens"]


# ============================================================================ kernels

@triton.jit
def _gather_rows_kernel(
    x_ptr, ids_ptr, out_ptr,
    L, K, C,
    stride_xb, stride_xl, stride_ib, stride_ob, stride_ol,
    ALIGN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # out[b, k, :] = x[b, ids[b, k], :]; an index outside [0, L) gives a zero row.
    C = multiple_of(C, ALIGN)
    stride_xb, stride_xl = multiple_of(stride_xb, ALIGN), multiple_of(stride_xl, ALIGN)
    stride_ob, stride_ol = multiple_of(stride_ob, ALIGN), multiple_of(stride_ol, ALIGN)
    pid_k = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    k = pid_k * BLOCK_T + tl.arange(0, BLOCK_T)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    k_ok = k < K
    c_ok = c < C
    idx = tl.load(ids_ptr + b * stride_ib + k, mask=k_ok, other=-1).to(tl.int64)
    src_ok = k_ok & (idx >= 0) & (idx < L)
    idx = tl.where(src_ok, idx, 0)
    v = tl.load(x_ptr + b * stride_xb + idx[:, None] * stride_xl + c[None, :],
                mask=src_ok[:, None] & c_ok[None, :], other=0.0)
    out_off = b * stride_ob + k[:, None].to(tl.int64) * stride_ol + c[None, :]
    tl.store(out_ptr + out_off, v.to(out_ptr.dtype.element_ty), mask=k_ok[:, None] & c_ok[None, :])


@triton.jit
def _invert_ids_kernel(ids_ptr, inv_ptr, L, K, stride_ib, stride_vb, BLOCK_K: tl.constexpr):
    # inv[b, ids[b, k]] = k for in-range ids (inv is pre-filled with -1).
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    k = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = k < K
    idx = tl.load(ids_ptr + b * stride_ib + k, mask=k_ok, other=-1).to(tl.int64)
    ok = k_ok & (idx >= 0) & (idx < L)
    idx = tl.where(ok, idx, 0)
    tl.store(inv_ptr + b * stride_vb + idx, k.to(inv_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _unshuffle_rows_kernel(
    src_ptr, inv_ptr, fill_ptr, pos_ptr, out_ptr,
    L, K, C,
    stride_sb, stride_sl, stride_vb, stride_pl, stride_ob, stride_ol,
    HAS_FILL: tl.constexpr, HAS_POS: tl.constexpr,
    ALIGN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # out[b, l] = (src[b, r] if 0 <= r < K else fill) + pos[l],  r = inv[b, l].
    # With inv = ids_restore and fill = mask token this is MDT's "append mask
    # tokens, unshuffle, add pos_embed"; with inv = inverse of ids and no fill
    # it is the scatter of kept rows into zeros.  Every output row is written.
    C = multiple_of(C, ALIGN)
    stride_sb, stride_sl = multiple_of(stride_sb, ALIGN), multiple_of(stride_sl, ALIGN)
    stride_pl = multiple_of(stride_pl, ALIGN)
    stride_ob, stride_ol = multiple_of(stride_ob, ALIGN), multiple_of(stride_ol, ALIGN)
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    l = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    l_ok = l < L
    c_ok = c < C
    ok = l_ok[:, None] & c_ok[None, :]
    r = tl.load(inv_ptr + b * stride_vb + l, mask=l_ok, other=-1).to(tl.int64)
    kept = l_ok & (r >= 0) & (r < K)
    r = tl.where(kept, r, 0)
    v = tl.load(src_ptr + b * stride_sb + r[:, None] * stride_sl + c[None, :],
                mask=kept[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
    if HAS_FILL:
        fill = tl.load(fill_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
        v = tl.where(kept[:, None], v, fill[None, :])
    if HAS_POS:
        v += tl.load(pos_ptr + l[:, None].to(tl.int64) * stride_pl + c[None, :], mask=ok,
                     other=0.0).to(tl.float32)
    out_off = b * stride_ob + l[:, None].to(tl.int64) * stride_ol + c[None, :]
    tl.store(out_ptr + out_off, v.to(out_ptr.dtype.element_ty), mask=ok)

# ============================================================================ launchers

def gather_rows(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``out[b, k] = x[b, ids[b, k]]`` (zero row for an index outside [0, L))."""
    check_launchable(x)
    x, ids = unit_stride(x), unit_stride(ids)
    B, L, C = x.shape
    K = ids.shape[1]
    out = _tu.empty_output((B, K, C), x.dtype, x.device)
    if out.numel() == 0:
        return out
    block_c, block_t, num_warps = tile_config(C)
    grid = (cdiv(K, block_t), cdiv(C, block_c), B)
    _gather_rows_kernel[grid](
        x, ids, out, L, K, C,
        x.stride(0), x.stride(1), ids.stride(0), out.stride(0), out.stride(1),
        ALIGN=common_alignment(x.element_size(), C, x.stride(0), x.stride(1), out.stride(0), out.stride(1)),
        BLOCK_T=block_t, BLOCK_C=block_c, num_warps=num_warps,
    )
    return out


def unshuffle_rows(src: torch.Tensor, inv: torch.Tensor, fill: Optional[torch.Tensor],
                   pos: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    """``out[b, l] = (src[b, inv[b, l]]`` if ``0 <= inv[b, l] < K`` else ``fill`` or 0)
    ``+ pos[0, l]``; ``[B, K, C]``, ``[B, L]`` -> ``[B, L, C]``."""
    check_launchable(src)
    src, inv = unit_stride(src), unit_stride(inv)
    B, K, C = src.shape
    L = inv.shape[1]
    out = _tu.empty_output((B, L, C), out_dtype, src.device)
    if out.numel() == 0:
        return out
    if fill is not None:
        fill = fill.reshape(C).contiguous()
    if pos is not None:
        pos = unit_stride(pos.reshape(L, C))
    block_c, block_t, num_warps = tile_config(C)
    grid = (cdiv(L, block_t), cdiv(C, block_c), B)
    sb, sl, pl, ob, ol = src.stride(0), src.stride(1), pos.stride(0) if pos is not None else 0, out.stride(0), \
        out.stride(1)
    _unshuffle_rows_kernel[grid](
        src, inv, fill if fill is not None else src, pos if pos is not None else src, out,
        L, K, C, sb, sl, inv.stride(0), pl, ob, ol,
        HAS_FILL=fill is not None, HAS_POS=pos is not None,
        ALIGN=common_alignment(src.element_size(), C, sb, sl, pl, ob, ol),
        BLOCK_T=block_t, BLOCK_C=block_c, num_warps=num_warps,
    )
    return out


def invert_ids(ids: torch.Tensor, length: int) -> torch.Tensor:
    """int32 ``[B, length]``: ``inv[b, ids[b, k]] = k``, -1 for rows no id names."""
    check_launchable(ids)
    ids = unit_stride(ids)
    B, K = ids.shape
    inv = torch.full((B, length), -1, dtype=torch.int32, device=ids.device)
    if B == 0 or K == 0:
        return inv
    block_k = min(1024, next_power_of_2(K))
    _invert_ids_kernel[(cdiv(K, block_k), B)](
        ids, inv, length, K, ids.stride(0), inv.stride(0), BLOCK_K=block_k)
    return inv


def scatter_rows(y: torch.Tensor, ids: torch.Tensor, length: int) -> torch.Tensor:
    """``out[b, ids[b, k]] = y[b, k]``, zeros elsewhere (ids rows unique): the
    inverse index is built first, then every output row is written once."""
    return unshuffle_rows(y, invert_ids(ids, length), None, None, y.dtype)

# ============================================================================ custom ops

@torch.library.custom_op("edt_kernels::gather_tokens", mutates_args=())
def _gather_tokens_op(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return gather_rows(x, ids)


@_gather_tokens_op.register_fake
def _(x, ids):
    return x.new_empty((x.shape[0], ids.shape[1], x.shape[2]))


@torch.library.custom_op("edt_kernels::scatter_tokens", mutates_args=())
def _scatter_tokens_op(y: torch.Tensor, ids: torch.Tensor, length: int) -> torch.Tensor:
    return scatter_rows(y, ids, length)


@_scatter_tokens_op.register_fake
def _(y, ids, length):
    return y.new_empty((y.shape[0], length, y.shape[2]))


def register_gather_scatter_autograd(gather_op, scatter_op) -> None:
    """Autograd of a gather/scatter pair of custom ops, each the other's
    backward (the Triton ops here, the compiled ones of ``tokens_cpp``)."""

    def gather_setup(ctx, inputs, output):
        x, ids = inputs
        ctx.save_for_backward(ids)
        ctx.length = x.shape[1]

    def gather_backward(ctx, dout):
        (ids,) = ctx.saved_tensors
        return scatter_op(dout, ids, ctx.length), None

    def scatter_setup(ctx, inputs, output):
        y, ids, length = inputs
        ctx.save_for_backward(ids)

    def scatter_backward(ctx, dout):
        (ids,) = ctx.saved_tensors
        return gather_op(dout, ids), None, None

    gather_op.register_autograd(gather_backward, setup_context=gather_setup)
    scatter_op.register_autograd(scatter_backward, setup_context=scatter_setup)


register_gather_scatter_autograd(_gather_tokens_op, _scatter_tokens_op)

# ============================================================================ public functions

def gather_tokens(x: torch.Tensor, ids: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Keep token rows: ``out[b, k] = x[b, ids[b, k]]``.

    Args:
        x: ``[B, L, C]`` floating point.
        ids: int64 ``[B, K]``, values in ``[0, L)``, unique per row (e.g. MDT's
            ``ids_keep``): the backward is a scatter, not a scatter-add.
        backend: ``"auto"``, ``"triton"``, ``"torch"`` or ``"eager"``.

    Returns ``[B, K, C]``; differentiable in x.
    """
    B, L, C = V.check_tokens("x", x)
    V.check_ids("ids", ids, B, "[B, K]", None, x.device)
    V.check_id_values("ids", ids, L, "token indices of x, L = x.shape[1]")
    return dispatch("gather_tokens", backend, OpCall((x, ids), x=x))


def scatter_tokens(y: torch.Tensor, ids: torch.Tensor, length: int, *,
                   backend: str = "auto") -> torch.Tensor:
    """Put kept rows back: ``out[b, ids[b, k]] = y[b, k]``, zeros elsewhere.

    Args:
        y: ``[B, K, C]`` floating point.
        ids: int64 ``[B, K]``, values in ``[0, length)``, unique per row.
        length: L, the number of output rows (``>= K``).
        backend: ``"auto"``, ``"triton"``, ``"torch"`` or ``"eager"``.

    Returns ``[B, length, C]``; differentiable in y (its backward is the gather).
    """
    B, K, C = V.check_tokens("y", y)
    if isinstance(length, bool) or not isinstance(length, int):
        raise TypeError(f"length must be an int, got {type(length).__name__}")
    if length < K:
        raise ValueError(f"length must be >= K = y.shape[1] = {K}, got {length}")
    V.check_ids("ids", ids, B, "[B, K]", K, y.device)
    V.check_id_values("ids", ids, length, "output rows, length")
    return dispatch("scatter_tokens", backend, OpCall((y, ids, length), y=y))

# ============================================================================ backends

register_op("gather_tokens", lambda c: _gather_tokens_op(*c.args), lambda c: reference_gather_tokens(*c.args))
register_op("scatter_tokens", lambda c: _scatter_tokens_op(*c.args), lambda c: reference_scatter_tokens(*c.args))
