"""adaLN modulation of a DiT block, fused::

    layernorm_modulate(x, shift, scale) = LayerNorm(x) * (1 + scale[:, None]) + shift[:, None]

(no-affine LayerNorm, eps 1e-6, fp32 statistics; ``x`` ``[B, L, C]``,
``shift, scale`` ``[B, C]``).  One pass over the rows forward and one
backward; the shift/scale gradients are sums over the tokens: each program
accumulates its rows in fp32 and writes one partial row, a small ``torch.sum``
over the ``[B, P, C]`` partials finishes (deterministic, no atomics).  With
``MERGE`` the same kernels serve ``patch_merge_modulate`` (EDT's 2x2 patch
merge read in place).  Both partial rows of a program sit side by side in one
``[B, P, 2, C]`` buffer, so one sum finishes both.  Custom ops
``edt_kernels::layernorm_modulate(Tensor x, Tensor shift, Tensor scale, float eps)``
and its ``_backward`` (``dx``, and ``dshift``/``dscale`` as the rows of one float32
``[B, 2, C]``).  Outputs follow PyTorch type
promotion of the inputs.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import _validation as V
from ..backends import OpCall
from . import _triton_utils as _tu
from ._triton_utils import (
    cdiv, check_launchable, common_alignment, dispatch, multiple_of, promote, register_op, row_config,
    rows_per_program, tl, triton, unit_stride,
)
from ..reference.adaln import reference_layernorm_modulate

__all__ = ["layernorm_modulate"]


# ============================================================================ kernels

@triton.jit
def _ln_src_offsets(t, j, C_IN, W_OUT, stride_l, MERGE: tl.constexpr):
    """Offsets (within one batch) of the input elements of output rows ``t``,
    columns ``j``.  Without MERGE, row t column j.  With MERGE, output token t
    of the (H/2, W/2) grid gathers its 2x2 patch: column block q = j // C_IN is
    (row parity, col parity) = (q % 2, q // 2), i.e. the order
    (even, even), (odd, even), (even, odd), (odd, odd) (Swin's patch-merge order)."""
    if MERGE:
        q = j // C_IN
        c = j - q * C_IN
        off = _merge_src_token(t, j, C_IN, W_OUT).to(tl.int64) * stride_l + c[None, :]
    else:
        off = t[:, None].to(tl.int64) * stride_l + j[None, :]
    return off


@triton.jit
def _merge_src_token(t, j, C_IN, W_OUT):
    """Input token (flat index on the (2 H_out) x (2 W_out) grid) that output
    row ``t``, column ``j`` of the 2x2 merge reads."""
    q = j // C_IN
    i = t // W_OUT
    w = t - i * W_OUT
    return (2 * i[:, None] + (q % 2)[None, :]) * (2 * W_OUT) + 2 * w[:, None] + (q // 2)[None, :]


@triton.jit
def _keep_factor(keep_ptr, b, stride_kb, t, j, t_ok, ok, C_IN, W_OUT, KEEP_SOURCE: tl.constexpr):
    """Keep-mask multiplier of a [BLOCK_T, BLOCK_N] tile: one value per output
    row, or (KEEP_SOURCE, merge only) one per input token of the 2x2 patch."""
    if KEEP_SOURCE:
        src = _merge_src_token(t, j, C_IN, W_OUT).to(tl.int64)
        return tl.load(keep_ptr + b * stride_kb + src, mask=ok, other=0.0).to(tl.float32)
    else:
        keep = tl.load(keep_ptr + b * stride_kb + t, mask=t_ok, other=0.0).to(tl.float32)
        return keep[:, None]


@triton.jit
def _normalized_rows(x_base, t, j, ok, N, C_IN, W_OUT, stride_xl, eps, MERGE: tl.constexpr):
    """Rows ``t`` of x (2x2-merged with MERGE) normalised without affine, in
    float32 statistics: ``(xhat, rstd, offsets of the elements read)``."""
    x_off = _ln_src_offsets(t, j, C_IN, W_OUT, stride_xl, MERGE)
    x = tl.load(x_base + x_off, mask=ok, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / N
    xc = tl.where(ok, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / N + eps)
    return xc * rstd[:, None], rstd, x_off


@triton.jit
def _ln_modulate_fwd_kernel(
    x_ptr, shift_ptr, scale_ptr, keep_ptr, out_ptr,
    T, N, C_IN, W_OUT,
    stride_xb, stride_xl, stride_sb, stride_cb, stride_kb, stride_ob, stride_ol,
    eps,
    MERGE: tl.constexpr, HAS_KEEP: tl.constexpr, KEEP_SOURCE: tl.constexpr,
    ALIGN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    N, C_IN = multiple_of(N, ALIGN), multiple_of(C_IN, ALIGN)
    stride_xb, stride_xl = multiple_of(stride_xb, ALIGN), multiple_of(stride_xl, ALIGN)
    stride_sb, stride_cb = multiple_of(stride_sb, ALIGN), multiple_of(stride_cb, ALIGN)
    stride_ob, stride_ol = multiple_of(stride_ob, ALIGN), multiple_of(stride_ol, ALIGN)
    pid_t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    j = tl.arange(0, BLOCK_N)
    t_ok = t < T
    j_ok = j < N
    ok = t_ok[:, None] & j_ok[None, :]

    xhat, rstd, x_off = _normalized_rows(x_ptr + b * stride_xb, t, j, ok, N, C_IN, W_OUT, stride_xl, eps, MERGE)

    shift = tl.load(shift_ptr + b * stride_sb + j, mask=j_ok, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + b * stride_cb + j, mask=j_ok, other=0.0).to(tl.float32)
    y = xhat * (1.0 + scale[None, :]) + shift[None, :]
    if HAS_KEEP:
        y = y * _keep_factor(keep_ptr, b, stride_kb, t, j, t_ok, ok, C_IN, W_OUT, KEEP_SOURCE)
    out_off = b * stride_ob + t[:, None].to(tl.int64) * stride_ol + j[None, :]
    tl.store(out_ptr + out_off, y.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _ln_modulate_bwd_kernel(
    dout_ptr, x_ptr, scale_ptr, keep_ptr, dx_ptr, dshift_part_ptr, dscale_part_ptr,
    T, N, C_IN, W_OUT, ROWS_PER_PROG,
    stride_db, stride_dl, stride_xb, stride_xl, stride_cb, stride_kb,
    stride_pb, stride_pp,
    eps,
    MERGE: tl.constexpr, HAS_KEEP: tl.constexpr, KEEP_SOURCE: tl.constexpr,
    ALIGN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program: rows [pid * ROWS_PER_PROG, +ROWS_PER_PROG) of sample b.  The
    # statistics are recomputed from x (read anyway for xhat), so the forward
    # saves nothing.  dx is written with x's strides (the launcher makes x
    # contiguous and allocates dx like it).
    N, C_IN = multiple_of(N, ALIGN), multiple_of(C_IN, ALIGN)
    stride_db, stride_dl = multiple_of(stride_db, ALIGN), multiple_of(stride_dl, ALIGN)
    stride_xb, stride_xl = multiple_of(stride_xb, ALIGN), multiple_of(stride_xl, ALIGN)
    stride_cb = multiple_of(stride_cb, ALIGN)
    stride_pb, stride_pp = multiple_of(stride_pb, ALIGN), multiple_of(stride_pp, ALIGN)
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    j = tl.arange(0, BLOCK_N)
    j_ok = j < N
    scale = tl.load(scale_ptr + b * stride_cb + j, mask=j_ok, other=0.0).to(tl.float32)
    acc_shift = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_scale = tl.zeros([BLOCK_N], dtype=tl.float32)
    t_start = pid * ROWS_PER_PROG
    for t0 in range(t_start, t_start + ROWS_PER_PROG, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        t_ok = t < T
        ok = t_ok[:, None] & j_ok[None, :]
        xhat, rstd, x_off = _normalized_rows(x_ptr + b * stride_xb, t, j, ok, N, C_IN, W_OUT, stride_xl, eps,
                                             MERGE)

        d_off = b * stride_db + t[:, None].to(tl.int64) * stride_dl + j[None, :]
        g = tl.load(dout_ptr + d_off, mask=ok, other=0.0).to(tl.float32)
        if HAS_KEEP:
            g = g * _keep_factor(keep_ptr, b, stride_kb, t, j, t_ok, ok, C_IN, W_OUT, KEEP_SOURCE)
        acc_shift += tl.sum(g, axis=0)
        acc_scale += tl.sum(g * xhat, axis=0)
        dxhat = g * (1.0 + scale[None, :])
        m1 = tl.sum(dxhat, axis=1) / N
        m2 = tl.sum(dxhat * xhat, axis=1) / N
        dx = (dxhat - m1[:, None] - xhat * m2[:, None]) * rstd[:, None]
        tl.store(dx_ptr + b * stride_xb + x_off, dx.to(dx_ptr.dtype.element_ty), mask=ok)
    p_off = b * stride_pb + pid * stride_pp + j
    tl.store(dshift_part_ptr + p_off, acc_shift, mask=j_ok)
    tl.store(dscale_part_ptr + p_off, acc_scale, mask=j_ok)

# ============================================================================ launchers

def ln_modulate_forward(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                        keep: Optional[torch.Tensor] = None, merge_width: int = 0) -> torch.Tensor:
    """``LayerNorm(rows(x)) * (1 + scale) + shift`` (``* keep``) as ``[B, T, N]``.

    ``merge_width == 0``: rows are x's rows (T = L, N = C).  ``merge_width = W``:
    rows are the 2x2 patch merges of x on an ``(L / W) x W`` grid (T = L / 4,
    N = 4C).  ``keep``: float ``[B, T]`` row multipliers, with merging also
    ``[B, L]`` (one per input token: EDT's down-masking), or None.
    """
    check_launchable(x)
    x, shift, scale = unit_stride(x), unit_stride(shift), unit_stride(scale)
    B, L, C = x.shape
    T, N, w_out = (L // 4, 4 * C, merge_width // 2) if merge_width else (L, C, 1)
    out = _tu.empty_output((B, T, N), promote(x, shift, scale), x.device)
    if out.numel() == 0:
        return out
    if keep is not None:
        keep = unit_stride(keep)
    block_n, block_t, num_warps = row_config(N)
    grid = (cdiv(T, block_t), B)
    xs, ms, os_ = (x.stride(0), x.stride(1)), (shift.stride(0), scale.stride(0)), (out.stride(0), out.stride(1))
    _ln_modulate_fwd_kernel[grid](
        x, shift, scale, keep if keep is not None else x, out,
        T, N, C, w_out, *xs, *ms, keep.stride(0) if keep is not None else 0, *os_,
        float(eps),
        MERGE=bool(merge_width), HAS_KEEP=keep is not None,
        KEEP_SOURCE=keep is not None and bool(merge_width) and keep.shape[1] == L,
        ALIGN=common_alignment(x.element_size(), C, *xs, *ms, *os_),
        BLOCK_T=block_t, BLOCK_N=block_n, num_warps=num_warps,
    )
    return out


def ln_modulate_backward(dout: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, eps: float,
                         keep: Optional[torch.Tensor] = None, merge_width: int = 0
                         ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`ln_modulate_forward`: ``(dx`` like x, ``dmod`` float32
    ``[B, 2, N]``: ``dmod[:, 0]`` = dshift, ``dmod[:, 1]`` = dscale)."""
    check_launchable(x)
    x = x.contiguous()
    dout, scale = unit_stride(dout), unit_stride(scale)
    B, L, C = x.shape
    T, N, w_out = (L // 4, 4 * C, merge_width // 2) if merge_width else (L, C, 1)
    dx = _tu.empty_output(x.shape, x.dtype, x.device)
    if B == 0 or T == 0:
        return dx, torch.zeros((B, 2, N), dtype=torch.float32, device=x.device)
    if keep is not None:
        keep = unit_stride(keep)
    block_n, block_t, num_warps = row_config(N)
    rows = rows_per_program(T, B, block_t)
    P = cdiv(T, rows)
    part = _tu.empty_output((B, P, 2, N), torch.float32, x.device)  # [:, :, 0] dshift, [:, :, 1] dscale
    dshift_part, dscale_part = part.unbind(2)
    rows_s = (dout.stride(0), dout.stride(1), x.stride(0), x.stride(1), scale.stride(0))
    ps = (dshift_part.stride(0), dshift_part.stride(1))  # dscale_part alike
    _ln_modulate_bwd_kernel[(P, B)](
        dout, x, scale, keep if keep is not None else x, dx, dshift_part, dscale_part,
        T, N, C, w_out, rows, *rows_s, keep.stride(0) if keep is not None else 0, *ps,
        float(eps),
        MERGE=bool(merge_width), HAS_KEEP=keep is not None,
        KEEP_SOURCE=keep is not None and bool(merge_width) and keep.shape[1] == L,
        ALIGN=common_alignment(x.element_size(), C, *rows_s, *ps),
        BLOCK_T=block_t, BLOCK_N=block_n, num_warps=num_warps,
    )
    return dx, part.sum(1)

# ============================================================================ custom ops

@torch.library.custom_op("edt_kernels::layernorm_modulate", mutates_args=())
def _layernorm_modulate_op(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                           eps: float) -> torch.Tensor:
    return ln_modulate_forward(x, shift, scale, eps)


@_layernorm_modulate_op.register_fake
def _(x, shift, scale, eps):
    return x.new_empty(x.shape, dtype=promote(x, shift, scale))


@torch.library.custom_op("edt_kernels::layernorm_modulate_backward", mutates_args=())
def _layernorm_modulate_bwd_op(dout: torch.Tensor, x: torch.Tensor, scale: torch.Tensor,
                               eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    return ln_modulate_backward(dout, x, scale, eps)


@_layernorm_modulate_bwd_op.register_fake
def _(dout, x, scale, eps):
    B, C = x.shape[0], x.shape[-1]
    return x.new_empty(x.shape), x.new_empty((B, 2, C), dtype=torch.float32)


def _ln_setup(ctx, inputs, output):
    x, shift, scale, eps = inputs
    ctx.save_for_backward(x, scale)
    ctx.eps = eps
    ctx.shift_dtype = shift.dtype


def _ln_backward(ctx, dout):
    x, scale = ctx.saved_tensors
    dx, dmod = _layernorm_modulate_bwd_op(dout, x, scale, ctx.eps)
    dshift, dscale = dmod.unbind(1)
    return dx, dshift.to(ctx.shift_dtype), dscale.to(scale.dtype), None


_layernorm_modulate_op.register_autograd(_ln_backward, setup_context=_ln_setup)

# ============================================================================ torch backend

class _LayerNormModulateTorch(torch.autograd.Function):
    """The reference's forward, op for op (bit-equal), keeping for the backward
    only x and the row statistics (mean, rstd): the normalised rows are
    recomputed from them instead of being saved (the reference keeps them)."""

    @staticmethod
    def forward(ctx, x, shift, scale, eps):
        normed, mean, rstd = torch.native_layer_norm(x, (x.shape[-1],), None, None, eps)
        ctx.save_for_backward(x, scale, mean, rstd)
        return normed * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)

    @staticmethod
    def backward(ctx, dout):
        x, scale, mean, rstd = ctx.saved_tensors
        needs_x, needs_shift, needs_scale = ctx.needs_input_grad[:3]
        dx = dshift = dscale = None
        if needs_x:
            dnormed = dout * (1 + scale.unsqueeze(1))
            dx = torch.ops.aten.native_layer_norm_backward(dnormed, x, (x.shape[-1],), mean, rstd, None, None,
                                                           [True, False, False])[0]
        if needs_shift:
            dshift = dout.sum(1)
        if needs_scale:
            dscale = (dout * ((x - mean) * rstd)).sum(1)
        return dx, dshift, dscale, None


def _layernorm_modulate_torch(x, shift, scale, eps):
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, shift, scale)):
        return _LayerNormModulateTorch.apply(x, shift, scale, eps)
    return reference_layernorm_modulate(x, shift, scale, eps)

# ============================================================================ public functions

def _check_adaln_rows(x, name_rows: str, rows, device) -> None:
    B, C = x.shape[0], x.shape[-1]
    for name, t in zip(name_rows.split(","), rows):
        V.check_tensor(name, t, 2, "[B, C]", device=device)
        V.check_shape(name, t, (B, C), "[B, C]")


# ============================================================================ public functions

def layernorm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                       eps: float = 1e-6, *, backend: str = "auto") -> torch.Tensor:
    """adaLN modulation of DiT/MDT/EDT blocks, fused::

        LayerNorm(x) * (1 + scale[:, None]) + shift[:, None]

    Args:
        x: ``[B, L, C]`` float16/bfloat16/float32 (float64: torch backend).
        shift, scale: ``[B, C]`` per-sample rows (any float dtype; the result
            follows type promotion).
        eps: LayerNorm epsilon (no affine parameters; statistics in float32).
        backend: ``"auto"``, ``"triton"``, ``"torch"`` or ``"eager"`` (see :func:`register_op`).

    Returns ``[B, L, C]``; differentiable in x, shift and scale.
    """
    V.check_tensor("x", x, 3, "[B, L, C]")
    if x.shape[-1] < 1:
        raise ValueError(f"x must have at least one channel, got shape {list(x.shape)}")
    _check_adaln_rows(x, "shift,scale", (shift, scale), x.device)
    eps = V.check_eps(eps)
    return dispatch("layernorm_modulate", backend, OpCall((x, shift, scale, eps), x=x, shift=shift, scale=scale))

# ============================================================================ backends

register_op("layernorm_modulate", lambda c: _layernorm_modulate_op(*c.args),
            lambda c: reference_layernorm_modulate(*c.args), torch_fn=lambda c: _layernorm_modulate_torch(*c.args))
