"""adaLN-Zero gated residual ``x + gate[:, None] * y``, fused.

Custom ops ``edt_kernels::gated_residual(Tensor x, Tensor gate, Tensor y)``
and ``edt_kernels::gated_residual_backward(Tensor dout, Tensor gate, Tensor
y) -> (dy, dgate float32 [B, C])`` (dx is dout itself).  The gate gradient is
a sum over the tokens, in fp32 partial rows finished by one ``torch.sum``.
"""
from __future__ import annotations

from typing import Tuple

import torch

from .. import _validation as V
from ..backends import OpCall
from . import _triton_utils as _tu
from ._triton_utils import (
    cdiv, check_launchable, common_alignment, dispatch, multiple_of, promote, register_op, rows_per_program,
    tile_config, tl, triton, unit_stride,
)
from ..reference.adaln import reference_gated_residual
from .layernorm_modulate import _check_adaln_rows

__all__ = ["gated_residual"]


# ============================================================================ kernels

@triton.jit
def _gated_residual_fwd_kernel(
    x_ptr, gate_ptr, y_ptr, out_ptr,
    L, C,
    stride_xb, stride_xl, stride_gb, stride_yb, stride_yl, stride_ob, stride_ol,
    ALIGN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    C = multiple_of(C, ALIGN)
    stride_xb, stride_xl = multiple_of(stride_xb, ALIGN), multiple_of(stride_xl, ALIGN)
    stride_gb = multiple_of(stride_gb, ALIGN)
    stride_yb, stride_yl = multiple_of(stride_yb, ALIGN), multiple_of(stride_yl, ALIGN)
    stride_ob, stride_ol = multiple_of(stride_ob, ALIGN), multiple_of(stride_ol, ALIGN)
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    ok = (t < L)[:, None] & c_ok[None, :]
    tt = t[:, None].to(tl.int64)
    x = tl.load(x_ptr + b * stride_xb + tt * stride_xl + c[None, :], mask=ok, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + b * stride_yb + tt * stride_yl + c[None, :], mask=ok, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + b * stride_gb + c, mask=c_ok, other=0.0).to(tl.float32)
    out = x + g[None, :] * y
    tl.store(out_ptr + b * stride_ob + tt * stride_ol + c[None, :], out.to(out_ptr.dtype.element_ty),
             mask=ok)


@triton.jit
def _gated_residual_bwd_kernel(
    dout_ptr, gate_ptr, y_ptr, dy_ptr, dgate_part_ptr,
    L, C, ROWS_PER_PROG,
    stride_db, stride_dl, stride_gb, stride_yb, stride_yl, stride_pb, stride_pp,
    ALIGN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # dy = dout * gate (written with y's strides), dgate partial = sum_t dout * y.
    C = multiple_of(C, ALIGN)
    stride_db, stride_dl = multiple_of(stride_db, ALIGN), multiple_of(stride_dl, ALIGN)
    stride_gb = multiple_of(stride_gb, ALIGN)
    stride_yb, stride_yl = multiple_of(stride_yb, ALIGN), multiple_of(stride_yl, ALIGN)
    stride_pb, stride_pp = multiple_of(stride_pb, ALIGN), multiple_of(stride_pp, ALIGN)
    pid = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    g = tl.load(gate_ptr + b * stride_gb + c, mask=c_ok, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    t_start = pid * ROWS_PER_PROG
    for t0 in range(t_start, t_start + ROWS_PER_PROG, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        ok = (t < L)[:, None] & c_ok[None, :]
        tt = t[:, None].to(tl.int64)
        d = tl.load(dout_ptr + b * stride_db + tt * stride_dl + c[None, :], mask=ok, other=0.0).to(tl.float32)
        y_off = b * stride_yb + tt * stride_yl + c[None, :]
        y = tl.load(y_ptr + y_off, mask=ok, other=0.0).to(tl.float32)
        acc += tl.sum(d * y, axis=0)
        tl.store(dy_ptr + y_off, (d * g[None, :]).to(dy_ptr.dtype.element_ty), mask=ok)
    tl.store(dgate_part_ptr + b * stride_pb + pid * stride_pp + c, acc, mask=c_ok)

# ============================================================================ launchers

def gated_residual_forward(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    check_launchable(x)
    x, gate, y = unit_stride(x), unit_stride(gate), unit_stride(y)
    B, L, C = x.shape
    out = _tu.empty_output((B, L, C), promote(x, gate, y), x.device)
    if out.numel() == 0:
        return out
    block_c, block_t, num_warps = tile_config(C)
    grid = (cdiv(L, block_t), cdiv(C, block_c), B)
    strides = (x.stride(0), x.stride(1), gate.stride(0), y.stride(0), y.stride(1), out.stride(0), out.stride(1))
    _gated_residual_fwd_kernel[grid](
        x, gate, y, out, L, C, *strides,
        ALIGN=common_alignment(x.element_size(), C, *strides), BLOCK_T=block_t, BLOCK_C=block_c,
        num_warps=num_warps,
    )
    return out


def gated_residual_backward(dout: torch.Tensor, gate: torch.Tensor, y: torch.Tensor
                            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(dy`` like y, ``dgate`` float32 ``[B, C])``; dx is dout itself."""
    check_launchable(y)
    y = y.contiguous()
    dout, gate = unit_stride(dout), unit_stride(gate)
    B, L, C = y.shape
    dy = _tu.empty_output(y.shape, y.dtype, y.device)
    if B == 0 or L == 0 or C == 0:
        return dy, torch.zeros((B, C), dtype=torch.float32, device=y.device)
    block_c, block_t, num_warps = tile_config(C)
    n_c = cdiv(C, block_c)
    rows = rows_per_program(L, B * n_c, block_t)
    P = cdiv(L, rows)
    dgate_part = _tu.empty_output((B, P, C), torch.float32, y.device)
    strides = (dout.stride(0), dout.stride(1), gate.stride(0), y.stride(0), y.stride(1),
               dgate_part.stride(0), dgate_part.stride(1))
    _gated_residual_bwd_kernel[(P, n_c, B)](
        dout, gate, y, dy, dgate_part, L, C, rows, *strides,
        ALIGN=common_alignment(y.element_size(), C, *strides), BLOCK_T=block_t, BLOCK_C=block_c,
        num_warps=num_warps,
    )
    return dy, dgate_part.sum(1)

# ============================================================================ custom ops

@torch.library.custom_op("edt_kernels::gated_residual", mutates_args=())
def _gated_residual_op(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return gated_residual_forward(x, gate, y)


@_gated_residual_op.register_fake
def _(x, gate, y):
    return x.new_empty(x.shape, dtype=promote(x, gate, y))


@torch.library.custom_op("edt_kernels::gated_residual_backward", mutates_args=())
def _gated_residual_bwd_op(dout: torch.Tensor, gate: torch.Tensor,
                           y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return gated_residual_backward(dout, gate, y)


@_gated_residual_bwd_op.register_fake
def _(dout, gate, y):
    return y.new_empty(y.shape), y.new_empty((y.shape[0], y.shape[-1]), dtype=torch.float32)


def _gr_setup(ctx, inputs, output):
    x, gate, y = inputs
    ctx.save_for_backward(gate, y)
    ctx.x_dtype = x.dtype


def _gr_backward(ctx, dout):
    gate, y = ctx.saved_tensors
    dy, dgate = _gated_residual_bwd_op(dout, gate, y)
    return dout.to(ctx.x_dtype), dgate.to(gate.dtype), dy


_gated_residual_op.register_autograd(_gr_backward, setup_context=_gr_setup)

# ============================================================================ public functions

def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, *,
                   backend: str = "auto") -> torch.Tensor:
    """adaLN-Zero gated residual ``x + gate[:, None] * y``, fused.

    Args:
        x, y: ``[B, L, C]``; gate: ``[B, C]``.  Result dtype by type promotion.
        backend: ``"auto"``, ``"triton"``, ``"torch"`` or ``"eager"``.

    Returns ``[B, L, C]``; differentiable in x, gate and y.
    """
    V.check_tensor("x", x, 3, "[B, L, C]")
    V.check_tensor("y", y, 3, "[B, L, C]", device=x.device)
    V.check_shape("y", y, tuple(x.shape), "[B, L, C] like x")
    _check_adaln_rows(x, "gate", (gate,), x.device)
    return dispatch("gated_residual", backend, OpCall((x, gate, y), x=x, gate=gate, y=y))

# ============================================================================ backends

register_op("gated_residual", lambda c: _gated_residual_op(*c.args), lambda c: reference_gated_residual(*c.args))
