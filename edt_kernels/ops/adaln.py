"""adaLN kernels of a DiT block: ``layernorm_modulate`` and ``gated_residual``.

    layernorm_modulate(x, shift, scale) = LayerNorm(x) * (1 + scale[:, None]) + shift[:, None]
    gated_residual(x, gate, y)           = x + gate[:, None] * y

(no-affine LayerNorm, eps 1e-6, fp32 statistics; ``x, y`` ``[B, L, C]``,
``shift, scale, gate`` ``[B, C]``; definitions in
``edt_kernels.reference.adaln``).  They run twice per block and are memory
bound, so each is one pass over the rows forward and one backward.  The
shift/scale/gate gradients are sums over the tokens: each program accumulates
its rows in fp32 registers and writes one partial row; a small ``torch.sum``
over the ``[B, P, C]`` partials finishes (deterministic, no atomics).

The LayerNorm-modulate kernels also serve EDT's down-sampling front end
(``edt_kernels.ops.tokens.patch_merge_modulate``): with ``MERGE`` they read the
2x2 patch-merged row straight from the ``[B, H*W, C]`` input and write the
input gradient back to the same places.

Custom ops (namespace ``edt_kernels``; fake kernels, autograd)::

    layernorm_modulate(Tensor x, Tensor shift, Tensor scale, float eps) -> Tensor
    layernorm_modulate_backward(Tensor dout, Tensor x, Tensor scale, float eps)
        -> (Tensor dx, Tensor dshift, Tensor dscale)       # dshift/dscale float32 [B, C]
    gated_residual(Tensor x, Tensor gate, Tensor y) -> Tensor
    gated_residual_backward(Tensor dout, Tensor gate, Tensor y)
        -> (Tensor dy, Tensor dgate)                       # dgate float32 [B, C]

Outputs follow PyTorch type promotion of the inputs (e.g. float32 ``x`` with
bfloat16 ``shift`` gives float32).  This module also holds the helpers shared
with ``ops/tokens.py``: backend choice, validation, allocation.
"""
from __future__ import annotations

import os
from typing import List, Optional, Tuple

import torch

from ..reference.adaln import reference_gated_residual, reference_layernorm_modulate

from .._triton_support import triton_unavailable_reason

TRITON_UNAVAILABLE = triton_unavailable_reason()  # None, or why the Triton kernels cannot run here
try:
    if TRITON_UNAVAILABLE:
        raise ImportError(TRITON_UNAVAILABLE)
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # e.g. macOS, or a triton outside the supported range: only the torch backend is offered
    HAS_TRITON = False
    TRITON_UNAVAILABLE = TRITON_UNAVAILABLE or "triton is not installed"

    class _NoTriton:
        """Lets the kernel definitions below be parsed where Triton is absent."""

        constexpr = None

        @staticmethod
        def jit(fn):
            return fn

    triton = tl = _NoTriton()

__all__ = ["layernorm_modulate", "gated_residual"]

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BACKENDS = ("auto", "triton", "torch")


# ============================================================================ kernels

@triton.jit
def _ln_src_offsets(t, j, C_IN, W_OUT, stride_l, MERGE: tl.constexpr):
    """Offsets (within one batch) of the input elements of output rows ``t``,
    columns ``j``.  Without MERGE, row t column j.  With MERGE, output token t
    of the (H/2, W/2) grid gathers its 2x2 patch: column block q = j // C_IN is
    (row parity, col parity) = (q % 2, q // 2), i.e. the order
    (even, even), (odd, even), (even, odd), (odd, odd) of SPEC 4."""
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
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
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
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program: rows [pid * ROWS_PER_PROG, +ROWS_PER_PROG) of sample b.  The
    # statistics are recomputed from x (read anyway for xhat), so the forward
    # saves nothing.  dx is written with x's strides (the launcher makes x
    # contiguous and allocates dx like it).
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


@triton.jit
def _gated_residual_fwd_kernel(
    x_ptr, gate_ptr, y_ptr, out_ptr,
    L, C,
    stride_xb, stride_xl, stride_gb, stride_yb, stride_yl, stride_ob, stride_ol,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
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
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # dy = dout * gate (written with y's strides), dgate partial = sum_t dout * y.
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

def _empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Every launcher allocates its outputs here (the tests fill them with NaN
    to prove that the kernels write every element)."""
    return torch.empty(shape, dtype=dtype, device=device)


def interpreting() -> bool:
    """Whether Triton runs through its interpreter (CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


MAX_GRID_BATCH = 65535  # CUDA's limit on grid axes 1 and 2, where these kernels put the batch


def check_launchable(t: torch.Tensor) -> None:
    if not HAS_TRITON:
        raise RuntimeError(f"the Triton kernels cannot run: {TRITON_UNAVAILABLE}; use backend='torch'")
    if t.dim() and t.shape[0] > MAX_GRID_BATCH:
        raise ValueError(f"batch B = {t.shape[0]} exceeds {MAX_GRID_BATCH}, the CUDA grid limit of the "
                         "Triton token/adaLN kernels: split the batch or use backend='torch'")
    if t.device.type == "cuda" or (t.device.type == "cpu" and interpreting()):
        return
    raise RuntimeError(f"Triton kernels need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 "
                       f"set before triton is imported), got a tensor on {t.device}; "
                       f"use backend='torch'")


def unit_stride(t: torch.Tensor) -> torch.Tensor:
    """The kernels take batch/row strides but need a unit channel stride."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def promote(*tensors: torch.Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def row_config(n: int) -> Tuple[int, int, int]:
    """(BLOCK_N, BLOCK_T, num_warps) for kernels that hold whole rows of n channels."""
    block_n = triton.next_power_of_2(n)
    block_t = max(1, min(32, 4096 // block_n))
    num_warps = max(4, min(16, block_n * block_t // 512))
    return block_n, block_t, num_warps


def tile_config(c: int) -> Tuple[int, int, int]:
    """(BLOCK_C, BLOCK_T, num_warps) for elementwise/row-copy kernels tiled over channels."""
    block_c = min(triton.next_power_of_2(c), 512)
    block_t = max(1, min(64, 4096 // block_c))
    return block_c, block_t, 4


def rows_per_program(rows: int, other_programs: int, block_t: int, target: int = 1024) -> int:
    """Rows one reducing program walks through: enough programs (about
    ``target``) to fill a GPU, few enough partial rows to keep the reduction
    buffer small.  A multiple of ``block_t``."""
    chunks = max(1, min(triton.cdiv(rows, block_t), triton.cdiv(target, max(1, other_programs))))
    return triton.cdiv(triton.cdiv(rows, chunks), block_t) * block_t


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
    out = _empty((B, T, N), promote(x, shift, scale), x.device)
    if out.numel() == 0:
        return out
    if keep is not None:
        keep = unit_stride(keep)
    block_n, block_t, num_warps = row_config(N)
    grid = (triton.cdiv(T, block_t), B)
    _ln_modulate_fwd_kernel[grid](
        x, shift, scale, keep if keep is not None else x, out,
        T, N, C, w_out,
        x.stride(0), x.stride(1), shift.stride(0), scale.stride(0),
        keep.stride(0) if keep is not None else 0, out.stride(0), out.stride(1),
        float(eps),
        MERGE=bool(merge_width), HAS_KEEP=keep is not None,
        KEEP_SOURCE=keep is not None and bool(merge_width) and keep.shape[1] == L,
        BLOCK_T=block_t, BLOCK_N=block_n, num_warps=num_warps,
    )
    return out


def ln_modulate_backward(dout: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, eps: float,
                         keep: Optional[torch.Tensor] = None, merge_width: int = 0
                         ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`ln_modulate_forward`: ``(dx`` like x, ``dshift, dscale``
    float32 ``[B, N])``."""
    check_launchable(x)
    x = x.contiguous()
    dout, scale = unit_stride(dout), unit_stride(scale)
    B, L, C = x.shape
    T, N, w_out = (L // 4, 4 * C, merge_width // 2) if merge_width else (L, C, 1)
    dx = _empty(x.shape, x.dtype, x.device)
    if B == 0 or T == 0:
        zeros = torch.zeros((B, N), dtype=torch.float32, device=x.device)
        return dx, zeros, zeros.clone()
    if keep is not None:
        keep = unit_stride(keep)
    block_n, block_t, num_warps = row_config(N)
    rows = rows_per_program(T, B, block_t)
    P = triton.cdiv(T, rows)
    dshift_part = _empty((B, P, N), torch.float32, x.device)
    dscale_part = _empty((B, P, N), torch.float32, x.device)
    _ln_modulate_bwd_kernel[(P, B)](
        dout, x, scale, keep if keep is not None else x, dx, dshift_part, dscale_part,
        T, N, C, w_out, rows,
        dout.stride(0), dout.stride(1), x.stride(0), x.stride(1), scale.stride(0),
        keep.stride(0) if keep is not None else 0,
        dshift_part.stride(0), dshift_part.stride(1),
        float(eps),
        MERGE=bool(merge_width), HAS_KEEP=keep is not None,
        KEEP_SOURCE=keep is not None and bool(merge_width) and keep.shape[1] == L,
        BLOCK_T=block_t, BLOCK_N=block_n, num_warps=num_warps,
    )
    return dx, dshift_part.sum(1), dscale_part.sum(1)


def gated_residual_forward(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    check_launchable(x)
    x, gate, y = unit_stride(x), unit_stride(gate), unit_stride(y)
    B, L, C = x.shape
    out = _empty((B, L, C), promote(x, gate, y), x.device)
    if out.numel() == 0:
        return out
    block_c, block_t, num_warps = tile_config(C)
    grid = (triton.cdiv(L, block_t), triton.cdiv(C, block_c), B)
    _gated_residual_fwd_kernel[grid](
        x, gate, y, out, L, C,
        x.stride(0), x.stride(1), gate.stride(0), y.stride(0), y.stride(1),
        out.stride(0), out.stride(1),
        BLOCK_T=block_t, BLOCK_C=block_c, num_warps=num_warps,
    )
    return out


def gated_residual_backward(dout: torch.Tensor, gate: torch.Tensor, y: torch.Tensor
                            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(dy`` like y, ``dgate`` float32 ``[B, C])``; dx is dout itself."""
    check_launchable(y)
    y = y.contiguous()
    dout, gate = unit_stride(dout), unit_stride(gate)
    B, L, C = y.shape
    dy = _empty(y.shape, y.dtype, y.device)
    if B == 0 or L == 0 or C == 0:
        return dy, torch.zeros((B, C), dtype=torch.float32, device=y.device)
    block_c, block_t, num_warps = tile_config(C)
    n_c = triton.cdiv(C, block_c)
    rows = rows_per_program(L, B * n_c, block_t)
    P = triton.cdiv(L, rows)
    dgate_part = _empty((B, P, C), torch.float32, y.device)
    _gated_residual_bwd_kernel[(P, n_c, B)](
        dout, gate, y, dy, dgate_part, L, C, rows,
        dout.stride(0), dout.stride(1), gate.stride(0), y.stride(0), y.stride(1),
        dgate_part.stride(0), dgate_part.stride(1),
        BLOCK_T=block_t, BLOCK_C=block_c, num_warps=num_warps,
    )
    return dy, dgate_part.sum(1)


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
                               eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return ln_modulate_backward(dout, x, scale, eps)


@_layernorm_modulate_bwd_op.register_fake
def _(dout, x, scale, eps):
    B, C = x.shape[0], x.shape[-1]
    return (x.new_empty(x.shape), x.new_empty((B, C), dtype=torch.float32),
            x.new_empty((B, C), dtype=torch.float32))


def _ln_setup(ctx, inputs, output):
    x, shift, scale, eps = inputs
    ctx.save_for_backward(x, scale)
    ctx.eps = eps
    ctx.shift_dtype = shift.dtype


def _ln_backward(ctx, dout):
    x, scale = ctx.saved_tensors
    dx, dshift, dscale = _layernorm_modulate_bwd_op(dout, x, scale, ctx.eps)
    return dx, dshift.to(ctx.shift_dtype), dscale.to(scale.dtype), None


_layernorm_modulate_op.register_autograd(_ln_backward, setup_context=_ln_setup)


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


# ============================================================================ validation, dispatch

def check_tensor(name: str, t, ndim: int, dims: str, *, device=None, floating: bool = True) -> None:
    """``t`` is a tensor with ``ndim`` dims (described by ``dims``, e.g. ``"[B, L, C]"``),
    floating point when asked, on ``device`` when given."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {dims}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {dims}, got shape {list(t.shape)}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on the device of x ({device}), got {t.device}")


def check_shape(name: str, t: torch.Tensor, expected: Tuple[int, ...], dims: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must be {dims} = {list(expected)}, got {list(t.shape)}")


def check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    return float(eps)


def triton_unsupported(**tensors: Optional[torch.Tensor]) -> List[str]:
    """Why the Triton kernels cannot take these tensors (empty list: they can)."""
    why = []
    if not HAS_TRITON:
        why.append(TRITON_UNAVAILABLE)
    device = next(t.device for t in tensors.values() if t is not None)
    if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
        why.append(f"tensors are on {device} (needs CUDA, or CPU with TRITON_INTERPRET=1)")
    for name, t in tensors.items():
        if t is not None and t.is_floating_point() and t.dtype not in TRITON_DTYPES:
            why.append(f"{name} is {t.dtype} (Triton kernels take float16, bfloat16, float32)")
    return why


def use_triton(op: str, backend: str, **tensors: Optional[torch.Tensor]) -> bool:
    """Backend choice shared by the token and adaLN ops.  ``"auto"``: Triton on
    CUDA tensors (and on CPU tensors under ``TRITON_INTERPRET=1``) of a dtype it
    takes, else the PyTorch reference; the environment variable
    ``EDT_KERNELS_BACKEND=triton|torch`` overrides ``"auto"`` (other values,
    such as ``cpp``, are for ``amm_attention`` and leave these ops on auto).
    An explicit ``"triton"`` that cannot run raises ``ValueError`` with the reasons."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get("EDT_KERNELS_BACKEND", "auto")
        if env in ("triton", "torch"):
            backend = env
    if backend == "torch":
        return False
    why = triton_unsupported(**tensors)
    if backend == "triton" and why:
        raise ValueError(f"{op}: backend 'triton' cannot run these inputs: {'; '.join(why)}")
    return not why


def _check_adaln_rows(x, name_rows: str, rows, device) -> None:
    B, C = x.shape[0], x.shape[-1]
    for name, t in zip(name_rows.split(","), rows):
        check_tensor(name, t, 2, "[B, C]", device=device)
        check_shape(name, t, (B, C), "[B, C]")


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
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (see :func:`use_triton`).

    Returns ``[B, L, C]``; differentiable in x, shift and scale.
    """
    check_tensor("x", x, 3, "[B, L, C]")
    if x.shape[-1] < 1:
        raise ValueError(f"x must have at least one channel, got shape {list(x.shape)}")
    _check_adaln_rows(x, "shift,scale", (shift, scale), x.device)
    eps = check_eps(eps)
    if use_triton("layernorm_modulate", backend, x=x, shift=shift, scale=scale):
        return _layernorm_modulate_op(x, shift, scale, eps)
    return reference_layernorm_modulate(x, shift, scale, eps)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, *,
                   backend: str = "auto") -> torch.Tensor:
    """adaLN-Zero gated residual ``x + gate[:, None] * y``, fused.

    Args:
        x, y: ``[B, L, C]``; gate: ``[B, C]``.  Result dtype by type promotion.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.

    Returns ``[B, L, C]``; differentiable in x, gate and y.
    """
    check_tensor("x", x, 3, "[B, L, C]")
    check_tensor("y", y, 3, "[B, L, C]", device=x.device)
    check_shape("y", y, tuple(x.shape), "[B, L, C] like x")
    _check_adaln_rows(x, "gate", (gate,), x.device)
    if use_triton("gated_residual", backend, x=x, gate=gate, y=y):
        return _gated_residual_op(x, gate, y)
    return reference_gated_residual(x, gate, y)
