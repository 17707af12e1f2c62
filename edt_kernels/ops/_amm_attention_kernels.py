"""Triton kernels of the fused AMM attention (forward, dK/dV, dQ, Delta, and the
table gradient summed over the batch).

    out = (softmax(q k^T * scale + T[idx(p_i, p_j), h] + bias) ⊙ M(p_i, p_j) ⊙ W) v

The launchers, the custom op and the ``"triton"`` backend are in
``amm_attention.py``; see its docstring for the design.  Imported only after
``amm_attention.py`` has checked that Triton can be used here.

What the main loops do per score element, and why:
- One gather per score.  The bias table and the AMM depend on a pair only
  through its grid offset ``u_i - u_j`` (``u = row * (2 cols - 1) + col``,
  computed per token on the host), so they live in one head-major per-offset
  table ``[H, n_table]`` built by the launcher: the pair (table, AMM) as one
  64-bit word (two float32 halves) when both are present, else the plain
  float32 table or AMM.  Stored in reversed offset order, the gather address
  is ``row pointer + u_j``: one address computation and one 64-bit load per
  score.  The launcher's grid indices come from positions clamped to the
  grid, so every offset lies in ``[0, n_table)`` and the gather has no mask
  or range check.
- No separate multiply for the scale and add for the table: with a positive
  scale (``FOLD``) the table is stored divided by the scale and is the
  accumulator the ``q k^T`` dot starts from, and ``scale * log2(e)`` is
  applied in the FFMA that feeds ``exp2``.  Otherwise (scale <= 0 or extreme,
  and in the backward kernels, where the launcher does not fold) the scores
  are scaled after the dot and the table, stored times log2(e), is added.
- Full key (forward, dQ) or query (dK/dV) tiles run without bounds masks; the
  last partial tile, if any, is peeled and runs the masked body.
- A head dim just above a power of two (e.g. 72) is computed as two tiles, a
  ``BLOCK_D``-wide one and a ``BLOCK_D2``-wide tail (64 + 16 for 72), two
  dots per product, instead of one tile padded to the next power of two.
"""
from ._triton_utils import multiple_of, tl, triton

_LOG2E = tl.constexpr(1.4426950408889634)

# ============================================================================ tile helpers

@triton.jit
def _load_tile(base_ptr, offs_n, offs_d, stride_n, stride_d, mask):
    """A [rows, width] tile of one (batch, head) slice; padded lanes read 0."""
    return tl.load(base_ptr + offs_n[:, None] * stride_n + offs_d[None, :] * stride_d, mask=mask, other=0.0)


@triton.jit
def _load_rows(base_ptr, offs_r, r_valid, offs_d, stride_r, stride_d, HEAD_DIM: tl.constexpr,
               MASK_R: tl.constexpr, MASK_D: tl.constexpr):
    """A [rows, width] tile masked only where it can run out of bounds: rows
    past N (``MASK_R``, the peeled last tile) and lanes past the head dim
    (``MASK_D``, a padded width)."""
    ptrs = base_ptr + offs_r[:, None] * stride_r + offs_d[None, :] * stride_d
    if MASK_R:
        if MASK_D:
            t = tl.load(ptrs, mask=r_valid[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
        else:
            t = tl.load(ptrs, mask=r_valid[:, None], other=0.0)
    else:
        if MASK_D:
            t = tl.load(ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
        else:
            t = tl.load(ptrs)
    return t


@triton.jit
def _load_vec(ptr, offs, valid, MASK: tl.constexpr):
    if MASK:
        x = tl.load(ptr + offs, mask=valid, other=0)
    else:
        x = tl.load(ptr + offs)
    return x


@triton.jit
def _aligned(stride_b, stride_h, stride_n, ALIGN: tl.constexpr):
    """Alignment hints (checked on the host): the strides are multiples of ALIGN
    elements, so rows of a tile load as ALIGN-wide vectors."""
    return multiple_of(stride_b, ALIGN), multiple_of(stride_h, ALIGN), multiple_of(stride_n, ALIGN)


@triton.jit
def _tile_scores(q, k, q2, k2, tab_h, u_m, u_n, bias_b, offs_m, offs_n, m_valid, n_valid,
                 stride_bm, stride_bn, qk_scale, bias_scale,
                 HAS_TABLE: tl.constexpr, HAS_AMM: tl.constexpr, HAS_BIAS: tl.constexpr,
                 FOLD: tl.constexpr, MASK_N: tl.constexpr, SPLIT: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """Scores of one tile and the gathered per-offset entry ``g``.

    ``tab_h`` points at the zero-offset entry of head h's per-offset table
    (stored in reversed offset order), ``u_m``/``u_n`` are the grid indices of
    the rows/columns: the pair's entry is ``tab_h[u_n - u_m]``.
    The returned ``s`` times ``qk_scale`` (FOLD) or ``s`` itself (not FOLD) is
    the score in the log2 domain.  ``q2``/``k2`` are the head-dim tails (SPLIT).
    Columns past N are -inf when MASK_N."""
    g = u_n  # no table and no AMM: nothing is gathered
    if HAS_TABLE or HAS_AMM:
        # The table is stored in reversed offset order, so the pair's entry is
        # tab_h[u_n - u_m]: the row part (tab_h - u_m) is loop-invariant in the
        # forward and dQ loops, leaving one 64-bit address add per score.
        row = tab_h - u_m
        g = tl.load(row[:, None] + u_n[None, :])
    if HAS_TABLE:
        if HAS_AMM:
            tb = g.to(tl.int32).to(tl.float32, bitcast=True)  # low half: the table
        else:
            tb = g
        if FOLD:  # the table (divided by the scale) is the dot's accumulator
            s = tl.dot(q, tl.trans(k), acc=tb, input_precision=DOT_PRECISION)
        else:
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    else:
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if SPLIT:
        s = tl.dot(q2, tl.trans(k2), acc=s, input_precision=DOT_PRECISION)
    if not FOLD:
        s = s * qk_scale
        if HAS_TABLE:
            s += tb
    if HAS_BIAS:
        bb = tl.load(bias_b + offs_m[:, None] * stride_bm + offs_n[None, :] * stride_bn,
                     mask=m_valid[:, None] & n_valid[None, :], other=0.0)
        s += bb.to(tl.float32) * bias_scale
    if MASK_N:
        s = tl.where(n_valid[None, :], s, float("-inf"))
    return s, g


@triton.jit
def _tile_weights(g, mod_b, offs_m, offs_n, m_valid, n_valid, stride_mm, stride_mn,
                  HAS_TABLE: tl.constexpr, HAS_AMM: tl.constexpr, HAS_MOD: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Post-softmax multiplier of one tile (AMM ⊙ modulation); 1 where absent.
    ``g`` is the entry ``_tile_scores`` gathered (the AMM is its high half when
    the table is packed with it)."""
    w = tl.full((BLOCK_M, BLOCK_N), 1.0, tl.float32)
    if HAS_AMM:
        if HAS_TABLE:
            w = (g >> 32).to(tl.int32).to(tl.float32, bitcast=True)
        else:
            w = g
    if HAS_MOD:
        mv = tl.load(mod_b + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn,
                     mask=m_valid[:, None] & n_valid[None, :], other=0.0)
        w = w * mv.to(tl.float32)
    return w


@triton.jit
def _key_tile_scores(q, q2, start_n, N, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                     offs_d, offs_d2, tab_h, u_m, u_b, bias_b, offs_m, m_valid, stride_bm, stride_bn,
                     qk_scale, bias_scale, HAS_GRID: tl.constexpr, HAS_TABLE: tl.constexpr,
                     HAS_AMM: tl.constexpr, HAS_BIAS: tl.constexpr, FOLD: tl.constexpr, MASK_N: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_D2: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Key tile ``start_n`` of the loops over keys (forward, dQ): its k/v rows (two
    head-dim tiles when BLOCK_D2 > 0, e.g. 72 = 64 + 16), its grid indices, the
    scores and the per-offset entries ``g``."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_valid = offs_n < N
    k = _load_rows(k_base, offs_n, n_valid, offs_d, stride_kn, stride_kd, HEAD_DIM, MASK_N, BLOCK_D > HEAD_DIM)
    v = _load_rows(v_base, offs_n, n_valid, offs_d, stride_vn, stride_vd, HEAD_DIM, MASK_N, BLOCK_D > HEAD_DIM)
    k2 = k
    v2 = v
    if BLOCK_D2 > 0:
        k2 = _load_rows(k_base, offs_n, n_valid, offs_d2, stride_kn, stride_kd, HEAD_DIM, MASK_N,
                        BLOCK_D + BLOCK_D2 > HEAD_DIM)
        v2 = _load_rows(v_base, offs_n, n_valid, offs_d2, stride_vn, stride_vd, HEAD_DIM, MASK_N,
                        BLOCK_D + BLOCK_D2 > HEAD_DIM)
    u_n = offs_n
    if HAS_GRID:
        u_n = _load_vec(u_b, offs_n, n_valid, MASK_N)
    s, g = _tile_scores(q, k, q2, k2, tab_h, u_m, u_n, bias_b, offs_m, offs_n, m_valid, n_valid,
                        stride_bm, stride_bn, qk_scale, bias_scale, HAS_TABLE, HAS_AMM, HAS_BIAS, FOLD,
                        MASK_N, BLOCK_D2 > 0, DOT_PRECISION)
    return s, g, k, k2, v, v2, offs_n, n_valid


# ============================================================================ forward

@triton.jit
def _fwd_tile(acc, acc2, m_i, l_i, q, q2, start_n, N, k_base, v_base, stride_kn, stride_kd,
              stride_vn, stride_vd, offs_d, offs_d2, tab_h, u_m, u_b, bias_b, mod_b, offs_m, m_valid,
              stride_bm, stride_bn, stride_mm, stride_mn, qk_scale, bias_scale,
              HAS_GRID: tl.constexpr, HAS_TABLE: tl.constexpr, HAS_AMM: tl.constexpr,
              HAS_BIAS: tl.constexpr, HAS_MOD: tl.constexpr, FOLD: tl.constexpr, MASK_N: tl.constexpr,
              DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, HEAD_DIM: tl.constexpr):
    """One key tile of the online softmax."""
    s, g, k, k2, v, v2, offs_n, n_valid = _key_tile_scores(
        q, q2, start_n, N, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, offs_d, offs_d2,
        tab_h, u_m, u_b, bias_b, offs_m, m_valid, stride_bm, stride_bn, qk_scale, bias_scale,
        HAS_GRID, HAS_TABLE, HAS_AMM, HAS_BIAS, FOLD, MASK_N, DOT_PRECISION, BLOCK_N, BLOCK_D, BLOCK_D2, HEAD_DIM)
    if FOLD:
        post = qk_scale
    else:
        post = 1.0
    m_new = tl.maximum(m_i, tl.max(s, 1) * post)
    # Rows whose scores are all -inf so far (a -inf dense bias) must not produce inf - inf.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_safe)
    p = tl.math.exp2(s * post - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if HAS_AMM or HAS_MOD:
        p = p * _tile_weights(g, mod_b, offs_m, offs_n, m_valid, n_valid, stride_mm, stride_mn,
                              HAS_TABLE, HAS_AMM, HAS_MOD, BLOCK_M, BLOCK_N)
    pv = p.to(v.dtype)
    acc = acc * alpha[:, None] + tl.dot(pv, v, input_precision=DOT_PRECISION)
    if BLOCK_D2 > 0:
        acc2 = acc2 * alpha[:, None] + tl.dot(pv, v2, input_precision=DOT_PRECISION)
    return acc, acc2, m_new, l_i


@triton.jit
def _amm_attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
    tab_ptr, u_ptr, bias_ptr, mod_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_th, stride_ub,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    H, N, N_BUCKET, qk_scale, bias_scale, IDX_OFF,
    HAS_GRID: tl.constexpr, HAS_TABLE: tl.constexpr, HAS_AMM: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_MOD: tl.constexpr, FOLD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
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
    q_base = q_ptr + b * stride_qb + h * stride_qh
    q = _load_rows(q_base, offs_m, m_valid, offs_d, stride_qn, stride_qd, HEAD_DIM, True, BLOCK_D > HEAD_DIM)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    q2 = q
    offs_d2 = offs_d
    acc2 = acc
    if BLOCK_D2 > 0:
        offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
        q2 = _load_rows(q_base, offs_m, m_valid, offs_d2, stride_qn, stride_qd, HEAD_DIM, True,
                        BLOCK_D + BLOCK_D2 > HEAD_DIM)
        acc2 = tl.zeros((BLOCK_M, BLOCK_D2), tl.float32)
    u_b = u_ptr + b * stride_ub
    u_m = offs_m
    if HAS_GRID:
        u_m = _load_vec(u_b, offs_m, m_valid, True)
    tab_h = tab_ptr + h * stride_th + IDX_OFF
    bias_b = bias_ptr + b * stride_bb + h * stride_bh
    mod_b = mod_ptr + b * stride_mb + h * stride_mh

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    n_full = (N // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc, acc2, m_i, l_i = _fwd_tile(
            acc, acc2, m_i, l_i, q, q2, start_n, N, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
            offs_d, offs_d2, tab_h, u_m, u_b, bias_b, mod_b, offs_m, m_valid, stride_bm, stride_bn,
            stride_mm, stride_mn, qk_scale, bias_scale, HAS_GRID, HAS_TABLE, HAS_AMM, HAS_BIAS, HAS_MOD,
            FOLD, False, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_D2, HEAD_DIM)
    if n_full < N:  # the last, partial key tile
        acc, acc2, m_i, l_i = _fwd_tile(
            acc, acc2, m_i, l_i, q, q2, n_full, N, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
            offs_d, offs_d2, tab_h, u_m, u_b, bias_b, mod_b, offs_m, m_valid, stride_bm, stride_bn,
            stride_mm, stride_mn, qk_scale, bias_scale, HAS_GRID, HAS_TABLE, HAS_AMM, HAS_BIAS, HAS_MOD,
            FOLD, True, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_D2, HEAD_DIM)

    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
    o_base = o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on
    tl.store(o_base + offs_d[None, :] * stride_od, (acc / l_i[:, None]).to(o_ptr.dtype.element_ty),
             mask=m_valid[:, None] & (offs_d < HEAD_DIM)[None, :])
    if BLOCK_D2 > 0:
        tl.store(o_base + offs_d2[None, :] * stride_od, (acc2 / l_i[:, None]).to(o_ptr.dtype.element_ty),
                 mask=m_valid[:, None] & (offs_d2 < HEAD_DIM)[None, :])
    tl.store(lse_ptr + bh.to(tl.int64) * N + offs_m, lse, mask=m_valid)


# ============================================================================ backward

@triton.jit
def _dkdv_tile(dk, dk2, dv, dv2, k, k2, v, v2, start_m, N, q_base, do_base, stride_qn, stride_qd,
               stride_don, stride_dod, lse_b, delta_b, offs_d, offs_d2, tab_h, dtab_h, stride_dtr,
               u_b, u_n, bias_b, mod_b, dbias_b, offs_n, n_valid, stride_bm, stride_bn, stride_mm, stride_mn,
               stride_dbm, stride_dbn, qk_scale, bias_scale,
               HAS_GRID: tl.constexpr, HAS_TABLE: tl.constexpr, HAS_AMM: tl.constexpr,
               HAS_BIAS: tl.constexpr, HAS_MOD: tl.constexpr, NEED_DTABLE: tl.constexpr,
               NEED_DBIAS: tl.constexpr, FOLD: tl.constexpr, MASK_M: tl.constexpr,
               DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, HEAD_DIM: tl.constexpr):
    """One query tile of the dK/dV loop; scatters dS into the table and dense-bias gradients."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    m_valid = offs_m < N
    q = _load_rows(q_base, offs_m, m_valid, offs_d, stride_qn, stride_qd, HEAD_DIM, MASK_M, BLOCK_D > HEAD_DIM)
    do = _load_rows(do_base, offs_m, m_valid, offs_d, stride_don, stride_dod, HEAD_DIM, MASK_M,
                    BLOCK_D > HEAD_DIM)
    q2 = q
    do2 = do
    if BLOCK_D2 > 0:
        q2 = _load_rows(q_base, offs_m, m_valid, offs_d2, stride_qn, stride_qd, HEAD_DIM, MASK_M,
                        BLOCK_D + BLOCK_D2 > HEAD_DIM)
        do2 = _load_rows(do_base, offs_m, m_valid, offs_d2, stride_don, stride_dod, HEAD_DIM, MASK_M,
                         BLOCK_D + BLOCK_D2 > HEAD_DIM)
    lse2 = _load_vec(lse_b, offs_m, m_valid, MASK_M) * _LOG2E
    delta = _load_vec(delta_b, offs_m, m_valid, MASK_M)
    u_m = offs_m
    if HAS_GRID:
        u_m = _load_vec(u_b, offs_m, m_valid, MASK_M)
    # Columns past N need no -inf: their dS only reaches dK/dV rows that are
    # not stored, and the scatters below are masked.
    s, g = _tile_scores(q, k, q2, k2, tab_h, u_m, u_n, bias_b, offs_m, offs_n, m_valid, n_valid,
                        stride_bm, stride_bn, qk_scale, bias_scale, HAS_TABLE, HAS_AMM, HAS_BIAS, FOLD,
                        False, BLOCK_D2 > 0, DOT_PRECISION)
    if FOLD:
        p = tl.math.exp2(s * qk_scale - lse2[:, None])
    else:
        p = tl.math.exp2(s - lse2[:, None])
    if MASK_M:
        p = tl.where(m_valid[:, None], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    if BLOCK_D2 > 0:
        dp = tl.dot(do2, tl.trans(v2), acc=dp, input_precision=DOT_PRECISION)
    if HAS_AMM or HAS_MOD:
        w = _tile_weights(g, mod_b, offs_m, offs_n, m_valid, n_valid, stride_mm, stride_mn,
                          HAS_TABLE, HAS_AMM, HAS_MOD, BLOCK_M, BLOCK_N)
        pw = p * w
        dp = dp * w
    else:
        pw = p
    pwt = tl.trans(pw.to(do.dtype))
    dv += tl.dot(pwt, do, input_precision=DOT_PRECISION)
    if BLOCK_D2 > 0:
        dv2 += tl.dot(pwt, do2, input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])  # gradient w.r.t. the natural-log scores
    dst = tl.trans(ds.to(q.dtype))
    dk += tl.dot(dst, q, input_precision=DOT_PRECISION)
    if BLOCK_D2 > 0:
        dk2 += tl.dot(dst, q2, input_precision=DOT_PRECISION)
    if MASK_M:
        pair_valid = m_valid[:, None] & n_valid[None, :]
    else:
        pair_valid = (offs_m >= 0)[:, None] & n_valid[None, :]
    if NEED_DTABLE:
        # No ordering is needed between these adds: relaxed atomics (RED on sm_90).
        drow = dtab_h + u_m * stride_dtr
        tl.atomic_add(drow[:, None] - (u_n * stride_dtr)[None, :], ds, mask=pair_valid, sem="relaxed")
    if NEED_DBIAS:
        tl.atomic_add(dbias_b + offs_m[:, None] * stride_dbm + offs_n[None, :] * stride_dbn, ds,
                      mask=pair_valid, sem="relaxed")
    return dk, dk2, dv, dv2


@triton.jit
def _amm_attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    tab_ptr, u_ptr, bias_ptr, mod_ptr, dtable_ptr, dbias_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_th, stride_ub,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_dtr, stride_dth,
    stride_dbb, stride_dbh, stride_dbm, stride_dbn,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    H, N, qk_scale, bias_scale, sm_scale, IDX_OFF,
    HAS_GRID: tl.constexpr, HAS_TABLE: tl.constexpr,
    HAS_AMM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MOD: tl.constexpr,
    NEED_DTABLE: tl.constexpr, NEED_DBIAS: tl.constexpr, FOLD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
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
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    k = _load_rows(k_base, offs_n, n_valid, offs_d, stride_kn, stride_kd, HEAD_DIM, True, BLOCK_D > HEAD_DIM)
    v = _load_rows(v_base, offs_n, n_valid, offs_d, stride_vn, stride_vd, HEAD_DIM, True, BLOCK_D > HEAD_DIM)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    k2 = k
    v2 = v
    dk2 = dk
    dv2 = dv
    offs_d2 = offs_d
    if BLOCK_D2 > 0:
        offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
        k2 = _load_rows(k_base, offs_n, n_valid, offs_d2, stride_kn, stride_kd, HEAD_DIM, True,
                        BLOCK_D + BLOCK_D2 > HEAD_DIM)
        v2 = _load_rows(v_base, offs_n, n_valid, offs_d2, stride_vn, stride_vd, HEAD_DIM, True,
                        BLOCK_D + BLOCK_D2 > HEAD_DIM)
        dk2 = tl.zeros((BLOCK_N, BLOCK_D2), tl.float32)
        dv2 = tl.zeros((BLOCK_N, BLOCK_D2), tl.float32)
    u_b = u_ptr + b * stride_ub
    u_n = offs_n
    if HAS_GRID:
        u_n = _load_vec(u_b, offs_n, n_valid, True)
    tab_h = tab_ptr + h * stride_th + IDX_OFF
    dtab_h = dtable_ptr + h * stride_dth + IDX_OFF * stride_dtr
    bias_b = bias_ptr + b * stride_bb + h * stride_bh
    mod_b = mod_ptr + b * stride_mb + h * stride_mh
    dbias_b = dbias_ptr + b * stride_dbb + h * stride_dbh
    q_base = q_ptr + b * stride_qb + h * stride_qh
    do_base = do_ptr + b * stride_dob + h * stride_doh
    lse_b = lse_ptr + bh.to(tl.int64) * N
    delta_b = delta_ptr + bh.to(tl.int64) * N
    m_full = (N // BLOCK_M) * BLOCK_M
    for start_m in range(0, m_full, BLOCK_M):
        dk, dk2, dv, dv2 = _dkdv_tile(
            dk, dk2, dv, dv2, k, k2, v, v2, start_m, N, q_base, do_base, stride_qn, stride_qd,
            stride_don, stride_dod, lse_b, delta_b, offs_d, offs_d2, tab_h, dtab_h, stride_dtr,
            u_b, u_n, bias_b, mod_b, dbias_b, offs_n, n_valid, stride_bm, stride_bn, stride_mm, stride_mn,
            stride_dbm, stride_dbn, qk_scale, bias_scale, HAS_GRID, HAS_TABLE, HAS_AMM, HAS_BIAS, HAS_MOD,
            NEED_DTABLE, NEED_DBIAS, FOLD, False, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_D2, HEAD_DIM)
    if m_full < N:  # the last, partial query tile
        dk, dk2, dv, dv2 = _dkdv_tile(
            dk, dk2, dv, dv2, k, k2, v, v2, m_full, N, q_base, do_base, stride_qn, stride_qd,
            stride_don, stride_dod, lse_b, delta_b, offs_d, offs_d2, tab_h, dtab_h, stride_dtr,
            u_b, u_n, bias_b, mod_b, dbias_b, offs_n, n_valid, stride_bm, stride_bn, stride_mm, stride_mn,
            stride_dbm, stride_dbn, qk_scale, bias_scale, HAS_GRID, HAS_TABLE, HAS_AMM, HAS_BIAS, HAS_MOD,
            NEED_DTABLE, NEED_DBIAS, FOLD, True, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_D2, HEAD_DIM)
    # dk/dv through their strides: contiguous [B, H, N, D] or views of one dqkv buffer.
    dk_base = dk_ptr + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn
    dv_base = dv_ptr + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvn
    mask = n_valid[:, None] & (offs_d < HEAD_DIM)[None, :]
    tl.store(dk_base + offs_d[None, :] * stride_dkd, (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=mask)
    tl.store(dv_base + offs_d[None, :] * stride_dvd, dv.to(dv_ptr.dtype.element_ty), mask=mask)
    if BLOCK_D2 > 0:
        mask2 = n_valid[:, None] & (offs_d2 < HEAD_DIM)[None, :]
        tl.store(dk_base + offs_d2[None, :] * stride_dkd, (dk2 * sm_scale).to(dk_ptr.dtype.element_ty),
                 mask=mask2)
        tl.store(dv_base + offs_d2[None, :] * stride_dvd, dv2.to(dv_ptr.dtype.element_ty), mask=mask2)


@triton.jit
def _dq_tile(dq, dq2, q, q2, do, do2, lse2, delta, start_n, N, k_base, v_base, stride_kn, stride_kd,
             stride_vn, stride_vd, offs_d, offs_d2, tab_h, u_m, u_b, bias_b, mod_b, offs_m, m_valid,
             stride_bm, stride_bn, stride_mm, stride_mn, qk_scale, bias_scale,
             HAS_GRID: tl.constexpr, HAS_TABLE: tl.constexpr, HAS_AMM: tl.constexpr,
             HAS_BIAS: tl.constexpr, HAS_MOD: tl.constexpr, FOLD: tl.constexpr, MASK_N: tl.constexpr,
             DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, HEAD_DIM: tl.constexpr):
    """One key tile of the dQ loop."""
    s, g, k, k2, v, v2, offs_n, n_valid = _key_tile_scores(
        q, q2, start_n, N, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, offs_d, offs_d2,
        tab_h, u_m, u_b, bias_b, offs_m, m_valid, stride_bm, stride_bn, qk_scale, bias_scale,
        HAS_GRID, HAS_TABLE, HAS_AMM, HAS_BIAS, FOLD, MASK_N, DOT_PRECISION, BLOCK_N, BLOCK_D, BLOCK_D2, HEAD_DIM)
    if FOLD:
        p = tl.math.exp2(s * qk_scale - lse2[:, None])
    else:
        p = tl.math.exp2(s - lse2[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    if BLOCK_D2 > 0:
        dp = tl.dot(do2, tl.trans(v2), acc=dp, input_precision=DOT_PRECISION)
    if HAS_AMM or HAS_MOD:
        dp = dp * _tile_weights(g, mod_b, offs_m, offs_n, m_valid, n_valid, stride_mm, stride_mn,
                                HAS_TABLE, HAS_AMM, HAS_MOD, BLOCK_M, BLOCK_N)
    ds = (p * (dp - delta[:, None])).to(k.dtype)
    dq += tl.dot(ds, k, input_precision=DOT_PRECISION)
    if BLOCK_D2 > 0:
        dq2 += tl.dot(ds, k2, input_precision=DOT_PRECISION)
    return dq, dq2


@triton.jit
def _amm_attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    tab_ptr, u_ptr, bias_ptr, mod_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_th, stride_ub,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    H, N, qk_scale, bias_scale, sm_scale, IDX_OFF,
    HAS_GRID: tl.constexpr, HAS_TABLE: tl.constexpr,
    HAS_AMM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MOD: tl.constexpr,
    FOLD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
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
    q_base = q_ptr + b * stride_qb + h * stride_qh
    do_base = do_ptr + b * stride_dob + h * stride_doh
    q = _load_rows(q_base, offs_m, m_valid, offs_d, stride_qn, stride_qd, HEAD_DIM, True, BLOCK_D > HEAD_DIM)
    do = _load_rows(do_base, offs_m, m_valid, offs_d, stride_don, stride_dod, HEAD_DIM, True,
                    BLOCK_D > HEAD_DIM)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    q2 = q
    do2 = do
    dq2 = dq
    offs_d2 = offs_d
    if BLOCK_D2 > 0:
        offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
        q2 = _load_rows(q_base, offs_m, m_valid, offs_d2, stride_qn, stride_qd, HEAD_DIM, True,
                        BLOCK_D + BLOCK_D2 > HEAD_DIM)
        do2 = _load_rows(do_base, offs_m, m_valid, offs_d2, stride_don, stride_dod, HEAD_DIM, True,
                         BLOCK_D + BLOCK_D2 > HEAD_DIM)
        dq2 = tl.zeros((BLOCK_M, BLOCK_D2), tl.float32)
    row_base = bh.to(tl.int64) * N
    lse2 = tl.load(lse_ptr + row_base + offs_m, mask=m_valid, other=0.0) * _LOG2E
    delta = tl.load(delta_ptr + row_base + offs_m, mask=m_valid, other=0.0)
    u_b = u_ptr + b * stride_ub
    u_m = offs_m
    if HAS_GRID:
        u_m = _load_vec(u_b, offs_m, m_valid, True)
    tab_h = tab_ptr + h * stride_th + IDX_OFF
    bias_b = bias_ptr + b * stride_bb + h * stride_bh
    mod_b = mod_ptr + b * stride_mb + h * stride_mh
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    n_full = (N // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        dq, dq2 = _dq_tile(
            dq, dq2, q, q2, do, do2, lse2, delta, start_n, N, k_base, v_base, stride_kn, stride_kd,
            stride_vn, stride_vd, offs_d, offs_d2, tab_h, u_m, u_b, bias_b, mod_b, offs_m, m_valid,
            stride_bm, stride_bn, stride_mm, stride_mn, qk_scale, bias_scale, HAS_GRID, HAS_TABLE, HAS_AMM,
            HAS_BIAS, HAS_MOD, FOLD, False, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_D2, HEAD_DIM)
    if n_full < N:  # the last, partial key tile
        dq, dq2 = _dq_tile(
            dq, dq2, q, q2, do, do2, lse2, delta, n_full, N, k_base, v_base, stride_kn, stride_kd,
            stride_vn, stride_vd, offs_d, offs_d2, tab_h, u_m, u_b, bias_b, mod_b, offs_m, m_valid,
            stride_bm, stride_bn, stride_mm, stride_mn, qk_scale, bias_scale, HAS_GRID, HAS_TABLE, HAS_AMM,
            HAS_BIAS, HAS_MOD, FOLD, True, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_D2, HEAD_DIM)
    dq_base = dq_ptr + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqn
    tl.store(dq_base + offs_d[None, :] * stride_dqd, (dq * sm_scale).to(dq_ptr.dtype.element_ty),
             mask=m_valid[:, None] & (offs_d < HEAD_DIM)[None, :])
    if BLOCK_D2 > 0:
        tl.store(dq_base + offs_d2[None, :] * stride_dqd, (dq2 * sm_scale).to(dq_ptr.dtype.element_ty),
                 mask=m_valid[:, None] & (offs_d2 < HEAD_DIM)[None, :])


@triton.jit
def _amm_attn_bwd_delta_kernel(o_ptr, do_ptr, delta_ptr, H, N,
                               stride_ob, stride_oh, stride_on, stride_od,
                               stride_dob, stride_doh, stride_don, stride_dod,
                               BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
                               ALIGN: tl.constexpr, zero_ptr=None, n_zero=0, ZERO_BLOCK: tl.constexpr = 1024):
    """Backward preprocess: Delta_i = dO_i . O_i in float32, [B, H, N].  With ``zero_ptr`` the
    first ``cdiv(n_zero, ZERO_BLOCK)`` programs clear that float32 buffer instead (the table
    gradient the later kernels accumulate into), so that it costs no launch of its own."""
    num_m_blocks = tl.cdiv(N, BLOCK_M)
    pid = tl.program_id(0)
    if zero_ptr is not None:
        zero_programs = tl.cdiv(n_zero, ZERO_BLOCK)
        if pid < zero_programs:
            offs_z = pid * ZERO_BLOCK + tl.arange(0, ZERO_BLOCK)
            tl.store(zero_ptr + offs_z, tl.zeros((ZERO_BLOCK,), tl.float32), mask=offs_z < n_zero)
            return
        pid -= zero_programs
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


# ============================================================================ per-call grid tables

@triton.jit
def _amm_attn_grid_kernel(table_ptr, amm_ptr, pos_ptr, pre_ptr, tab_ptr, tab2_ptr, u_ptr,
                          stride_tr, stride_th, stride_pb, stride_pn, n_table, H, N, n_pos, cols, n_cells,
                          HAS_TABLE: tl.constexpr, HAS_AMM: tl.constexpr, HAS_POS: tl.constexpr,
                          TWO: tl.constexpr, BLOCK: tl.constexpr):
    """The per-offset table the attention kernels gather from, and the tokens' grid indices, in
    one launch.  The first programs write ``tab[h, j]`` for offset entry ``j`` in reversed order
    (source row ``n_table - 1 - j``): the table value as float64 times ``pre[0]`` rounded to
    float32 (and, with ``TWO``, times ``pre[1]`` into ``tab2``), with the AMM the float32 AMM in
    the high half of one 64-bit word and the table value in the low half; AMM alone: the float32
    AMM ``[n_table]``.  The remaining programs write ``u = (p // cols) * (2 cols - 1) + p % cols``
    (int32) for each of the ``n_pos`` positions (``[B, N]`` through its strides, or ``[N]``), each
    clamped to the grid's ``[0, n_cells)`` first: the attention kernels gather at ``u_j - u_i``
    without a range check, so a position out of range (not checked unless value checks are on)
    gives the scores of the nearest valid cell, never a read out of bounds."""
    pid = tl.program_id(0)
    n_tab = n_table * H if HAS_TABLE else n_table
    tab_programs = tl.cdiv(n_tab, BLOCK)
    if pid < tab_programs:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        valid = offs < n_tab
        h = offs // n_table
        src = n_table - 1 - offs % n_table
        if HAS_AMM:
            amm = tl.load(amm_ptr + src, mask=valid, other=0.0).to(tl.float32)
            amm_hi = amm.to(tl.int32, bitcast=True).to(tl.int64) << 32
        if HAS_TABLE:
            t = tl.load(table_ptr + src * stride_tr + h * stride_th, mask=valid, other=0.0).to(tl.float64)
            v1 = (t * tl.load(pre_ptr)).to(tl.float32)
            if HAS_AMM:
                tl.store(tab_ptr + offs, amm_hi | (v1.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF),
                         mask=valid)
            else:
                tl.store(tab_ptr + offs, v1, mask=valid)
            if TWO:
                v2 = (t * tl.load(pre_ptr + 1)).to(tl.float32)
                if HAS_AMM:
                    tl.store(tab2_ptr + offs,
                             amm_hi | (v2.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF), mask=valid)
                else:
                    tl.store(tab2_ptr + offs, v2, mask=valid)
        else:
            tl.store(tab_ptr + offs, amm, mask=valid)
    elif HAS_POS:
        offs = (pid - tab_programs) * BLOCK + tl.arange(0, BLOCK)
        valid = offs < n_pos
        b = (offs // N).to(tl.int64)
        p = tl.load(pos_ptr + b * stride_pb + (offs % N) * stride_pn, mask=valid, other=0)
        p = tl.minimum(tl.maximum(p, 0), n_cells - 1)
        u = (p // cols) * (2 * cols - 1) + p % cols
        tl.store(u_ptr + offs, u.to(tl.int32), mask=valid)


# ============================================================================ table gradient summed over the batch

@triton.jit
def _dtable_batch_sum(acc, b_start, b_count, h, N, q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr,
                      bias_ptr, mod_ptr, H,
                      stride_qb, stride_qh, stride_qn, stride_qd,
                      stride_kb, stride_kh, stride_kn, stride_kd,
                      stride_vb, stride_vh, stride_vn, stride_vd,
                      stride_dob, stride_doh, stride_don, stride_dod,
                      stride_bb, stride_bh, stride_bm, stride_bn,
                      stride_mb, stride_mh, stride_mm, stride_mn,
                      offs_m, offs_n, m_valid, n_valid, offs_d, offs_d2, tab_h, u_m, u_n, qk_scale, bias_scale,
                      HAS_TABLE: tl.constexpr, HAS_AMM: tl.constexpr, HAS_BIAS: tl.constexpr,
                      HAS_MOD: tl.constexpr, FOLD: tl.constexpr, MASK: tl.constexpr,
                      DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, HEAD_DIM: tl.constexpr):
    """acc + sum over the batch elements [b_start, b_start + b_count) of the
    tile's dS, built exactly as in the dK/dV loop (``_dkdv_tile``).  MASK: the
    tile runs past N in rows or columns (rows/columns past N hold finite
    garbage or NaN; the caller's atomic masks them)."""
    for i in range(0, b_count):
        b = b_start + i
        q_base = q_ptr + b * stride_qb + h * stride_qh
        do_base = do_ptr + b * stride_dob + h * stride_doh
        k_base = k_ptr + b * stride_kb + h * stride_kh
        v_base = v_ptr + b * stride_vb + h * stride_vh
        q = _load_rows(q_base, offs_m, m_valid, offs_d, stride_qn, stride_qd, HEAD_DIM, MASK, BLOCK_D > HEAD_DIM)
        do = _load_rows(do_base, offs_m, m_valid, offs_d, stride_don, stride_dod, HEAD_DIM, MASK,
                        BLOCK_D > HEAD_DIM)
        k = _load_rows(k_base, offs_n, n_valid, offs_d, stride_kn, stride_kd, HEAD_DIM, MASK, BLOCK_D > HEAD_DIM)
        v = _load_rows(v_base, offs_n, n_valid, offs_d, stride_vn, stride_vd, HEAD_DIM, MASK, BLOCK_D > HEAD_DIM)
        q2 = q
        do2 = do
        k2 = k
        v2 = v
        if BLOCK_D2 > 0:
            q2 = _load_rows(q_base, offs_m, m_valid, offs_d2, stride_qn, stride_qd, HEAD_DIM, MASK,
                            BLOCK_D + BLOCK_D2 > HEAD_DIM)
            do2 = _load_rows(do_base, offs_m, m_valid, offs_d2, stride_don, stride_dod, HEAD_DIM, MASK,
                             BLOCK_D + BLOCK_D2 > HEAD_DIM)
            k2 = _load_rows(k_base, offs_n, n_valid, offs_d2, stride_kn, stride_kd, HEAD_DIM, MASK,
                            BLOCK_D + BLOCK_D2 > HEAD_DIM)
            v2 = _load_rows(v_base, offs_n, n_valid, offs_d2, stride_vn, stride_vd, HEAD_DIM, MASK,
                            BLOCK_D + BLOCK_D2 > HEAD_DIM)
        row_base = (b * H + h) * N
        lse2 = _load_vec(lse_ptr + row_base, offs_m, m_valid, MASK) * _LOG2E
        delta = _load_vec(delta_ptr + row_base, offs_m, m_valid, MASK)
        # The per-offset entry depends on (h, u_m, u_n) only, not on b: its
        # gather is loop-invariant and hoisted out of this loop by the compiler
        # (sm_90 SASS: the only LDGs left in the loop are lse and Delta, and the
        # dense bias/modulation if given, besides the q/k/v/dO tiles, which the
        # 2-stage tiles read with async copies).
        s, g = _tile_scores(q, k, q2, k2, tab_h, u_m, u_n, bias_ptr + b * stride_bb + h * stride_bh,
                            offs_m, offs_n, m_valid, n_valid, stride_bm, stride_bn, qk_scale, bias_scale,
                            HAS_TABLE, HAS_AMM, HAS_BIAS, FOLD, False, BLOCK_D2 > 0, DOT_PRECISION)
        if FOLD:
            p = tl.math.exp2(s * qk_scale - lse2[:, None])
        else:
            p = tl.math.exp2(s - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if BLOCK_D2 > 0:
            dp = tl.dot(do2, tl.trans(v2), acc=dp, input_precision=DOT_PRECISION)
        if HAS_AMM or HAS_MOD:
            dp = dp * _tile_weights(g, mod_ptr + b * stride_mb + h * stride_mh, offs_m, offs_n, m_valid,
                                    n_valid, stride_mm, stride_mn, HAS_TABLE, HAS_AMM, HAS_MOD,
                                    BLOCK_M, BLOCK_N)
        acc += p * (dp - delta[:, None])  # dS: the gradient w.r.t. the natural-log scores
    return acc


@triton.jit(do_not_specialize=["B_PER_PROGRAM"])  # one compiled loop whatever the batch split
def _amm_attn_bwd_dtable_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr,
    tab_ptr, u_ptr, bias_ptr, mod_ptr, dtable_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_th, stride_ub,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_dtr, stride_dth,
    B, H, N, qk_scale, bias_scale, IDX_OFF, B_PER_PROGRAM,
    HAS_GRID: tl.constexpr, HAS_TABLE: tl.constexpr, HAS_AMM: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_MOD: tl.constexpr, FOLD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
    HEAD_DIM: tl.constexpr, ALIGN: tl.constexpr,
):
    """Table gradient when the grid offsets do not depend on the batch
    (positions absent, or one ``[N]`` positions vector shared by the batch:
    the grid indices ``u`` are one ``[N]`` vector, ``stride_ub`` is 0 and not used).

    dtable[idx(i, j), h] = sum_b dS[b, h, i, j],  dS = P ⊙ (dP ⊙ W - Delta),
    dP = dO V^T, the gradient w.r.t. the natural-log scores (as in the dK/dV
    kernel, from the same packed per-offset table).  One program per (batch
    chunk, head, query block, key block): the scores and dS of the tile are
    recomputed for every batch element of the chunk and summed in registers,
    then added with one relaxed atomic per (h, i, j) of the tile:
    B / B_PER_PROGRAM times fewer atomics than one per (b, h, i, j).  Tiles
    inside N x N run without bounds masks; the edge tiles run the masked body.
    """
    tl.static_assert(HAS_GRID and HAS_TABLE)
    num_m_blocks = tl.cdiv(N, BLOCK_M)
    num_n_blocks = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    pid_n = pid % num_n_blocks
    pid_m = (pid // num_n_blocks) % num_m_blocks
    ch = pid // (num_n_blocks * num_m_blocks)  # (batch chunk, head): programs of one head run together
    h = ch % H
    b_start = (ch // H).to(tl.int64) * B_PER_PROGRAM
    b_count = tl.minimum(B_PER_PROGRAM, B - b_start)
    stride_qb, stride_qh, stride_qn = _aligned(stride_qb, stride_qh, stride_qn, ALIGN)
    stride_kb, stride_kh, stride_kn = _aligned(stride_kb, stride_kh, stride_kn, ALIGN)
    stride_vb, stride_vh, stride_vn = _aligned(stride_vb, stride_vh, stride_vn, ALIGN)
    stride_dob, stride_doh, stride_don = _aligned(stride_dob, stride_doh, stride_don, ALIGN)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_d2 = offs_d
    if BLOCK_D2 > 0:
        offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
    m_valid = offs_m < N
    n_valid = offs_n < N
    # The tile's grid indices, the same for every batch element (padded lanes
    # read index 0, which keeps their gather inside the table).
    u_m = _load_vec(u_ptr, offs_m, m_valid, True)
    u_n = _load_vec(u_ptr, offs_n, n_valid, True)
    tab_h = tab_ptr + h * stride_th + IDX_OFF
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    if (pid_m + 1) * BLOCK_M <= N and (pid_n + 1) * BLOCK_N <= N:
        acc = _dtable_batch_sum(
            acc, b_start, b_count, h, N, q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, bias_ptr, mod_ptr, H,
            stride_qb, stride_qh, stride_qn, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
            stride_vb, stride_vh, stride_vn, stride_vd, stride_dob, stride_doh, stride_don, stride_dod,
            stride_bb, stride_bh, stride_bm, stride_bn, stride_mb, stride_mh, stride_mm, stride_mn,
            offs_m, offs_n, m_valid, n_valid, offs_d, offs_d2, tab_h, u_m, u_n, qk_scale, bias_scale,
            HAS_TABLE, HAS_AMM, HAS_BIAS, HAS_MOD, FOLD, False, DOT_PRECISION,
            BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_D2, HEAD_DIM)
    else:  # an edge tile, past N in rows or columns
        acc = _dtable_batch_sum(
            acc, b_start, b_count, h, N, q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, bias_ptr, mod_ptr, H,
            stride_qb, stride_qh, stride_qn, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
            stride_vb, stride_vh, stride_vn, stride_vd, stride_dob, stride_doh, stride_don, stride_dod,
            stride_bb, stride_bh, stride_bm, stride_bn, stride_mb, stride_mh, stride_mm, stride_mn,
            offs_m, offs_n, m_valid, n_valid, offs_d, offs_d2, tab_h, u_m, u_n, qk_scale, bias_scale,
            HAS_TABLE, HAS_AMM, HAS_BIAS, HAS_MOD, FOLD, True, DOT_PRECISION,
            BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_D2, HEAD_DIM)
    # dtable[IDX_OFF + u_m - u_n, h]: the same addresses as the dK/dV kernel's scatter.
    # No ordering is needed between these adds: relaxed atomics (RED on sm_90).
    drow = dtable_ptr + h * stride_dth + (IDX_OFF + u_m) * stride_dtr
    tl.atomic_add(drow[:, None] - (u_n * stride_dtr)[None, :], acc,
                  mask=m_valid[:, None] & n_valid[None, :], sem="relaxed")
