"""MDT's masked shortcut ``x * mask + (1 - mask) * x_before``, fused.

Custom ops ``edt_kernels::masked_shortcut(Tensor x, Tensor x_before, Tensor
mask) -> Tensor`` (``x_before`` ``[B, L, C]`` or ``[1, L, C]``, mask ``[B, L]``
bool or float) and ``edt_kernels::masked_shortcut_backward(..., bool
need_dmask) -> (dx, dx_before, dmask float32 [B, L] or [0])``.
"""
from __future__ import annotations

from typing import Tuple

import torch

from .. import _validation as V
from ..backends import OpCall
from . import _triton_utils as _tu
from ._triton_utils import (
    cdiv, check_launchable, common_alignment, dispatch, multiple_of, promote, register_op, tile_config, tl, triton,
    unit_stride,
)
from ..reference.tokens import reference_masked_shortcut

__all__ = ["masked_shortcut"]


# ============================================================================ kernels

@triton.jit
def _masked_shortcut_fwd_kernel(
    x_ptr, xb_ptr, m_ptr, out_ptr,
    L, C,
    stride_xb, stride_xl, stride_bb, stride_bl, stride_mb, stride_ob, stride_ol,
    ALIGN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # out = x * m + (1 - m) * x_before; x_before's batch stride is 0 when it is [1, L, C].
    C = multiple_of(C, ALIGN)
    stride_xb, stride_xl = multiple_of(stride_xb, ALIGN), multiple_of(stride_xl, ALIGN)
    stride_bb, stride_bl = multiple_of(stride_bb, ALIGN), multiple_of(stride_bl, ALIGN)
    stride_ob, stride_ol = multiple_of(stride_ob, ALIGN), multiple_of(stride_ol, ALIGN)
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
    NEED_DMASK: tl.constexpr, ALIGN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # dx = dout * m, dx_before = dout * (1 - m) (both [B, L, C], with the
    # strides stride_gb, stride_gl), dmask partial over this channel block =
    # sum_c dout * (x - x_before).
    C = multiple_of(C, ALIGN)
    stride_db, stride_dl = multiple_of(stride_db, ALIGN), multiple_of(stride_dl, ALIGN)
    stride_xb, stride_xl = multiple_of(stride_xb, ALIGN), multiple_of(stride_xl, ALIGN)
    stride_bb, stride_bl = multiple_of(stride_bb, ALIGN), multiple_of(stride_bl, ALIGN)
    stride_gb, stride_gl = multiple_of(stride_gb, ALIGN), multiple_of(stride_gl, ALIGN)
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
    out = _tu.empty_output((B, L, C), dtype, x.device)
    if out.numel() == 0:
        return out
    block_c, block_t, num_warps = tile_config(C)
    grid = (cdiv(L, block_t), cdiv(C, block_c), B)
    xs, bs, os_ = (x.stride(0), x.stride(1)), (xb.stride(0), xb.stride(1)), (out.stride(0), out.stride(1))
    _masked_shortcut_fwd_kernel[grid](
        x, xb, m, out, L, C, *xs, *bs, m.stride(0), *os_,
        ALIGN=common_alignment(x.element_size(), C, *xs, *bs, *os_), BLOCK_T=block_t, BLOCK_C=block_c,
        num_warps=num_warps,
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
    dx = _tu.empty_output((B, L, C), dout.dtype, x.device)
    dxb = _tu.empty_output((B, L, C), dout.dtype, x.device)
    block_c, block_t, num_warps = tile_config(max(C, 1))
    n_c = cdiv(C, block_c)
    dm_part = _tu.empty_output((n_c, B, L), torch.float32, x.device) if need_dmask else dx
    if dx.numel():
        rows = (dout.stride(0), dout.stride(1), x.stride(0), x.stride(1), xb.stride(0), xb.stride(1))
        gs = (dx.stride(0), dx.stride(1))  # dx and dx_before alike
        _masked_shortcut_bwd_kernel[(cdiv(L, block_t), n_c, B)](
            dout, x, xb, m, dx, dxb, dm_part, L, C, *rows, m.stride(0), *gs,
            dm_part.stride(0) if need_dmask else 0, dm_part.stride(1) if need_dmask else 0,
            NEED_DMASK=need_dmask, ALIGN=common_alignment(dout.element_size(), C, *rows, *gs),
            BLOCK_T=block_t, BLOCK_C=block_c, num_warps=num_warps,
        )
    if x_before.shape[0] != B:
        dxb = dxb.sum(0, keepdim=True)
    if need_dmask:
        dmask = dm_part.sum(0) if dx.numel() else torch.zeros((B, L), dtype=torch.float32, device=x.device)
    else:
        dmask = x.new_empty((0,), dtype=torch.float32)
    return dx, dxb, dmask

# ============================================================================ custom ops

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

# ============================================================================ public functions

def masked_shortcut(x: torch.Tensor, x_before: torch.Tensor, mask: torch.Tensor, *,
                    backend: str = "auto") -> torch.Tensor:
    """MDT's masked shortcut ``x * mask + (1 - mask) * x_before``, fused.

    Args:
        x: ``[B, L, C]`` (the side block's output).
        x_before: ``[B, L, C]`` (its input), or ``[1, L, C]`` broadcast over the
            batch (EDT-XL's ``x * m + (1 - m) * pos_embed``).
        mask: ``[B, L]`` or ``[B, L, 1]``, bool or float (1 takes x).  A float
            mask that requires grad receives ``sum_c dout * (x - x_before)``.
        backend: ``"auto"``, ``"triton"``, ``"torch"`` or ``"eager"``.

    Returns ``[B, L, C]``.
    """
    B, L, C = V.check_tokens("x", x)
    V.check_tensor("x_before", x_before, 3, "[B, L, C] or [1, L, C]", device=x.device)
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
    return dispatch("masked_shortcut", backend, OpCall((x, x_before, mask), x=x, x_before=x_before, mask=mask))

# ============================================================================ backends

register_op("masked_shortcut", lambda c: _masked_shortcut_op(*c.args), lambda c: reference_masked_shortcut(*c.args))
