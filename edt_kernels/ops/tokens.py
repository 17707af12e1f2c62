"""Token kernels of masked diffusion training (MDTv2, EDT), Triton, with autograd.

Public functions (definitions in ``edt_kernels.reference.tokens``; every one
takes ``backend="auto" | "triton" | "torch"``, see ``ops.adaln.use_triton``):

- ``random_masking(x, mask_ratio, generator=None)`` -> ``(x_kept, mask, ids_restore, ids_keep)``
- ``gather_tokens(x, ids)`` / ``scatter_tokens(y, ids, length)``
- ``unshuffle_with_mask_token(x_kept, ids_restore, mask_token, pos_embed=None)``
- ``masked_shortcut(x, x_before, mask)``
- ``patch_merge_modulate(x, shift, scale, keep_mask=None, *, grid=None, eps=1e-6)``

Custom ops (namespace ``edt_kernels``; fake kernels and autograd registered, so
torch.compile traces them).  ``x`` is ``[B, L, C]``, index tensors int64::

    gather_tokens(Tensor x, Tensor ids) -> Tensor
        # [B, L, C], [B, K] -> [B, K, C]; out[b, k] = x[b, ids[b, k]]
    scatter_tokens(Tensor y, Tensor ids, int length) -> Tensor
        # [B, K, C], [B, K] -> [B, length, C]; out[b, ids[b, k]] = y[b, k], 0 elsewhere
    unshuffle_with_mask_token(Tensor x_kept, Tensor ids_restore, Tensor mask_token,
                              Tensor? pos_embed) -> Tensor
        # [B, K, C], [B, L], [1, 1, C], [1, L, C] -> [B, L, C]
    unshuffle_with_mask_token_backward(Tensor dout, Tensor ids_restore, int len_keep,
                                       bool need_dpos) -> (Tensor, Tensor, Tensor)
        # -> dx_kept [B, K, C] (dout's dtype), dmask_token [1, 1, C] float32,
        #    dpos_embed [1, L, C] float32 (or [0] when not need_dpos)
    random_masking_gather(Tensor x, Tensor ids_shuffle, int len_keep) -> (Tensor, Tensor, Tensor)
        # -> x_kept [B, K, C], mask [B, L] float32, ids_restore [B, L] int64
    masked_shortcut(Tensor x, Tensor x_before, Tensor mask) -> Tensor
        # [B, L, C], [B or 1, L, C], [B, L] (bool or float) -> [B, L, C]
    masked_shortcut_backward(Tensor dout, Tensor x, Tensor x_before, Tensor mask,
                             bool need_dmask) -> (Tensor, Tensor, Tensor)
        # -> dx, dx_before (x_before's shape), dmask [B, L] float32 (or [0])
    patch_merge_modulate(Tensor x, Tensor shift, Tensor scale, Tensor? keep_mask,
                         int height, int width, float eps) -> Tensor
        # [B, H*W, C], [B, 4C], [B, 4C], [B, H*W/4] -> [B, H*W/4, 4C]
    patch_merge_modulate_backward(Tensor dout, Tensor x, Tensor scale, Tensor? keep_mask,
                                  int height, int width, float eps) -> (Tensor, Tensor, Tensor)
        # -> dx like x, dshift and dscale float32 [B, 4C]

The gather/scatter/unshuffle schemas are Tensors and ints only, so that the
compiled extension (``csrc/``) can register its own kernels for them with
``torch.library.register_kernel``; where it does, that kernel replaces the
Triton launcher on that device type.  The ops do not validate: the public
functions do (indices must be in range, ``ids`` rows unique, ``ids_restore``
rows permutations), and the kernels mask every index so that an out-of-range
value is never dereferenced (its row reads as zero / the mask token).
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from ..amm import GridLike, normalize_grid
from ..reference.tokens import (
    reference_gather_tokens,
    reference_masked_shortcut,
    reference_patch_merge_modulate,
    reference_random_masking,
    reference_scatter_tokens,
    reference_unshuffle_with_mask_token,
)
from .._tracing import is_tracing
from .adaln import (
    check_eps,
    check_launchable,
    check_shape,
    check_tensor,
    ln_modulate_backward,
    ln_modulate_forward,
    promote,
    rows_per_program,
    tile_config,
    tl,
    triton,
    unit_stride,
    use_triton,
)

__all__ = [
    "random_masking",
    "gather_tokens",
    "scatter_tokens",
    "unshuffle_with_mask_token",
    "masked_shortcut",
    "patch_merge_modulate",
]


# ============================================================================ kernels

@triton.jit
def _gather_rows_kernel(
    x_ptr, ids_ptr, out_ptr,
    L, K, C,
    stride_xb, stride_xl, stride_ib, stride_ob, stride_ol,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # out[b, k, :] = x[b, ids[b, k], :]; an index outside [0, L) gives a zero row.
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
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # out[b, l] = (src[b, r] if 0 <= r < K else fill) + pos[l],  r = inv[b, l].
    # With inv = ids_restore and fill = mask token this is MDT's "append mask
    # tokens, unshuffle, add pos_embed"; with inv = inverse of ids and no fill
    # it is the scatter of kept rows into zeros.  Every output row is written.
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


@triton.jit
def _unshuffle_bwd_kernel(
    dout_ptr, inv_ptr, dsrc_ptr, dfill_part_ptr, dpos_part_ptr,
    B, L, K, C, B_PER_PROG,
    stride_db, stride_dl, stride_vb, stride_sb, stride_sl,
    stride_fp, stride_ft, stride_pp, stride_pl,
    HAS_POS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # One program: rows l of one tile, channels c, samples
    # [pid_b * B_PER_PROG, +B_PER_PROG).  dsrc[b, r] = dout[b, l] for kept rows
    # (ids_restore is a permutation, so each kept row is written once); the
    # mask-token gradient (sum over masked rows) and the pos-embed gradient
    # (sum over samples) are accumulated in fp32 and written as partials.
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
        row_ok = l_ok & (bi < B)
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


@triton.jit
def _masking_gather_kernel(
    x_ptr, shuffle_ptr, out_ptr, mask_ptr, restore_ptr,
    L, K, C,
    stride_xb, stride_xl, stride_hb, stride_ob, stride_ol, stride_mb, stride_rb,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # MDT's masking in one pass over ids_shuffle (a permutation per sample):
    # slot j < K keeps token i = ids_shuffle[b, j] (x_kept[b, j] = x[b, i]);
    # mask[b, i] = (j >= K); ids_restore[b, i] = j, which is
    # argsort(ids_shuffle) without a second sort.
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    j = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    j_ok = j < L
    c_ok = c < C
    i = tl.load(shuffle_ptr + b * stride_hb + j, mask=j_ok, other=-1).to(tl.int64)
    i_ok = j_ok & (i >= 0) & (i < L)
    i = tl.where(i_ok, i, 0)
    slot = j < K
    v = tl.load(x_ptr + b * stride_xb + i[:, None] * stride_xl + c[None, :],
                mask=(i_ok & slot)[:, None] & c_ok[None, :], other=0.0)
    tl.store(out_ptr + b * stride_ob + j[:, None].to(tl.int64) * stride_ol + c[None, :],
             v.to(out_ptr.dtype.element_ty), mask=slot[:, None] & c_ok[None, :])
    if pid_c == 0:
        tl.store(mask_ptr + b * stride_mb + i, (j >= K).to(mask_ptr.dtype.element_ty), mask=i_ok)
        tl.store(restore_ptr + b * stride_rb + i, j.to(tl.int64), mask=i_ok)


@triton.jit
def _masked_shortcut_fwd_kernel(
    x_ptr, xb_ptr, m_ptr, out_ptr,
    L, C,
    stride_xb, stride_xl, stride_bb, stride_bl, stride_mb, stride_ob, stride_ol,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # out = x * m + (1 - m) * x_before; x_before's batch stride is 0 when it is [1, L, C].
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    t_ok = t < L
    ok = t_ok[:, None] & (c < C)[None, :]
    tt = t[:, None].to(tl.int64)
    m = tl.load(m_ptr + b * stride_mb + t, mask=t_ok, other=0).to(tl.float32)[:, None]
    x = tl.load(x_ptr + b * stride_xb + tt * stride_xl + c[None, :], mask=ok, other=0.0).to(tl.float32)
    xb = tl.load(xb_ptr + b * stride_bb + tt * stride_bl + c[None, :], mask=ok, other=0.0).to(tl.float32)
    out = x * m + (1.0 - m) * xb
    tl.store(out_ptr + b * stride_ob + tt * stride_ol + c[None, :], out.to(out_ptr.dtype.element_ty),
             mask=ok)


@triton.jit
def _masked_shortcut_bwd_kernel(
    dout_ptr, x_ptr, xb_ptr, m_ptr, dx_ptr, dxb_ptr, dm_part_ptr,
    L, C,
    stride_db, stride_dl, stride_xb, stride_xl, stride_bb, stride_bl, stride_mb,
    stride_gb, stride_gl, stride_pc, stride_pb,
    NEED_DMASK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # dx = dout * m, dx_before = dout * (1 - m) (both [B, L, C], with the
    # strides stride_gb, stride_gl), dmask partial over this channel block =
    # sum_c dout * (x - x_before).
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    t_ok = t < L
    ok = t_ok[:, None] & (c < C)[None, :]
    tt = t[:, None].to(tl.int64)
    m = tl.load(m_ptr + b * stride_mb + t, mask=t_ok, other=0).to(tl.float32)[:, None]
    d = tl.load(dout_ptr + b * stride_db + tt * stride_dl + c[None, :], mask=ok, other=0.0).to(tl.float32)
    g_off = b * stride_gb + tt * stride_gl + c[None, :]
    tl.store(dx_ptr + g_off, (d * m).to(dx_ptr.dtype.element_ty), mask=ok)
    tl.store(dxb_ptr + g_off, (d * (1.0 - m)).to(dxb_ptr.dtype.element_ty), mask=ok)
    if NEED_DMASK:
        x = tl.load(x_ptr + b * stride_xb + tt * stride_xl + c[None, :], mask=ok, other=0.0).to(tl.float32)
        xb = tl.load(xb_ptr + b * stride_bb + tt * stride_bl + c[None, :], mask=ok,
                     other=0.0).to(tl.float32)
        dm = tl.sum(d * (x - xb), axis=1)
        tl.store(dm_part_ptr + pid_c * stride_pc + b * stride_pb + t, dm, mask=t_ok)


# ============================================================================ launchers

def _empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Every launcher allocates its outputs here (the tests fill them with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def gather_rows(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``out[b, k] = x[b, ids[b, k]]`` (zero row for an index outside [0, L))."""
    check_launchable(x)
    x, ids = unit_stride(x), unit_stride(ids)
    B, L, C = x.shape
    K = ids.shape[1]
    out = _empty((B, K, C), x.dtype, x.device)
    if out.numel() == 0:
        return out
    block_c, block_t, num_warps = tile_config(C)
    grid = (triton.cdiv(K, block_t), triton.cdiv(C, block_c), B)
    _gather_rows_kernel[grid](
        x, ids, out, L, K, C,
        x.stride(0), x.stride(1), ids.stride(0), out.stride(0), out.stride(1),
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
    out = _empty((B, L, C), out_dtype, src.device)
    if out.numel() == 0:
        return out
    if fill is not None:
        fill = fill.reshape(C).contiguous()
    if pos is not None:
        pos = unit_stride(pos.reshape(L, C))
    block_c, block_t, num_warps = tile_config(C)
    grid = (triton.cdiv(L, block_t), triton.cdiv(C, block_c), B)
    _unshuffle_rows_kernel[grid](
        src, inv, fill if fill is not None else src, pos if pos is not None else src, out,
        L, K, C,
        src.stride(0), src.stride(1), inv.stride(0), pos.stride(0) if pos is not None else 0,
        out.stride(0), out.stride(1),
        HAS_FILL=fill is not None, HAS_POS=pos is not None,
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
    block_k = min(1024, triton.next_power_of_2(K))
    _invert_ids_kernel[(triton.cdiv(K, block_k), B)](
        ids, inv, length, K, ids.stride(0), inv.stride(0), BLOCK_K=block_k)
    return inv


def scatter_rows(y: torch.Tensor, ids: torch.Tensor, length: int) -> torch.Tensor:
    """``out[b, ids[b, k]] = y[b, k]``, zeros elsewhere (ids rows unique): the
    inverse index is built first, then every output row is written once."""
    return unshuffle_rows(y, invert_ids(ids, length), None, None, y.dtype)


def unshuffle_backward(dout: torch.Tensor, inv: torch.Tensor, len_keep: int, need_dpos: bool
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`unshuffle_rows` with a fill and a pos row, for ``inv``
    a permutation per sample: ``(dsrc [B, K, C]`` in dout's dtype,
    ``dfill [1, 1, C]`` float32, ``dpos [1, L, C]`` float32 or ``[0])``."""
    check_launchable(dout)
    dout, inv = unit_stride(dout), unit_stride(inv)
    B, L, C = dout.shape
    K = len_keep
    dsrc = _empty((B, K, C), dout.dtype, dout.device)
    if B == 0 or L == 0 or C == 0:
        dpos = (torch.zeros((1, L, C), dtype=torch.float32, device=dout.device) if need_dpos
                else dout.new_empty((0,), dtype=torch.float32))
        return dsrc, torch.zeros((1, 1, C), dtype=torch.float32, device=dout.device), dpos
    block_c, block_t, num_warps = tile_config(C)
    n_t, n_c = triton.cdiv(L, block_t), triton.cdiv(C, block_c)
    # Without a pos-embed gradient every sample is its own program; with it, a
    # program sums a few samples so that the [n_b, L, C] partials stay small.
    b_per_prog = rows_per_program(B, n_t * n_c, 1, target=2048) if need_dpos else 1
    n_b = triton.cdiv(B, b_per_prog)
    dfill_part = _empty((n_b, n_t, C), torch.float32, dout.device)
    dpos_part = _empty((n_b, L, C), torch.float32, dout.device) if need_dpos else dfill_part
    _unshuffle_bwd_kernel[(n_t, n_c, n_b)](
        dout, inv, dsrc, dfill_part, dpos_part,
        B, L, K, C, b_per_prog,
        dout.stride(0), dout.stride(1), inv.stride(0), dsrc.stride(0), dsrc.stride(1),
        dfill_part.stride(0), dfill_part.stride(1), dpos_part.stride(0), dpos_part.stride(1),
        HAS_POS=need_dpos, BLOCK_T=block_t, BLOCK_C=block_c, num_warps=num_warps,
    )
    dfill = dfill_part.sum((0, 1)).reshape(1, 1, C)
    dpos = dpos_part.sum(0, keepdim=True) if need_dpos else dout.new_empty((0,), dtype=torch.float32)
    return dsrc, dfill, dpos


def masking_gather(x: torch.Tensor, ids_shuffle: torch.Tensor, len_keep: int
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_kept, mask float32, ids_restore)`` from a per-sample permutation ``ids_shuffle``."""
    check_launchable(x)
    x, ids_shuffle = unit_stride(x), unit_stride(ids_shuffle)
    B, L, C = x.shape
    K = len_keep
    out = _empty((B, K, C), x.dtype, x.device)
    mask = _empty((B, L), torch.float32, x.device)
    restore = _empty((B, L), torch.int64, x.device)
    if B == 0 or L == 0:
        return out, mask, restore
    block_c, block_t, num_warps = tile_config(max(C, 1))
    grid = (triton.cdiv(L, block_t), max(1, triton.cdiv(C, block_c)), B)
    _masking_gather_kernel[grid](
        x, ids_shuffle, out, mask, restore, L, K, C,
        x.stride(0), x.stride(1), ids_shuffle.stride(0), out.stride(0), out.stride(1),
        mask.stride(0), restore.stride(0),
        BLOCK_T=block_t, BLOCK_C=block_c, num_warps=num_warps,
    )
    return out, mask, restore


def _mask_rows(mask: torch.Tensor) -> torch.Tensor:
    mask = mask.reshape(mask.shape[0], mask.shape[1])
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    return unit_stride(mask)


def _broadcast_before(x_before: torch.Tensor, B: int) -> torch.Tensor:
    return unit_stride(x_before).expand(B, -1, -1)  # batch stride 0 for [1, L, C]


def masked_shortcut_forward(x: torch.Tensor, x_before: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    check_launchable(x)
    x = unit_stride(x)
    B, L, C = x.shape
    xb, m = _broadcast_before(x_before, B), _mask_rows(mask)
    dtype = promote(x, x_before, mask) if mask.is_floating_point() else promote(x, x_before)
    out = _empty((B, L, C), dtype, x.device)
    if out.numel() == 0:
        return out
    block_c, block_t, num_warps = tile_config(C)
    grid = (triton.cdiv(L, block_t), triton.cdiv(C, block_c), B)
    _masked_shortcut_fwd_kernel[grid](
        x, xb, m, out, L, C,
        x.stride(0), x.stride(1), xb.stride(0), xb.stride(1), m.stride(0),
        out.stride(0), out.stride(1),
        BLOCK_T=block_t, BLOCK_C=block_c, num_warps=num_warps,
    )
    return out


def masked_shortcut_backward(dout: torch.Tensor, x: torch.Tensor, x_before: torch.Tensor,
                             mask: torch.Tensor, need_dmask: bool
                             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dx_before`` (x_before's shape, summed over the batch when it is
    ``[1, L, C]``), ``dmask`` float32 ``[B, L]`` or ``[0])``, in dout's dtype."""
    check_launchable(x)
    x, dout = unit_stride(x), unit_stride(dout)
    B, L, C = x.shape
    xb, m = _broadcast_before(x_before, B), _mask_rows(mask)
    dx = _empty((B, L, C), dout.dtype, x.device)
    dxb = _empty((B, L, C), dout.dtype, x.device)
    block_c, block_t, num_warps = tile_config(max(C, 1))
    n_c = triton.cdiv(C, block_c)
    dm_part = _empty((n_c, B, L), torch.float32, x.device) if need_dmask else dx
    if dx.numel():
        _masked_shortcut_bwd_kernel[(triton.cdiv(L, block_t), n_c, B)](
            dout, x, xb, m, dx, dxb, dm_part, L, C,
            dout.stride(0), dout.stride(1), x.stride(0), x.stride(1), xb.stride(0), xb.stride(1),
            m.stride(0), dx.stride(0), dx.stride(1),
            dm_part.stride(0) if need_dmask else 0, dm_part.stride(1) if need_dmask else 0,
            NEED_DMASK=need_dmask, BLOCK_T=block_t, BLOCK_C=block_c, num_warps=num_warps,
        )
    if x_before.shape[0] != B:
        dxb = dxb.sum(0, keepdim=True)
    if need_dmask:
        dmask = dm_part.sum(0) if dx.numel() else torch.zeros((B, L), dtype=torch.float32, device=x.device)
    else:
        dmask = x.new_empty((0,), dtype=torch.float32)
    return dx, dxb, dmask


# ============================================================================ custom ops

# -- gather / scatter: each is the other's backward (ids rows unique)

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


def _gather_setup(ctx, inputs, output):
    x, ids = inputs
    ctx.save_for_backward(ids)
    ctx.length = x.shape[1]


def _gather_backward(ctx, dout):
    (ids,) = ctx.saved_tensors
    return _scatter_tokens_op(dout, ids, ctx.length), None


def _scatter_setup(ctx, inputs, output):
    y, ids, length = inputs
    ctx.save_for_backward(ids)


def _scatter_backward(ctx, dout):
    (ids,) = ctx.saved_tensors
    return _gather_tokens_op(dout, ids), None, None


_gather_tokens_op.register_autograd(_gather_backward, setup_context=_gather_setup)
_scatter_tokens_op.register_autograd(_scatter_backward, setup_context=_scatter_setup)


# -- random masking: gather + mask + ids_restore in one kernel

@torch.library.custom_op("edt_kernels::random_masking_gather", mutates_args=())
def _masking_gather_op(x: torch.Tensor, ids_shuffle: torch.Tensor,
                       len_keep: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return masking_gather(x, ids_shuffle, len_keep)


@_masking_gather_op.register_fake
def _(x, ids_shuffle, len_keep):
    B, L, C = x.shape
    return (x.new_empty((B, len_keep, C)), x.new_empty((B, L), dtype=torch.float32),
            x.new_empty((B, L), dtype=torch.int64))


def _masking_setup(ctx, inputs, output):
    x, ids_shuffle, len_keep = inputs
    ctx.save_for_backward(ids_shuffle)
    ctx.len_keep, ctx.length = len_keep, x.shape[1]
    ctx.mark_non_differentiable(output[1], output[2])


def _masking_backward(ctx, dx_kept, dmask, drestore):
    (ids_shuffle,) = ctx.saved_tensors
    ids_keep = ids_shuffle[:, :ctx.len_keep]
    return _scatter_tokens_op(dx_kept, ids_keep, ctx.length), None, None


_masking_gather_op.register_autograd(_masking_backward, setup_context=_masking_setup)


# -- unshuffle with mask token (+ pos_embed)

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


def _unshuffle_setup(ctx, inputs, output):
    x_kept, ids_restore, mask_token, pos_embed = inputs
    ctx.save_for_backward(ids_restore)
    ctx.len_keep = x_kept.shape[1]
    ctx.dtypes = (x_kept.dtype, mask_token.dtype, None if pos_embed is None else pos_embed.dtype)
    ctx.shapes = (mask_token.shape, None if pos_embed is None else pos_embed.shape)


def _unshuffle_backward(ctx, dout):
    (ids_restore,) = ctx.saved_tensors
    x_dtype, mt_dtype, pos_dtype = ctx.dtypes
    need_dpos = pos_dtype is not None and bool(ctx.needs_input_grad[3])
    dx, dmt, dpos = _unshuffle_bwd_op(dout, ids_restore, ctx.len_keep, need_dpos)
    dmt = dmt.reshape(ctx.shapes[0]).to(mt_dtype)
    dpos = dpos.reshape(ctx.shapes[1]).to(pos_dtype) if need_dpos else None
    return dx.to(x_dtype), None, dmt, dpos


_unshuffle_op.register_autograd(_unshuffle_backward, setup_context=_unshuffle_setup)


# -- masked shortcut

@torch.library.custom_op("edt_kernels::masked_shortcut", mutates_args=())
def _masked_shortcut_op(x: torch.Tensor, x_before: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return masked_shortcut_forward(x, x_before, mask)


@_masked_shortcut_op.register_fake
def _(x, x_before, mask):
    dtype = promote(x, x_before, mask) if mask.is_floating_point() else promote(x, x_before)
    return x.new_empty(x.shape, dtype=dtype)


@torch.library.custom_op("edt_kernels::masked_shortcut_backward", mutates_args=())
def _masked_shortcut_bwd_op(dout: torch.Tensor, x: torch.Tensor, x_before: torch.Tensor,
                            mask: torch.Tensor,
                            need_dmask: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return masked_shortcut_backward(dout, x, x_before, mask, need_dmask)


@_masked_shortcut_bwd_op.register_fake
def _(dout, x, x_before, mask, need_dmask):
    B, L, C = x.shape
    dmask = x.new_empty((B, L) if need_dmask else (0,), dtype=torch.float32)
    return x.new_empty(x.shape, dtype=dout.dtype), x_before.new_empty(x_before.shape, dtype=dout.dtype), dmask


def _shortcut_setup(ctx, inputs, output):
    x, x_before, mask = inputs
    ctx.save_for_backward(x, x_before, mask)


def _shortcut_backward(ctx, dout):
    x, x_before, mask = ctx.saved_tensors
    need_dmask = mask.is_floating_point() and bool(ctx.needs_input_grad[2])
    dx, dxb, dmask = _masked_shortcut_bwd_op(dout, x, x_before, mask, need_dmask)
    dmask = dmask.reshape(mask.shape).to(mask.dtype) if need_dmask else None
    return dx.to(x.dtype), dxb.to(x_before.dtype), dmask


_masked_shortcut_op.register_autograd(_shortcut_backward, setup_context=_shortcut_setup)


# -- EDT down-sampling front end: patch merge + LayerNorm(4C) + modulate + keep mask

@torch.library.custom_op("edt_kernels::patch_merge_modulate", mutates_args=())
def _patch_merge_op(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                    keep_mask: Optional[torch.Tensor], height: int, width: int,
                    eps: float) -> torch.Tensor:
    return ln_modulate_forward(x, shift, scale, eps, keep=keep_mask, merge_width=width)


@_patch_merge_op.register_fake
def _(x, shift, scale, keep_mask, height, width, eps):
    B, L, C = x.shape
    return x.new_empty((B, L // 4, 4 * C), dtype=promote(x, shift, scale))


@torch.library.custom_op("edt_kernels::patch_merge_modulate_backward", mutates_args=())
def _patch_merge_bwd_op(dout: torch.Tensor, x: torch.Tensor, scale: torch.Tensor,
                        keep_mask: Optional[torch.Tensor], height: int, width: int,
                        eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return ln_modulate_backward(dout, x, scale, eps, keep=keep_mask, merge_width=width)


@_patch_merge_bwd_op.register_fake
def _(dout, x, scale, keep_mask, height, width, eps):
    B, C4 = x.shape[0], 4 * x.shape[2]
    return (x.new_empty(x.shape), x.new_empty((B, C4), dtype=torch.float32),
            x.new_empty((B, C4), dtype=torch.float32))


def _merge_setup(ctx, inputs, output):
    x, shift, scale, keep_mask, height, width, eps = inputs
    ctx.save_for_backward(x, scale, keep_mask)
    ctx.geometry = (height, width, eps)
    ctx.shift_dtype = shift.dtype


def _merge_backward(ctx, dout):
    x, scale, keep_mask = ctx.saved_tensors
    dx, dshift, dscale = _patch_merge_bwd_op(dout, x, scale, keep_mask, *ctx.geometry)
    return dx, dshift.to(ctx.shift_dtype), dscale.to(scale.dtype), None, None, None, None


_patch_merge_op.register_autograd(_merge_backward, setup_context=_merge_setup)


# ============================================================================ validation

def _check_ids(name: str, ids, B: int, dims: str, count: Optional[int], device) -> None:
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


def _check_id_values(name: str, ids: torch.Tensor, upper: int, what: str) -> None:
    """Values in ``[0, upper)`` and unique per row (one host sync; skipped while tracing)."""
    if ids.numel() == 0 or is_tracing():
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


def _check_tokens(name: str, x) -> Tuple[int, int, int]:
    check_tensor(name, x, 3, "[B, L, C]")
    return tuple(x.shape)


# ============================================================================ public functions

def gather_tokens(x: torch.Tensor, ids: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Keep token rows: ``out[b, k] = x[b, ids[b, k]]``.

    Args:
        x: ``[B, L, C]`` floating point.
        ids: int64 ``[B, K]``, values in ``[0, L)``, unique per row (e.g. MDT's
            ``ids_keep``): the backward is a scatter, not a scatter-add.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.

    Returns ``[B, K, C]``; differentiable in x.
    """
    B, L, C = _check_tokens("x", x)
    _check_ids("ids", ids, B, "[B, K]", None, x.device)
    _check_id_values("ids", ids, L, "token indices of x, L = x.shape[1]")
    if use_triton("gather_tokens", backend, x=x):
        return _gather_tokens_op(x, ids)
    return reference_gather_tokens(x, ids)


def scatter_tokens(y: torch.Tensor, ids: torch.Tensor, length: int, *,
                   backend: str = "auto") -> torch.Tensor:
    """Put kept rows back: ``out[b, ids[b, k]] = y[b, k]``, zeros elsewhere.

    Args:
        y: ``[B, K, C]`` floating point.
        ids: int64 ``[B, K]``, values in ``[0, length)``, unique per row.
        length: L, the number of output rows (``>= K``).
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.

    Returns ``[B, length, C]``; differentiable in y (its backward is the gather).
    """
    B, K, C = _check_tokens("y", y)
    if isinstance(length, bool) or not isinstance(length, int):
        raise TypeError(f"length must be an int, got {type(length).__name__}")
    if length < K:
        raise ValueError(f"length must be >= K = y.shape[1] = {K}, got {length}")
    _check_ids("ids", ids, B, "[B, K]", K, y.device)
    _check_id_values("ids", ids, length, "output rows, length")
    if use_triton("scatter_tokens", backend, y=y):
        return _scatter_tokens_op(y, ids, length)
    return reference_scatter_tokens(y, ids, length)


def random_masking(x: torch.Tensor, mask_ratio: Union[float, torch.Tensor],
                   generator: Optional[torch.Generator] = None, *, backend: str = "auto"
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """MDT's per-sample random token masking (SPEC 5), the gather fused.

    ``mask_ratio`` is the FINAL ratio r of this call: MDTv2 draws
    ``r = mask_ratio + 0.2 * U(0, 1)`` (``mask_ratio = 0.3``) in the model and
    passes r here; this function does not add the random part.  With
    ``len_keep = int(L * (1 - r))``, uniform noise ``rand(B, L)`` from
    ``generator`` on x's device (the default generator when None) is argsorted
    per sample into ``ids_shuffle``; ``ids_keep = ids_shuffle[:, :len_keep]``.
    Given the same generator state the four outputs equal MDT's exactly (the
    kernel writes ``ids_restore`` as the inverse permutation, which is what
    ``argsort(ids_shuffle)`` is).

    Args:
        x: ``[B, L, C]`` floating point.
        mask_ratio: float (or one-element tensor, as MDT's) in ``[0, 1)``.
        generator: ``torch.Generator`` on x's device type, or None.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.

    Returns:
        ``x_kept [B, K, C]`` (differentiable in x), ``mask [B, L]`` (1 = removed,
        original order, ``torch.get_default_dtype()`` as MDT's ``torch.ones``),
        ``ids_restore [B, L]`` int64, ``ids_keep [B, K]`` int64.
    """
    B, L, C = _check_tokens("x", x)
    if isinstance(mask_ratio, torch.Tensor):
        if mask_ratio.numel() != 1 or not mask_ratio.is_floating_point():
            raise TypeError(f"mask_ratio must be a float or a one-element floating tensor, got "
                            f"{mask_ratio.dtype} tensor of shape {list(mask_ratio.shape)}")
        ratio = float(mask_ratio)
    elif isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)):
        raise TypeError(f"mask_ratio must be a float, got {type(mask_ratio).__name__}")
    else:
        ratio = float(mask_ratio)
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {ratio}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if generator.device.type != x.device.type:
            raise ValueError(f"generator must be on x's device type ({x.device.type}), "
                             f"got a {generator.device.type} generator")
    if not use_triton("random_masking", backend, x=x):
        return reference_random_masking(x, mask_ratio, generator)
    len_keep = int(L * (1 - mask_ratio))  # MDT's expression (tensor arithmetic for a tensor ratio)
    noise = torch.rand(B, L, device=x.device, generator=generator)
    ids_shuffle = torch.argsort(noise, dim=1)
    x_kept, mask, ids_restore = _masking_gather_op(x, ids_shuffle, len_keep)
    if mask.dtype != torch.get_default_dtype():
        mask = mask.to(torch.get_default_dtype())
    return x_kept, mask, ids_restore, ids_shuffle[:, :len_keep]


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
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.

    Returns ``[B, L, C]`` (dtype by promotion); gradients for x_kept, mask_token
    (summed over the masked rows) and pos_embed (summed over the batch).
    """
    B, K, C = _check_tokens("x_kept", x_kept)
    _check_ids("ids_restore", ids_restore, B, "[B, L]", None, x_kept.device)
    L = ids_restore.shape[1]
    if L < K:
        raise ValueError(f"ids_restore must have L >= K = x_kept.shape[1] = {K} columns, got {L}")
    check_tensor("mask_token", mask_token, 3, "[1, 1, C]", device=x_kept.device)
    check_shape("mask_token", mask_token, (1, 1, C), "[1, 1, C] with C = x_kept.shape[2]")
    if pos_embed is not None:
        check_tensor("pos_embed", pos_embed, 3, "[1, L, C]", device=x_kept.device)
        check_shape("pos_embed", pos_embed, (1, L, C), "[1, L, C]")
    _check_id_values("ids_restore", ids_restore, L, "each row a permutation of 0..L-1")
    if use_triton("unshuffle_with_mask_token", backend, x_kept=x_kept, mask_token=mask_token,
                  pos_embed=pos_embed):
        return _unshuffle_op(x_kept, ids_restore, mask_token, pos_embed)
    return reference_unshuffle_with_mask_token(x_kept, ids_restore, mask_token, pos_embed)


def masked_shortcut(x: torch.Tensor, x_before: torch.Tensor, mask: torch.Tensor, *,
                    backend: str = "auto") -> torch.Tensor:
    """MDT's masked shortcut ``x * mask + (1 - mask) * x_before``, fused.

    Args:
        x: ``[B, L, C]`` (the side block's output).
        x_before: ``[B, L, C]`` (its input), or ``[1, L, C]`` broadcast over the
            batch (EDT-XL's ``x * m + (1 - m) * pos_embed``).
        mask: ``[B, L]`` or ``[B, L, 1]``, bool or float (1 takes x).  A float
            mask that requires grad receives ``sum_c dout * (x - x_before)``.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.

    Returns ``[B, L, C]``.
    """
    B, L, C = _check_tokens("x", x)
    check_tensor("x_before", x_before, 3, "[B, L, C] or [1, L, C]", device=x.device)
    if tuple(x_before.shape) not in ((B, L, C), (1, L, C)):
        raise ValueError(f"x_before must be [B, L, C] = {[B, L, C]} or [1, L, C], "
                         f"got {list(x_before.shape)}")
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor [B, L], got {type(mask).__name__}")
    if mask.device != x.device:
        raise ValueError(f"mask must be on the device of x ({x.device}), got {mask.device}")
    if tuple(mask.shape) not in ((B, L), (B, L, 1)):
        raise ValueError(f"mask must be [B, L] = {[B, L]} or [B, L, 1], got {list(mask.shape)}")
    if not (mask.dtype == torch.bool or mask.is_floating_point()):
        raise TypeError(f"mask must be bool or floating point, got {mask.dtype}")
    if use_triton("masked_shortcut", backend, x=x, x_before=x_before, mask=mask):
        return _masked_shortcut_op(x, x_before, mask)
    return reference_masked_shortcut(x, x_before, mask)


def patch_merge_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                         keep_mask: Optional[torch.Tensor] = None, *,
                         grid: Optional[GridLike] = None, eps: float = 1e-6,
                         backend: str = "auto") -> torch.Tensor:
    """EDT's down-sampling front end in one kernel (SPEC 4, 6)::

        merge2x2(x) -> LayerNorm(4C, no affine) -> * (1 + scale) + shift -> * keep_mask

    The merge concatenates, per output token, (even row, even col), (odd row,
    even col), (even row, odd col), (odd row, odd col) of its 2x2 patch
    (Swin's order); output tokens are row-major on the ``H/2 x W/2`` grid.

    Args:
        x: ``[B, H*W, C]``, row-major on the ``H x W`` grid.
        shift, scale: ``[B, 4C]`` (EDT: ``Linear(c) -> 8C`` chunked in two).
        keep_mask: bool or float, ``[B, H*W/4]`` (one value per merged
            token) or ``[B, H*W]`` (one per input token, zeroing its C
            channels of the merged vector: EDT's down-masking
            ``rand(B, L) >= p``), or None.  No gradient flows into it.
        grid: ``n`` or ``(H, W)`` with H, W even; default: ``sqrt(L)`` square.
        eps: LayerNorm epsilon.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.

    Returns ``[B, H*W/4, 4C]``; differentiable in x, shift and scale.
    """
    B, L, C = _check_tokens("x", x)
    if grid is None:
        side = int(round(L ** 0.5))
        if side * side != L:
            raise ValueError(f"grid not given and L = x.shape[1] = {L} is not a square: "
                             f"pass grid=(H, W)")
        grid = side
    H, W = normalize_grid(grid)
    if H * W != L:
        raise ValueError(f"x must have H*W = {H * W} tokens for grid ({H}, {W}), got L = {L}")
    if H % 2 or W % 2:
        raise ValueError(f"grid ({H}, {W}) must have even H and W for a 2x2 merge")
    for name, t in (("shift", shift), ("scale", scale)):
        check_tensor(name, t, 2, "[B, 4C]", device=x.device)
        check_shape(name, t, (B, 4 * C), "[B, 4C]")
    T = L // 4
    if keep_mask is not None:
        check_tensor("keep_mask", keep_mask, 2, "[B, H*W/4] or [B, H*W]", device=x.device, floating=False)
        if tuple(keep_mask.shape) != (B, L):
            check_shape("keep_mask", keep_mask, (B, T), "[B, H*W/4] or [B, H*W]")
        if not (keep_mask.dtype == torch.bool or keep_mask.is_floating_point()):
            raise TypeError(f"keep_mask must be bool or floating point, got {keep_mask.dtype}")
    eps = check_eps(eps)
    if use_triton("patch_merge_modulate", backend, x=x, shift=shift, scale=scale):
        keep = None if keep_mask is None else keep_mask.detach().to(torch.float32)
        return _patch_merge_op(x, shift, scale, keep, H, W, eps)
    keep = None if keep_mask is None else keep_mask.detach()
    return reference_patch_merge_modulate(x, shift, scale, keep, (H, W), eps)
