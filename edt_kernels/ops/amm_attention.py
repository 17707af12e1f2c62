"""Fused AMM attention in Triton: forward, backward, custom op, backend.

    out = (softmax(q k^T * scale + T[idx(p_i, p_j), h] + bias) ⊙ M(p_i, p_j) ⊙ W) v

Layout of this file (STYLE.md): ``@triton.jit`` kernels, launchers that
allocate and pick block sizes, the ``torch.library`` custom op (through
``_attention_op.register_attention_op``) and the ``"triton"`` backend that
``edt_kernels.amm_attention`` dispatches to.

Design notes
- Flash-style: one program per (query block, batch, head), online softmax
  over key blocks; the forward saves only the log-sum-exp ``[B, H, N]``.
- The relative-position bias and EDT's AMM depend on a pair of tokens only
  through their grid offset, so both are read from small per-offset tables
  with the integer index ``u_i - u_j + const``, ``u = row * (2 cols - 1) + col``
  (``edt_kernels.amm``): no ``N x N`` tensor exists, with or without
  ``positions`` (masked token subsets).
- AMM is post-softmax without renormalisation: the running max and the
  denominator come from the unmodulated scores; the numerator accumulates
  ``exp(s - m) * M``.  The backward uses ``Delta_i = dO_i . O_i``, which stays
  exact with the modulation because ``O`` already contains it.
- Scores are kept in the log2 domain (scale folded with log2 e) so ``exp2`` is used.
- Head dims that are not powers of two are handled by masked loads of a
  padded ``BLOCK_D`` tile; inputs are read through their strides, never copied.
- The grid is 1-D (``B * H * cdiv(N, BLOCK_M)`` programs), so batch * heads
  beyond 65535 is fine; offsets into q/k/v use int64.
"""
from __future__ import annotations

import os
from typing import List, Optional

import torch

from .._triton_support import triton_unavailable_reason

if triton_unavailable_reason():  # caught by attention._load_optional_backends: no "triton" backend
    raise ImportError(triton_unavailable_reason())
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from ..attention import AttentionBackend, AttentionInputs, register_backend
from ._attention_op import _empty_like_out, register_attention_op

__all__ = ["amm_attention_forward", "amm_attention_backward", "TritonBackend"]

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ============================================================================ kernels

@triton.jit
def _load_tile(base_ptr, offs_n, offs_d, stride_n, stride_d, mask):
    """A [rows, BLOCK_D] tile of one (batch, head) slice; padded lanes read 0."""
    return tl.load(base_ptr + offs_n[:, None] * stride_n + offs_d[None, :] * stride_d, mask=mask, other=0.0)


@triton.jit
def _aligned(stride_b, stride_h, stride_n, ALIGN: tl.constexpr):
    """Alignment hints (checked on the host): the strides are multiples of ALIGN
    elements, so rows of a tile load as ALIGN-wide vectors."""
    if ALIGN > 1:
        # (s // A) * A is s itself (host-checked) and carries the divisibility
        # to the compiler's alignment analysis, which hints on arguments do not.
        stride_b = (stride_b // ALIGN) * ALIGN
        stride_h = (stride_h // ALIGN) * ALIGN
        stride_n = (stride_n // ALIGN) * ALIGN
    return stride_b, stride_h, stride_n


@triton.jit
def _tile_scores(q, k, table_ptr, bias_ptr, b, h, u_m, offs_m, offs_n, pos_n_ptr,
                 stride_pb, stride_pn, stride_tr, stride_th, n_table,
                 stride_bb, stride_bh, stride_bm, stride_bn,
                 m_valid, n_valid, qk_scale, COLS,
                 HAS_GRID: tl.constexpr, HAS_POS: tl.constexpr, HAS_TABLE: tl.constexpr,
                 HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Scores of one tile in the log2 domain and the grid-offset index."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    pair_valid = m_valid[:, None] & n_valid[None, :]
    idx = tl.zeros_like(s).to(tl.int32)
    if HAS_GRID:
        if HAS_POS:
            pos_n = tl.load(pos_n_ptr + b * stride_pb + offs_n * stride_pn, mask=n_valid, other=0).to(tl.int32)
        else:
            pos_n = tl.where(n_valid, offs_n, 0)
        u_n = (pos_n // COLS) * (2 * COLS - 1) + pos_n % COLS
        # Validated positions (and padded lanes, read as position 0) give an
        # offset in [0, n_table): the per-offset tables are read without masks.
        idx = u_m[:, None] - u_n[None, :]
    if HAS_TABLE:
        # Head-major [H, n_table] float32, prescaled by log2(e) on the host.
        tb = tl.load(table_ptr + idx * stride_tr + h * stride_th)
        s += tb
    if HAS_BIAS:
        bb = tl.load(bias_ptr + b * stride_bb + h * stride_bh + offs_m[:, None] * stride_bm
                     + offs_n[None, :] * stride_bn, mask=pair_valid, other=0.0)
        s += bb.to(tl.float32) * 1.4426950408889634
    s = tl.where(n_valid[None, :], s, float("-inf"))
    return s, idx, pair_valid


@triton.jit
def _tile_weights(amm_ptr, mod_ptr, b, h, idx, offs_m, offs_n, pair_valid,
                  stride_mb, stride_mh, stride_mm, stride_mn,
                  HAS_AMM: tl.constexpr, HAS_MOD: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """Post-softmax multiplier of one tile (AMM ⊙ modulation); 1 where absent."""
    w = tl.full((BLOCK_M, BLOCK_N), 1.0, tl.float32)
    if HAS_AMM:
        w = tl.load(amm_ptr + idx)
    if HAS_MOD:
        mv = tl.load(mod_ptr + b * stride_mb + h * stride_mh + offs_m[:, None] * stride_mm
                     + offs_n[None, :] * stride_mn, mask=pair_valid, other=0.0)
        w = w * mv.to(tl.float32)
    return w


@triton.jit
def _row_index(pos_ptr, b, offs_m, m_valid, stride_pb, stride_pn, COLS, IDX_OFF,
               HAS_POS: tl.constexpr):
    if HAS_POS:
        pos_m = tl.load(pos_ptr + b * stride_pb + offs_m * stride_pn, mask=m_valid, other=0).to(tl.int32)
    else:
        pos_m = tl.where(m_valid, offs_m, 0)
    return (pos_m // COLS) * (2 * COLS - 1) + pos_m % COLS + IDX_OFF


@triton.jit
def _amm_attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
    table_ptr, pos_ptr, amm_ptr, bias_ptr, mod_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_tr, stride_th, stride_pb, stride_pn,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    H, N, N_BUCKET, n_table, qk_scale, COLS, IDX_OFF,
    HAS_GRID: tl.constexpr, HAS_POS: tl.constexpr, HAS_TABLE: tl.constexpr,
    HAS_AMM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MOD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr, ALIGN: tl.constexpr,
):
    tl.static_assert(BLOCK_D >= 16)
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16)
    num_m_blocks = tl.cdiv(N, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % num_m_blocks
    bh = pid // num_m_blocks
    b = (bh // H).to(tl.int64)
    h = bh % H
    stride_qb, stride_qh, stride_qn = _aligned(stride_qb, stride_qh, stride_qn, ALIGN)
    stride_kb, stride_kh, stride_kn = _aligned(stride_kb, stride_kh, stride_kn, ALIGN)
    stride_vb, stride_vh, stride_vn = _aligned(stride_vb, stride_vh, stride_vn, ALIGN)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < N
    d_valid = offs_d < HEAD_DIM

    q = _load_tile(q_ptr + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_qn, stride_qd,
                   m_valid[:, None] & d_valid[None, :])
    u_m = offs_m
    if HAS_GRID:
        u_m = _row_index(pos_ptr, b, offs_m, m_valid, stride_pb, stride_pn, COLS, IDX_OFF, HAS_POS)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < N
        kv_mask = n_valid[:, None] & d_valid[None, :]
        k = _load_tile(k_base, offs_n, offs_d, stride_kn, stride_kd, kv_mask)
        v = _load_tile(v_base, offs_n, offs_d, stride_vn, stride_vd, kv_mask)
        s, idx, pair_valid = _tile_scores(
            q, k, table_ptr, bias_ptr, b, h, u_m, offs_m, offs_n, pos_ptr,
            stride_pb, stride_pn, stride_tr, stride_th, n_table,
            stride_bb, stride_bh, stride_bm, stride_bn, m_valid, n_valid, qk_scale, COLS,
            HAS_GRID, HAS_POS, HAS_TABLE, HAS_BIAS, DOT_PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Rows whose scores are all -inf so far (a -inf dense bias) must not produce inf - inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_AMM or HAS_MOD:
            p = p * _tile_weights(amm_ptr, mod_ptr, b, h, idx, offs_m, offs_n, pair_valid,
                                  stride_mb, stride_mh, stride_mm, stride_mn,
                                  HAS_AMM, HAS_MOD, BLOCK_M, BLOCK_N)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
    tl.store(o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od,
             out.to(o_ptr.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])
    tl.store(lse_ptr + bh.to(tl.int64) * N + offs_m, lse, mask=m_valid)


@triton.jit
def _amm_attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    table_ptr, pos_ptr, amm_ptr, bias_ptr, mod_ptr, dtable_ptr, dbias_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_tr, stride_th, stride_pb, stride_pn,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_dtr, stride_dth,
    stride_dbb, stride_dbh, stride_dbm, stride_dbn,
    H, N, n_table, qk_scale, sm_scale, COLS, IDX_OFF,
    HAS_GRID: tl.constexpr, HAS_POS: tl.constexpr, HAS_TABLE: tl.constexpr,
    HAS_AMM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MOD: tl.constexpr,
    NEED_DTABLE: tl.constexpr, NEED_DBIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr, ALIGN: tl.constexpr,
):
    """dK, dV for one key block (loop over query blocks); also scatters dS into
    the table gradient and the dense-bias gradient, each pair visited once."""
    num_n_blocks = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    pid_n = pid % num_n_blocks
    bh = pid // num_n_blocks
    b = (bh // H).to(tl.int64)
    h = bh % H
    stride_qb, stride_qh, stride_qn = _aligned(stride_qb, stride_qh, stride_qn, ALIGN)
    stride_kb, stride_kh, stride_kn = _aligned(stride_kb, stride_kh, stride_kn, ALIGN)
    stride_vb, stride_vh, stride_vn = _aligned(stride_vb, stride_vh, stride_vn, ALIGN)
    stride_dob, stride_doh, stride_don = _aligned(stride_dob, stride_doh, stride_don, ALIGN)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_valid = offs_n < N
    d_valid = offs_d < HEAD_DIM
    kv_mask = n_valid[:, None] & d_valid[None, :]
    k = _load_tile(k_ptr + b * stride_kb + h * stride_kh, offs_n, offs_d, stride_kn, stride_kd, kv_mask)
    v = _load_tile(v_ptr + b * stride_vb + h * stride_vh, offs_n, offs_d, stride_vn, stride_vd, kv_mask)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    row_base = bh.to(tl.int64) * N
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_valid = offs_m < N
        qm_mask = m_valid[:, None] & d_valid[None, :]
        q = _load_tile(q_ptr + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_qn, stride_qd, qm_mask)
        do = _load_tile(do_ptr + b * stride_dob + h * stride_doh, offs_m, offs_d, stride_don, stride_dod, qm_mask)
        lse2 = tl.load(lse_ptr + row_base + offs_m, mask=m_valid, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_ptr + row_base + offs_m, mask=m_valid, other=0.0)
        u_m = offs_m
        if HAS_GRID:
            u_m = _row_index(pos_ptr, b, offs_m, m_valid, stride_pb, stride_pn, COLS, IDX_OFF, HAS_POS)
        s, idx, pair_valid = _tile_scores(
            q, k, table_ptr, bias_ptr, b, h, u_m, offs_m, offs_n, pos_ptr,
            stride_pb, stride_pn, stride_tr, stride_th, n_table,
            stride_bb, stride_bh, stride_bm, stride_bn, m_valid, n_valid, qk_scale, COLS,
            HAS_GRID, HAS_POS, HAS_TABLE, HAS_BIAS, DOT_PRECISION)
        p = tl.math.exp2(s - lse2[:, None])
        p = tl.where(m_valid[:, None], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if HAS_AMM or HAS_MOD:
            w = _tile_weights(amm_ptr, mod_ptr, b, h, idx, offs_m, offs_n, pair_valid,
                              stride_mb, stride_mh, stride_mm, stride_mn,
                              HAS_AMM, HAS_MOD, BLOCK_M, BLOCK_N)
            pw = p * w
            dp = dp * w
        else:
            pw = p
        dv += tl.dot(tl.trans(pw.to(do.dtype)), do, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])  # gradient w.r.t. the natural-log scores
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
        if NEED_DTABLE:
            tl.atomic_add(dtable_ptr + idx * stride_dtr + h * stride_dth, ds, mask=pair_valid)
        if NEED_DBIAS:
            tl.atomic_add(dbias_ptr + b * stride_dbb + h * stride_dbh + offs_m[:, None] * stride_dbm
                          + offs_n[None, :] * stride_dbn, ds,
                          mask=m_valid[:, None] & n_valid[None, :])
    dk = dk * sm_scale
    tl.store(dk_ptr + bh.to(tl.int64) * N * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :],
             dk.to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + bh.to(tl.int64) * N * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :],
             dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _amm_attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    table_ptr, pos_ptr, amm_ptr, bias_ptr, mod_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_tr, stride_th, stride_pb, stride_pn,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    H, N, n_table, qk_scale, sm_scale, COLS, IDX_OFF,
    HAS_GRID: tl.constexpr, HAS_POS: tl.constexpr, HAS_TABLE: tl.constexpr,
    HAS_AMM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MOD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr, ALIGN: tl.constexpr,
):
    """dQ for one query block (loop over key blocks)."""
    num_m_blocks = tl.cdiv(N, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % num_m_blocks
    bh = pid // num_m_blocks
    b = (bh // H).to(tl.int64)
    h = bh % H
    stride_qb, stride_qh, stride_qn = _aligned(stride_qb, stride_qh, stride_qn, ALIGN)
    stride_kb, stride_kh, stride_kn = _aligned(stride_kb, stride_kh, stride_kn, ALIGN)
    stride_vb, stride_vh, stride_vn = _aligned(stride_vb, stride_vh, stride_vn, ALIGN)
    stride_dob, stride_doh, stride_don = _aligned(stride_dob, stride_doh, stride_don, ALIGN)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < N
    d_valid = offs_d < HEAD_DIM
    qm_mask = m_valid[:, None] & d_valid[None, :]
    q = _load_tile(q_ptr + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_qn, stride_qd, qm_mask)
    do = _load_tile(do_ptr + b * stride_dob + h * stride_doh, offs_m, offs_d, stride_don, stride_dod, qm_mask)
    row_base = bh.to(tl.int64) * N
    lse2 = tl.load(lse_ptr + row_base + offs_m, mask=m_valid, other=0.0) * 1.4426950408889634
    delta = tl.load(delta_ptr + row_base + offs_m, mask=m_valid, other=0.0)
    u_m = offs_m
    if HAS_GRID:
        u_m = _row_index(pos_ptr, b, offs_m, m_valid, stride_pb, stride_pn, COLS, IDX_OFF, HAS_POS)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < N
        kv_mask = n_valid[:, None] & d_valid[None, :]
        k = _load_tile(k_base, offs_n, offs_d, stride_kn, stride_kd, kv_mask)
        v = _load_tile(v_base, offs_n, offs_d, stride_vn, stride_vd, kv_mask)
        s, idx, pair_valid = _tile_scores(
            q, k, table_ptr, bias_ptr, b, h, u_m, offs_m, offs_n, pos_ptr,
            stride_pb, stride_pn, stride_tr, stride_th, n_table,
            stride_bb, stride_bh, stride_bm, stride_bn, m_valid, n_valid, qk_scale, COLS,
            HAS_GRID, HAS_POS, HAS_TABLE, HAS_BIAS, DOT_PRECISION)
        p = tl.math.exp2(s - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if HAS_AMM or HAS_MOD:
            dp = dp * _tile_weights(amm_ptr, mod_ptr, b, h, idx, offs_m, offs_n, pair_valid,
                                    stride_mb, stride_mh, stride_mm, stride_mn,
                                    HAS_AMM, HAS_MOD, BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    dq = dq * sm_scale
    tl.store(dq_ptr + row_base * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
             dq.to(dq_ptr.dtype.element_ty), mask=qm_mask)


@triton.jit
def _amm_attn_bwd_delta_kernel(o_ptr, do_ptr, delta_ptr, H, N,
                               stride_ob, stride_oh, stride_on, stride_od,
                               stride_dob, stride_doh, stride_don, stride_dod,
                               BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
                               ALIGN: tl.constexpr):
    """Backward preprocess: Delta_i = dO_i . O_i in float32, [B, H, N]."""
    num_m_blocks = tl.cdiv(N, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % num_m_blocks
    bh = pid // num_m_blocks
    b = (bh // H).to(tl.int64)
    h = bh % H
    stride_ob, stride_oh, stride_on = _aligned(stride_ob, stride_oh, stride_on, ALIGN)
    stride_dob, stride_doh, stride_don = _aligned(stride_dob, stride_doh, stride_don, ALIGN)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < N
    mask = m_valid[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = _load_tile(o_ptr + b * stride_ob + h * stride_oh, offs_m, offs_d, stride_on, stride_od, mask)
    do = _load_tile(do_ptr + b * stride_dob + h * stride_doh, offs_m, offs_d, stride_don, stride_dod, mask)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_ptr + bh.to(tl.int64) * N + offs_m, delta, mask=m_valid)


# ============================================================================ launchers

def _fwd_configs():
    # Forward tiles for Hopper/Ampere, each free of register spills at D <= 128
    # in the sm_90 profile (benchmarks/sm90_profile.py); the backward kernels use
    # fixed tiles (their atomics make autotuning re-runs unsafe without resets).
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
            for bm, bn, w, st in [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 3), (64, 32, 4, 2)]]


def _fwd_config_fits(cfg, block_d: int) -> bool:
    """The float32 accumulator and score tiles per thread stay <= 80 registers
    (above that the forward spills on sm_90 with table + AMM, see the profile)."""
    bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
    return (bm * block_d + bm * bn) <= 80 * 32 * cfg.num_warps


def _prune_fwd_configs(configs, named_args, **kwargs):
    fits = [c for c in configs if _fwd_config_fits(c, kwargs["BLOCK_D"])]
    return fits or configs[-1:]


_FWD_KEY = ["N_BUCKET", "BLOCK_D", "HEAD_DIM", "ALIGN", "HAS_GRID", "HAS_POS", "HAS_TABLE", "HAS_AMM",
            "HAS_BIAS", "HAS_MOD", "DOT_PRECISION"]
# Under the interpreter there is nothing to tune: the plain kernel with the
# tiles of _block_sizes is launched.  On a GPU the autotuner is keyed on a
# power-of-two bucket of N (MDT's kept-token count changes every step).
_fwd_kernel = (_amm_attn_fwd_kernel if _interpreting() else
               triton.autotune(configs=_fwd_configs(), key=_FWD_KEY,
                               prune_configs_by={"early_config_prune": _prune_fwd_configs})(_amm_attn_fwd_kernel))
_fwd_choice: dict = {}  # autotuned config per key, reused under CUDA-graph capture


def _on_gpu(t: torch.Tensor) -> bool:
    """GPU tiles/configs (the sm_90 profile compiles them for CPU tensors)."""
    return t.device.type == "cuda"


def _capturing(t: torch.Tensor) -> bool:
    return t.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _block_sizes(N: int, D: int, q: torch.Tensor):
    block_d = max(16, triton.next_power_of_2(D))
    if not _on_gpu(q):  # interpreter: large tiles mean fewer Python-level steps
        bm = 64 if N > 32 else 32
        return bm, bm, block_d, 4, 1
    # Hopper/Ampere heuristic (the first autotune config that fits), used under CUDA-graph capture.
    cfg = _prune_fwd_configs(_fwd_configs(), {}, BLOCK_D=block_d)[0]
    return cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], block_d, cfg.num_warps, cfg.num_stages


def _alignment(*ts: torch.Tensor) -> int:
    """The widest vector (elements, <= 16 bytes) that every row of every tensor
    starts on: pointer and the batch/head/token strides are multiples of it and
    the head dim is contiguous.  1 disables the hints."""
    elt = ts[0].element_size()
    a = max(1, 16 // elt)
    for t in ts:
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            return 1
        vals = [t.data_ptr() // elt if t.data_ptr() % elt == 0 else 1, t.shape[-1]]
        vals += [st for st, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1]
        for v in vals:
            while a > 1 and v % a:
                a //= 2
    return a


# Backward tiles (BLOCK_M, BLOCK_N, num_warps, num_stages), preferred first, per
# padded head dim (<= 64, <= 128, larger).  A tile whose shared memory does not
# fit the device fails with OutOfResources before anything runs (so the atomics
# never double-count) and the next one is tried; the first that fits is
# remembered per kernel specialisation.  Registers, spills and shared memory of
# each on sm_90: benchmarks/sm90_profile.py.
_BWD_DKDV_TILES_BY_D = {
    64: [(64, 64, 8, 2), (32, 64, 4, 1), (32, 32, 4, 1), (16, 32, 4, 1)],
    128: [(32, 64, 8, 1), (32, 32, 4, 1), (16, 32, 4, 1)],
    256: [(32, 32, 8, 1), (16, 32, 4, 1)],
}
_BWD_DQ_TILES_BY_D = {
    64: [(128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 1), (32, 32, 4, 1)],
    128: [(64, 64, 8, 2), (64, 32, 4, 1), (32, 32, 4, 1), (16, 32, 4, 1)],
    256: [(32, 32, 8, 1), (16, 32, 4, 1)],
}
_BWD_DKDV_TILES = _BWD_DKDV_TILES_BY_D[64]  # the D <= 64 lists under their former names
_BWD_DQ_TILES = _BWD_DQ_TILES_BY_D[64]
_tile_choice: dict = {}


# With positions the dK/dV kernel also holds the gathered key positions: at
# D <= 64 its 64-row tile spills 8 bytes on sm_90, the 32-row one does not.
_BWD_DKDV_POS_FIRST = (32, 64, 8, 1)


def _bwd_tiles(by_d: dict, block_d: int, has_pos: bool = False):
    tiles = by_d[min(k for k in by_d if k >= block_d)]
    if has_pos and by_d is _BWD_DKDV_TILES_BY_D and block_d <= 64:
        return [_BWD_DKDV_POS_FIRST] + [t for t in tiles if t != _BWD_DKDV_POS_FIRST]
    return tiles


def _launch_tiled(kernel, tiles, cpu_tiles, grid_of, args, kwargs, q):
    if not _on_gpu(q):
        tiles = [cpu_tiles]
    key = (kernel.fn.__name__ if hasattr(kernel, "fn") else id(kernel), q.device, q.dtype,
           tuple(sorted(kwargs.items())))
    last_error = None
    for i in range(_tile_choice.get(key, 0), len(tiles)):
        bm, bn, warps, stages = tiles[i]
        try:
            kernel[(grid_of(bm, bn),)](*args, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps,
                                       num_stages=stages, **kwargs)
        except triton.runtime.errors.OutOfResources as exc:
            last_error = exc
            continue
        _tile_choice[key] = i
        return
    raise RuntimeError(f"no backward tile of {tiles} fits this device: {last_error}")


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs get full-precision dots (exact results are the contract);
    # tf32 can be requested with EDT_KERNELS_ALLOW_TF32=1.
    if dtype == torch.float32 and os.environ.get("EDT_KERNELS_ALLOW_TF32", "0") != "1":
        return "ieee"
    return "tf32"


def _strides4(t: Optional[torch.Tensor], shape=None):
    if t is None:
        return (0, 0, 0, 0)
    st = list(t.stride())
    # Broadcast (size-1) dims are read with stride 0.
    return tuple(0 if t.shape[i] == 1 else st[i] for i in range(4))


def _head_major_table(table: Optional[torch.Tensor], n_table: int) -> Optional[torch.Tensor]:
    """[rows_t, H] table -> [H, n_table] float32 prescaled by log2(e): one
    contiguous gather per score, in the kernel's log2 domain."""
    if table is None:
        return None
    return (table[:n_table].t().to(torch.float32) * _LOG2E).contiguous()


def _grid_args(table, positions, amm_table, rows, cols):
    has_grid = table is not None or amm_table is not None
    n_table = (2 * rows - 1) * (2 * cols - 1)
    idx_off = (rows - 1) * (2 * cols - 1) + (cols - 1)
    if positions is not None and positions.dim() == 1:
        pstr = (0, positions.stride(0))
    elif positions is not None:
        pstr = (positions.stride(0), positions.stride(1))
    else:
        pstr = (0, 0)
    packed = _head_major_table(table, n_table)
    tstr = (1, n_table) if table is not None else (0, 0)
    if amm_table is not None:
        amm_table = amm_table.to(torch.float32).contiguous()
    return has_grid, n_table, idx_off, pstr, tstr, packed, amm_table


def _dummy(t: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return t if t is not None else like


def amm_attention_forward(q, k, v, table, positions, amm_table, bias, modulation, scale, rows, cols,
                          out=None, lse=None):
    """Launch the forward kernel; returns ``(out, lse)`` (natural-log LSE, float32).
    ``out``/``lse`` may be given preallocated (tests poison them)."""
    B, H, N, D = q.shape
    out = _empty_like_out(q) if out is None else out
    lse = torch.empty((B, H, N), device=q.device, dtype=torch.float32) if lse is None else lse
    if B * H * N == 0:
        return out, lse
    BLOCK_M, BLOCK_N, BLOCK_D, warps, stages = _block_sizes(N, D, q)
    has_grid, n_table, idx_off, pstr, tstr, table, amm_table = _grid_args(table, positions, amm_table, rows, cols)
    flags = dict(HAS_GRID=has_grid, HAS_POS=positions is not None, HAS_TABLE=table is not None,
                 HAS_AMM=amm_table is not None, HAS_BIAS=bias is not None, HAS_MOD=modulation is not None,
                 DOT_PRECISION=_dot_precision(q.dtype), BLOCK_D=BLOCK_D, HEAD_DIM=D,
                 ALIGN=_alignment(q, k, v))
    n_bucket = triton.next_power_of_2(N)
    key = (n_bucket, q.dtype, q.device, tuple(sorted(flags.items())))
    tiles = dict(BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=warps, num_stages=stages)
    autotuned = isinstance(_fwd_kernel, triton.runtime.Autotuner)
    if autotuned and not _capturing(q):
        tiles = {}
        launch = _fwd_kernel[lambda meta: (B * H * triton.cdiv(N, meta["BLOCK_M"]),)]
    else:
        # No autotuning under CUDA-graph capture: the config tuned earlier for
        # this key, else the heuristic tiles.
        cfg = _fwd_choice.get(key)
        if cfg is not None:
            tiles = dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        plain = _amm_attn_fwd_kernel if autotuned else _fwd_kernel
        launch = plain[(B * H * triton.cdiv(N, tiles["BLOCK_M"]),)]
    launch(
        q, k, v, out, lse,
        _dummy(table, q), _dummy(positions, q), _dummy(amm_table, q), _dummy(bias, q), _dummy(modulation, q),
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        *tstr, *pstr, *_strides4(bias), *_strides4(modulation),
        H, N, n_bucket, n_table, scale * _LOG2E, cols, idx_off, **flags, **tiles,
    )
    if autotuned and not tiles and getattr(_fwd_kernel, "best_config", None) is not None:
        _fwd_choice[key] = _fwd_kernel.best_config
    return out, lse


def amm_attention_backward(dout, q, k, v, out, lse, table, positions, amm_table, bias, modulation,
                           scale, rows, cols, need_dtable, need_dbias, grads=None):
    """Launch the backward kernels; returns ``(dq, dk, dv, dtable, dbias)``.
    ``grads`` may give preallocated contiguous ``(dq, dk, dv)`` (tests poison them)."""
    B, H, N, D = q.shape
    if grads is None:
        grads = [torch.empty((B, H, N, D), device=q.device, dtype=q.dtype) for _ in range(3)]
    dq, dk, dv = grads
    dtable = (torch.zeros(table.shape, device=q.device, dtype=torch.float32) if need_dtable
              else q.new_empty((0,), dtype=torch.float32))
    dbias = (torch.zeros(bias.shape, device=q.device, dtype=torch.float32) if need_dbias
             else q.new_empty((0,), dtype=torch.float32))
    if B * H * N == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), dtable, dbias
    BLOCK_M, BLOCK_N, BLOCK_D, warps, stages = _block_sizes(N, D, q)
    align = _alignment(q, k, v, dout)
    # Delta_i = dO_i . O_i (O includes the modulation, see module docstring), in a
    # Triton preprocess kernel.
    delta = torch.empty((B, H, N), device=q.device, dtype=torch.float32)
    dm = 64 if _on_gpu(q) else BLOCK_M
    _amm_attn_bwd_delta_kernel[(B * H * triton.cdiv(N, dm),)](
        out, dout, delta, H, N, *out.stride(), *dout.stride(), BLOCK_M=dm, BLOCK_D=BLOCK_D, HEAD_DIM=D,
        ALIGN=_alignment(out, dout), num_warps=4)
    lse = lse.contiguous()
    has_grid, n_table, idx_off, pstr, tstr, table_hm, amm_table = _grid_args(table, positions, amm_table,
                                                                              rows, cols)
    flags = dict(HAS_GRID=has_grid, HAS_POS=positions is not None, HAS_TABLE=table is not None,
                 HAS_AMM=amm_table is not None, HAS_BIAS=bias is not None,
                 HAS_MOD=modulation is not None, DOT_PRECISION=_dot_precision(q.dtype), BLOCK_D=BLOCK_D,
                 HEAD_DIM=D, ALIGN=align)
    ptrs = (_dummy(table_hm, q), _dummy(positions, q), _dummy(amm_table, q), _dummy(bias, q),
            _dummy(modulation, q))
    strides = (*q.stride(), *k.stride(), *v.stride(), *dout.stride(), *tstr, *pstr,
               *_strides4(bias), *_strides4(modulation))
    dtstr = (dtable.stride(0), dtable.stride(1)) if need_dtable else (0, 0)
    cpu_tiles = (BLOCK_M, BLOCK_N, warps, stages)
    _launch_tiled(
        _amm_attn_bwd_dkdv_kernel, _bwd_tiles(_BWD_DKDV_TILES_BY_D, BLOCK_D, positions is not None), cpu_tiles,
        lambda bm, bn: B * H * triton.cdiv(N, bn),
        (q, k, v, dout, lse, delta, dk, dv, *ptrs, _dummy(dtable if need_dtable else None, lse),
         _dummy(dbias if need_dbias else None, lse), *strides, *dtstr,
         *(_strides4(dbias) if need_dbias else (0, 0, 0, 0)),
         H, N, n_table, scale * _LOG2E, scale, cols, idx_off),
        dict(NEED_DTABLE=need_dtable, NEED_DBIAS=need_dbias, **flags), q)
    _launch_tiled(
        _amm_attn_bwd_dq_kernel, _bwd_tiles(_BWD_DQ_TILES_BY_D, BLOCK_D), cpu_tiles,
        lambda bm, bn: B * H * triton.cdiv(N, bm),
        (q, k, v, dout, lse, delta, dq, *ptrs, *strides,
         H, N, n_table, scale * _LOG2E, scale, cols, idx_off),
        flags, q)
    return dq, dk, dv, dtable, dbias



# ============================================================================ op + backend

_apply = register_attention_op("amm_attention_triton", amm_attention_forward, amm_attention_backward)


class TritonBackend(AttentionBackend):
    """Fused Triton kernels: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1."""

    name = "triton"
    dtypes = (torch.float16, torch.bfloat16, torch.float32)

    def not_supported_reasons(self, inp: AttentionInputs) -> List[str]:
        why = []
        if inp.device.type == "cpu" and not _interpreting():
            why.append("CPU tensors need Triton's interpreter (set TRITON_INTERPRET=1 before importing triton)")
        elif inp.device.type not in ("cuda", "cpu"):
            why.append(f"device {inp.device.type!r} is not supported (CUDA only)")
        if inp.dtype not in self.dtypes:
            why.append(f"dtype {inp.dtype} is not supported by the triton backend (float16, bfloat16, "
                       "float32; use backend='torch' or 'cpp' for float64)")
        return why

    def auto_reasons(self, inp: AttentionInputs) -> List[str]:
        if inp.device.type != "cuda":
            return ["'auto' uses triton for CUDA tensors only (ask backend='triton' explicitly)"]
        return self.not_supported_reasons(inp)

    def apply(self, inp: AttentionInputs) -> torch.Tensor:
        return _apply(*inp.kernel_args())


register_backend(TritonBackend(), auto_rank=0)
