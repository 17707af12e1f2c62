"""MDT's per-sample random token masking, the gather fused.

One kernel pass over ``ids_shuffle`` (a permutation per sample) writes the
kept rows ``x_kept``, the mask (1 = removed, original order) and
``ids_restore`` (the inverse permutation, i.e. ``argsort(ids_shuffle)``).
Custom op ``edt_kernels::random_masking_gather(Tensor x, Tensor ids_shuffle,
SymInt len_keep) -> (x_kept, mask float32 [B, L], ids_restore int64 [B, L])``;
its backward is the scatter of ``gather_scatter``.

``sort_kept=True`` first reorders ``ids_shuffle`` so that the kept tokens (and,
after them, the removed ones) come in ascending position order: same kept set,
same mask, ``ids_restore`` still its inverse.  Custom op
``edt_kernels::sort_kept_ids(Tensor ids_shuffle, SymInt len_keep) -> Tensor``,
one program per sample: the inverse permutation, then a prefix count of the
kept flags gives each token its sorted slot (no comparison sort); its
reference is ``edt_kernels.reference.tokens.reference_sort_kept_ids``.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from .. import _validation as V
from ..backends import OpCall
from . import _triton_utils as _tu
from ._triton_utils import (
    cdiv, check_launchable, common_alignment, dispatch, multiple_of, next_power_of_2, register_op, tile_config, tl,
    triton, unit_stride,
)
from ..reference.tokens import reference_random_masking
from .gather_scatter import _scatter_tokens_op

__all__ = ["random_masking", "kept_count"]


# ============================================================================ kernels

@triton.jit
def _masking_gather_kernel(
    x_ptr, shuffle_ptr, out_ptr, mask_ptr, restore_ptr,
    L, K, C,
    stride_xb, stride_xl, stride_hb, stride_ob, stride_ol, stride_mb, stride_rb,
    ALIGN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # MDT's masking in one pass over ids_shuffle (a permutation per sample):
    # slot j < K keeps token i = ids_shuffle[b, j] (x_kept[b, j] = x[b, i]);
    # mask[b, i] = (j >= K); ids_restore[b, i] = j, which is
    # argsort(ids_shuffle) without a second sort.
    C = multiple_of(C, ALIGN)
    stride_xb, stride_xl = multiple_of(stride_xb, ALIGN), multiple_of(stride_xl, ALIGN)
    stride_ob, stride_ol = multiple_of(stride_ob, ALIGN), multiple_of(stride_ol, ALIGN)
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
def _sort_kept_kernel(
    shuffle_ptr, rank_ptr, out_ptr, L, K,
    stride_hb, stride_rb, stride_ob,
    BLOCK: tl.constexpr,
):
    # One program per sample.  Phase 1: rank[i] = j for i = ids_shuffle[b, j]
    # (the inverse permutation, written to a scratch row).  Phase 2, over the
    # positions i in ascending order: kept(i) = rank[i] < K; with c(i) the
    # number of kept positions <= i, a kept i goes to slot c(i) - 1 and a
    # removed i to slot K + (i + 1 - c(i)) - 1: both groups ascending.
    b = tl.program_id(0).to(tl.int64)
    for start in range(0, L, BLOCK):
        j = start + tl.arange(0, BLOCK)
        ok = j < L
        i = tl.load(shuffle_ptr + b * stride_hb + j, mask=ok, other=0)
        tl.store(rank_ptr + b * stride_rb + i, j, mask=ok)
    tl.debug_barrier()  # every rank of this row written before any is read
    carry = 0
    for start in range(0, L, BLOCK):
        i = start + tl.arange(0, BLOCK)
        ok = i < L
        r = tl.load(rank_ptr + b * stride_rb + i, mask=ok, other=L)
        kept = (r < K).to(tl.int32)
        count = tl.cumsum(kept, 0) + carry  # kept positions <= i
        slot = tl.where(kept != 0, count - 1, K + i - count)
        tl.store(out_ptr + b * stride_ob + slot, i.to(tl.int64), mask=ok)
        carry += tl.sum(kept, 0)

# ============================================================================ launchers

def sort_kept(ids_shuffle: torch.Tensor, len_keep: int) -> torch.Tensor:
    """``ids_shuffle`` (a permutation per row) with its first ``len_keep``
    entries, and separately the rest, in ascending order."""
    check_launchable(ids_shuffle)
    ids_shuffle = unit_stride(ids_shuffle)
    B, L = ids_shuffle.shape
    out = _tu.empty_output((B, L), torch.int64, ids_shuffle.device)
    if B == 0 or L == 0:
        return out
    rank = torch.empty((B, L), dtype=torch.int32, device=ids_shuffle.device)  # scratch, fully written
    block = min(next_power_of_2(L), 1024)
    _sort_kept_kernel[(B,)](
        ids_shuffle, rank, out, L, len_keep, ids_shuffle.stride(0), rank.stride(0), out.stride(0),
        BLOCK=block, num_warps=4 if block <= 256 else 8,
    )
    return out


def masking_gather(x: torch.Tensor, ids_shuffle: torch.Tensor, len_keep: int
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_kept, mask float32, ids_restore)`` from a per-sample permutation ``ids_shuffle``."""
    check_launchable(x)
    x, ids_shuffle = unit_stride(x), unit_stride(ids_shuffle)
    B, L, C = x.shape
    K = len_keep
    out = _tu.empty_output((B, K, C), x.dtype, x.device)
    mask = _tu.empty_output((B, L), torch.float32, x.device)
    restore = _tu.empty_output((B, L), torch.int64, x.device)
    if B == 0 or L == 0:
        return out, mask, restore
    block_c, block_t, num_warps = tile_config(max(C, 1))
    grid = (cdiv(L, block_t), max(1, cdiv(C, block_c)), B)
    _masking_gather_kernel[grid](
        x, ids_shuffle, out, mask, restore, L, K, C,
        x.stride(0), x.stride(1), ids_shuffle.stride(0), out.stride(0), out.stride(1),
        mask.stride(0), restore.stride(0),
        ALIGN=common_alignment(x.element_size(), C, x.stride(0), x.stride(1), out.stride(0), out.stride(1)),
        BLOCK_T=block_t, BLOCK_C=block_c, num_warps=num_warps,
    )
    return out, mask, restore

# ============================================================================ custom ops

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


@torch.library.custom_op("edt_kernels::sort_kept_ids", mutates_args=())
def _sort_kept_op(ids_shuffle: torch.Tensor, len_keep: int) -> torch.Tensor:
    return sort_kept(ids_shuffle, len_keep)


@_sort_kept_op.register_fake
def _(ids_shuffle, len_keep):
    return torch.empty_like(ids_shuffle, dtype=torch.int64)

# ============================================================================ public functions

def random_masking(x: torch.Tensor, mask_ratio: Union[float, torch.Tensor, None] = None,
                   generator: Optional[torch.Generator] = None, *, len_keep: Optional[int] = None,
                   noise: Optional[torch.Tensor] = None, sort_kept: bool = False,
                   backend: str = "auto"
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """MDT's per-sample random token masking, the gather fused.

    ``mask_ratio`` is the FINAL ratio r of this call: MDTv2 draws
    ``r = mask_ratio + 0.2 * U(0, 1)`` (``mask_ratio = 0.3``) in the model and
    passes r here; this function does not add the random part.  With
    ``len_keep = int(L * (1 - r))``, uniform noise ``rand(B, L)`` from
    ``generator`` on x's device (the default generator when None) is argsorted
    per sample into ``ids_shuffle``; ``ids_keep = ids_shuffle[:, :len_keep]``.
    Given the same generator state the four outputs equal MDT's exactly (the
    kernel writes ``ids_restore`` as the inverse permutation, which is what
    ``argsort(ids_shuffle)`` is).

    ``sort_kept=True`` keeps the same tokens (same random draws, same
    ``mask``) but in ascending position order: ``ids_keep`` sorted per row,
    ``x_kept`` gathered in that order, the removed tokens ascending after
    them, ``ids_restore`` the inverse of that permutation.  A caller whose
    work on the kept tokens is permutation-equivariant (attention with the
    positions carried along, per-token layers) gets the same result after
    the unshuffle, up to float summation order, and neighbouring kept
    tokens are near in the grid (the relative-position table is gathered at
    nearby rows).  The default False gives MDT's exact outputs.

    Drawn ahead (what a compiled step does, so that the call itself reads
    nothing back from the device and draws nothing): ``len_keep`` instead of
    ``mask_ratio`` (:func:`kept_count` gives MDT's count from a ratio) and
    ``noise`` instead of ``generator``; the same numbers give the same outputs.

    Args:
        x: ``[B, L, C]`` floating point.
        mask_ratio: float (or one-element tensor, as MDT's) in ``[0, 1)``; or None with ``len_keep``.
        generator: ``torch.Generator`` on x's device type, or None.
        len_keep: the number of kept tokens, in ``[0, L]`` (instead of ``mask_ratio``).
        noise: ``[B, L]`` floating ``U[0, 1)`` draws on x's device (instead of ``generator``).
        sort_kept: kept (and removed) tokens in ascending position order.
        backend: ``"auto"``, ``"triton"``, ``"torch"`` or ``"eager"``.

    Returns:
        ``x_kept [B, K, C]`` (differentiable in x), ``mask [B, L]`` (1 = removed,
        original order, ``torch.get_default_dtype()`` as MDT's ``torch.ones``),
        ``ids_restore [B, L]`` int64, ``ids_keep [B, K]`` int64.
    """
    B, L, C = V.check_tokens("x", x)
    if (mask_ratio is None) == (len_keep is None):
        raise TypeError("random_masking takes exactly one of mask_ratio and len_keep")
    if noise is not None:
        if generator is not None:
            raise TypeError("random_masking takes at most one of generator and noise")
        if not isinstance(noise, torch.Tensor) or not noise.is_floating_point() or noise.shape != (B, L) \
                or noise.device != x.device:
            raise ValueError(f"noise must be a floating [B, L] = [{B}, {L}] tensor on {x.device}, got "
                             f"{_describe(noise)}")
    if len_keep is not None:
        if isinstance(len_keep, bool) or not isinstance(len_keep, (int, torch.SymInt)):
            raise TypeError(f"len_keep must be an int, got {type(len_keep).__name__}")
        if not 0 <= len_keep <= L:
            raise ValueError(f"len_keep must be in [0, L={L}], got {len_keep}")
    elif isinstance(mask_ratio, torch.Tensor):
        if mask_ratio.numel() != 1 or not mask_ratio.is_floating_point():
            raise TypeError(f"mask_ratio must be a float or a one-element floating tensor, got "
                            f"{mask_ratio.dtype} tensor of shape {list(mask_ratio.shape)}")
        ratio = float(mask_ratio)
    elif isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)):
        raise TypeError(f"mask_ratio must be a float, got {type(mask_ratio).__name__}")
    else:
        ratio = float(mask_ratio)
    if mask_ratio is not None:
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {ratio}")
        len_keep = kept_count(L, mask_ratio)
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if generator.device.type != x.device.type:
            raise ValueError(f"generator must be on x's device type ({x.device.type}), "
                             f"got a {generator.device.type} generator")
    if not isinstance(sort_kept, bool):
        raise TypeError(f"sort_kept must be a bool, got {type(sort_kept).__name__}")
    return dispatch("random_masking", backend, OpCall((x, len_keep, noise, generator, sort_kept), x=x))


def kept_count(length: int, mask_ratio: Union[float, torch.Tensor]) -> int:
    """MDT's kept-token count ``int(L * (1 - r))`` (tensor arithmetic for a tensor ratio, in its
    dtype: a CPU tensor's is read without a device sync)."""
    return int(length * (1 - mask_ratio))


def _describe(t) -> str:
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    return f"{t.dtype} tensor of shape {list(t.shape)} on {t.device}"


def _random_masking_triton(call: OpCall):
    x, len_keep, noise, generator, sort = call.args
    B, L, C = x.shape
    if noise is None:
        noise = torch.rand(B, L, device=x.device, generator=generator)
    ids_shuffle = torch.argsort(noise, dim=1)
    if sort:
        ids_shuffle = _sort_kept_op(ids_shuffle, len_keep)
    x_kept, mask, ids_restore = _masking_gather_op(x, ids_shuffle, len_keep)
    if mask.dtype != torch.get_default_dtype():
        mask = mask.to(torch.get_default_dtype())
    return x_kept, mask, ids_restore, ids_shuffle[:, :len_keep]

# ============================================================================ backends

register_op("random_masking", _random_masking_triton,
            lambda c: reference_random_masking(c.args[0], generator=c.args[3], len_keep=c.args[1],
                                               noise=c.args[2], sort_kept=c.args[4]))
