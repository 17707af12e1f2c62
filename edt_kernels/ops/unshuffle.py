"""MDT's side-interpolater input in one pass: append mask tokens, unshuffle
with ``ids_restore``, add ``pos_embed``.

    unshuffle_with_mask_token(x_kept [B, K, C], ids_restore [B, L], mask_token [1, 1, C],
                              pos_embed [1, L, C] or None) -> [B, L, C]
    row l = (x_kept[b, ids_restore[b, l]] if ids_restore[b, l] < K else mask_token) + pos_embed[0, l]

Custom ops ``edt_kernels::unshuffle_with_mask_token`` and
``edt_kernels::unshuffle_with_mask_token_backward(Tensor dout, Tensor
ids_restore, SymInt len_keep, bool need_dpos) -> (dx_kept, dmask_token float32
[1, 1, C], dpos_embed float32 [1, L, C] or [0])``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import _validation as V
from ..backends import OpCall
from . import _triton_utils as _tu
from ._triton_utils import (
    cdiv, check_launchable, common_alignment, dispatch, multiple_of, promote, register_op, rows_per_program,
    tile_config, tl, triton, unit_stride,
)
from ..reference.tokens import reference_unshuffle_with_mask_token
from .gather_scatter import unshuffle_rows

__all__ = ["unshuffle_with_mask_token"]


# ============================================================================ kernels

@triton.jit
def _unshuffle_bwd_kernel(
    dout_ptr, inv_ptr, dsrc_ptr, dfill_part_ptr, dpos_part_ptr,
    B, L, K, C, B_PER_PROG,
    stride_db, stride_dl, stride_vb, stride_sb, stride_sl,
    stride_fp, stride_ft, stride_pp, stride_pl,
    HAS_POS: tl.constexpr, ALIGN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # One program: rows l of one tile, channels c, samples
    # [pid_b * B_PER_PROG, +B_PER_PROG).  dsrc[b, r] = dout[b, l] for kept rows
    # (ids_restore is a permutation, so each kept row is written once); the
    # mask-token gradient (sum over masked rows) and the pos-embed gradient
    # (sum over samples) are accumulated in fp32 and written as partials.
    C = multiple_of(C, ALIGN)
    stride_db, stride_dl = multiple_of(stride_db, ALIGN), multiple_of(stride_dl, ALIGN)
    stride_sb, stride_sl = multiple_of(stride_sb, ALIGN), multiple_of(stride_sl, ALIGN)
    stride_fp, stride_ft = multiple_of(stride_fp, ALIGN), multiple_of(stride_ft, ALIGN)
    stride_pp, stride_pl = multiple_of(stride_pp, ALIGN), multiple_of(stride_pl, ALIGN)
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_b = tl.program_id(2)
    l = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    l_ok = l < L
    c_ok = c < C
    ll = l[:, None].to(tl.int64)
    acc_fill = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_pos = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    for i in range(0, B_PER_PROG):
        bi = pid_b * B_PER_PROG + i
        b = bi.to(tl.int64)
        # A block-shaped int1 mask: the scalar test "sample bi exists" broadcast
        # over the rows first (a scalar & block mask is rejected by some
        # interpreter versions: "mask has unsupported dtype").
        row_ok = l_ok & ((tl.zeros([BLOCK_T], dtype=tl.int32) + bi) < B)
        ok = row_ok[:, None] & c_ok[None, :]
        r = tl.load(inv_ptr + b * stride_vb + l, mask=row_ok, other=-1).to(tl.int64)
        kept = row_ok & (r >= 0) & (r < K)
        r = tl.where(kept, r, 0)
        d = tl.load(dout_ptr + b * stride_db + ll * stride_dl + c[None, :], mask=ok,
                    other=0.0).to(tl.float32)
        tl.store(dsrc_ptr + b * stride_sb + r[:, None] * stride_sl + c[None, :],
                 d.to(dsrc_ptr.dtype.element_ty), mask=kept[:, None] & c_ok[None, :])
        acc_fill += tl.sum(tl.where(kept[:, None], 0.0, d), axis=0)
        if HAS_POS:
            acc_pos += d
    tl.store(dfill_part_ptr + pid_b * stride_fp + pid_t * stride_ft + c, acc_fill, mask=c_ok)
    if HAS_POS:
        tl.store(dpos_part_ptr + pid_b * stride_pp + ll * stride_pl + c[None, :], acc_pos,
                 mask=l_ok[:, None] & c_ok[None, :])

# ============================================================================ launchers

def unshuffle_backward(dout: torch.Tensor, inv: torch.Tensor, len_keep: int, need_dpos: bool
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`unshuffle_rows` with a fill and a pos row, for ``inv``
    a permutation per sample: ``(dsrc [B, K, C]`` in dout's dtype,
    ``dfill [1, 1, C]`` float32, ``dpos [1, L, C]`` float32 or ``[0])``."""
    check_launchable(dout)
    dout, inv = unit_stride(dout), unit_stride(inv)
    B, L, C = dout.shape
    K = len_keep
    dsrc = _tu.empty_output((B, K, C), dout.dtype, dout.device)
    if B == 0 or L == 0 or C == 0:
        dpos = (torch.zeros((1, L, C), dtype=torch.float32, device=dout.device) if need_dpos
                else dout.new_empty((0,), dtype=torch.float32))
        return dsrc, torch.zeros((1, 1, C), dtype=torch.float32, device=dout.device), dpos
    block_c, block_t, num_warps = tile_config(C)
    n_t, n_c = cdiv(L, block_t), cdiv(C, block_c)
    # Without a pos-embed gradient every sample is its own program; with it, a
    # program sums a few samples so that the [n_b, L, C] partials stay small.
    b_per_prog = rows_per_program(B, n_t * n_c, 1, target=2048) if need_dpos else 1
    n_b = cdiv(B, b_per_prog)
    dfill_part = _tu.empty_output((n_b, n_t, C), torch.float32, dout.device)
    dpos_part = _tu.empty_output((n_b, L, C), torch.float32, dout.device) if need_dpos else dfill_part
    ds = (dout.stride(0), dout.stride(1))
    rest = (dsrc.stride(0), dsrc.stride(1), dfill_part.stride(0), dfill_part.stride(1), dpos_part.stride(0),
            dpos_part.stride(1))
    _unshuffle_bwd_kernel[(n_t, n_c, n_b)](
        dout, inv, dsrc, dfill_part, dpos_part, B, L, K, C, b_per_prog, *ds, inv.stride(0), *rest,
        HAS_POS=need_dpos, ALIGN=common_alignment(dout.element_size(), C, *ds, *rest),
        BLOCK_T=block_t, BLOCK_C=block_c, num_warps=num_warps,
    )
    dfill = dfill_part.sum((0, 1)).reshape(1, 1, C)
    dpos = dpos_part.sum(0, keepdim=True) if need_dpos else dout.new_empty((0,), dtype=torch.float32)
    return dsrc, dfill, dpos

# ============================================================================ custom ops

@torch.library.custom_op("edt_kernels::unshuffle_with_mask_token", mutates_args=())
def _unshuffle_op(x_kept: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor,
                  pos_embed: Optional[torch.Tensor]) -> torch.Tensor:
    dtype = promote(x_kept, mask_token) if pos_embed is None else promote(x_kept, mask_token, pos_embed)
    return unshuffle_rows(x_kept, ids_restore, mask_token, pos_embed, dtype)


@_unshuffle_op.register_fake
def _(x_kept, ids_restore, mask_token, pos_embed):
    dtype = promote(x_kept, mask_token) if pos_embed is None else promote(x_kept, mask_token, pos_embed)
    return x_kept.new_empty((x_kept.shape[0], ids_restore.shape[1], x_kept.shape[2]), dtype=dtype)


@torch.library.custom_op("edt_kernels::unshuffle_with_mask_token_backward", mutates_args=())
def _unshuffle_bwd_op(dout: torch.Tensor, ids_restore: torch.Tensor, len_keep: int,
                      need_dpos: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return unshuffle_backward(dout, ids_restore, len_keep, need_dpos)


@_unshuffle_bwd_op.register_fake
def _(dout, ids_restore, len_keep, need_dpos):
    B, L, C = dout.shape
    dpos = dout.new_empty((1, L, C) if need_dpos else (0,), dtype=torch.float32)
    return dout.new_empty((B, len_keep, C)), dout.new_empty((1, 1, C), dtype=torch.float32), dpos


def register_unshuffle_autograd(op, backward_op) -> None:
    """Autograd of an unshuffle custom op through its backward op (the Triton
    ops here, the compiled ones of ``tokens_cpp``): gradients in the dtypes
    and shapes of x_kept, mask_token and pos_embed."""

    def setup(ctx, inputs, output):
        x_kept, ids_restore, mask_token, pos_embed = inputs
        ctx.save_for_backward(ids_restore)
        ctx.len_keep = x_kept.shape[1]
        ctx.dtypes = (x_kept.dtype, mask_token.dtype, None if pos_embed is None else pos_embed.dtype)
        ctx.shapes = (mask_token.shape, None if pos_embed is None else pos_embed.shape)

    def backward(ctx, dout):
        (ids_restore,) = ctx.saved_tensors
        x_dtype, mt_dtype, pos_dtype = ctx.dtypes
        need_dpos = pos_dtype is not None and bool(ctx.needs_input_grad[3])
        dx, dmt, dpos = backward_op(dout, ids_restore, ctx.len_keep, need_dpos)
        dmt = dmt.reshape(ctx.shapes[0]).to(mt_dtype)
        dpos = dpos.reshape(ctx.shapes[1]).to(pos_dtype) if need_dpos else None
        return dx.to(x_dtype), None, dmt, dpos

    op.register_autograd(backward, setup_context=setup)


register_unshuffle_autograd(_unshuffle_op, _unshuffle_bwd_op)

# ============================================================================ public functions

def unshuffle_with_mask_token(x_kept: torch.Tensor, ids_restore: torch.Tensor,
                              mask_token: torch.Tensor, pos_embed: Optional[torch.Tensor] = None,
                              *, backend: str = "auto") -> torch.Tensor:
    """MDT's side-interpolater input in one pass: append mask tokens, unshuffle
    with ``ids_restore``, add ``pos_embed``.  Row l of the result is
    ``x_kept[b, ids_restore[b, l]]`` when that index is ``< K``, else
    ``mask_token``; plus ``pos_embed[0, l]``.

    Args:
        x_kept: ``[B, K, C]`` floating point.
        ids_restore: int64 ``[B, L]``, each row a permutation of ``0..L-1``
            (as ``random_masking`` returns), ``L >= K``.
        mask_token: ``[1, 1, C]`` learned token.
        pos_embed: ``[1, L, C]`` or None.
        backend: ``"auto"``, ``"triton"``, ``"torch"`` or ``"eager"``.

    Returns ``[B, L, C]`` (dtype by promotion); gradients for x_kept, mask_token
    (summed over the masked rows) and pos_embed (summed over the batch).
    """
    B, K, C = V.check_tokens("x_kept", x_kept)
    V.check_ids("ids_restore", ids_restore, B, "[B, L]", None, x_kept.device)
    L = ids_restore.shape[1]
    if L < K:
        raise ValueError(f"ids_restore must have L >= K = x_kept.shape[1] = {K} columns, got {L}")
    V.check_tensor("mask_token", mask_token, 3, "[1, 1, C]", device=x_kept.device)
    V.check_shape("mask_token", mask_token, (1, 1, C), "[1, 1, C] with C = x_kept.shape[2]")
    if pos_embed is not None:
        V.check_tensor("pos_embed", pos_embed, 3, "[1, L, C]", device=x_kept.device)
        V.check_shape("pos_embed", pos_embed, (1, L, C), "[1, L, C]")
    V.check_id_values("ids_restore", ids_restore, L, "each row a permutation of 0..L-1")
    return dispatch("unshuffle_with_mask_token", backend,
                    OpCall((x_kept, ids_restore, mask_token, pos_embed), x_kept=x_kept, mask_token=mask_token,
                           pos_embed=pos_embed))

# ============================================================================ backends

register_op("unshuffle_with_mask_token", lambda c: _unshuffle_op(*c.args),
            lambda c: reference_unshuffle_with_mask_token(*c.args))
