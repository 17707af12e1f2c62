"""Triton kernels of the fused AMM attention (forward, dK/dV, dQ, Delta).

    out = (softmax(q k^T * scale + T[idx(p_i, p_j), h] + bias) ⊙ M(p_i, p_j) ⊙ W) v

The launchers, the custom op and the ``"triton"`` backend are in
``amm_attention.py``; see its docstring for the design.  Imported only after
``amm_attention.py`` has checked that Triton can be used here.
"""
import triton
import triton.language as tl

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
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
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
    # dk/dv through their strides: contiguous [B, H, N, D] or views of one dqkv buffer.
    tl.store(dk_ptr + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             dk.to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
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
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
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
    tl.store(dq_ptr + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqn + offs_d[None, :] * stride_dqd,
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




@triton.jit(do_not_specialize=["B_PER_PROGRAM"])  # one compiled loop whatever the batch split
def _amm_attn_bwd_dtable_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr,
    table_ptr, pos_ptr, amm_ptr, bias_ptr, mod_ptr, dtable_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_tr, stride_th, stride_pb, stride_pn,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_dtr, stride_dth,
    B, H, N, n_table, qk_scale, COLS, IDX_OFF, B_PER_PROGRAM,
    HAS_GRID: tl.constexpr, HAS_POS: tl.constexpr, HAS_TABLE: tl.constexpr,
    HAS_AMM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MOD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr, ALIGN: tl.constexpr,
):
    """Table gradient when the grid offsets do not depend on the batch
    (positions absent, or one ``[N]`` positions vector shared by the batch).

    dtable[idx(i, j), h] = sum_b dS[b, h, i, j],  dS = P ⊙ (dP ⊙ W - Delta),
    dP = dO V^T, the gradient w.r.t. the natural-log scores (as in the dK/dV
    kernel).  One program per (batch chunk, head, query block, key block):
    the scores and dS of the tile are recomputed for every batch element of
    the chunk and summed in registers, then added with one relaxed atomic per
    (h, i, j) of the tile: B / B_PER_PROGRAM times fewer atomics than one per
    (b, h, i, j).  Positions, when given, are read through row 0 (stride_pb is
    not used).
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
    m_valid = offs_m < N
    n_valid = offs_n < N
    d_valid = offs_d < HEAD_DIM
    qm_mask = m_valid[:, None] & d_valid[None, :]
    kv_mask = n_valid[:, None] & d_valid[None, :]
    pair_valid = m_valid[:, None] & n_valid[None, :]

    # The tile's offset index, the same for every batch element.
    u_m = _row_index(pos_ptr, 0, offs_m, m_valid, 0, stride_pn, COLS, IDX_OFF, HAS_POS)
    u_n = _row_index(pos_ptr, 0, offs_n, n_valid, 0, stride_pn, COLS, 0, HAS_POS)
    idx = u_m[:, None] - u_n[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for i in range(0, b_count):
        b = b_start + i
        q = _load_tile(q_ptr + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_qn, stride_qd, qm_mask)
        do = _load_tile(do_ptr + b * stride_dob + h * stride_doh, offs_m, offs_d, stride_don, stride_dod, qm_mask)
        k = _load_tile(k_ptr + b * stride_kb + h * stride_kh, offs_n, offs_d, stride_kn, stride_kd, kv_mask)
        v = _load_tile(v_ptr + b * stride_vb + h * stride_vh, offs_n, offs_d, stride_vn, stride_vd, kv_mask)
        row_base = (b * H + h) * N
        lse2 = tl.load(lse_ptr + row_base + offs_m, mask=m_valid, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_ptr + row_base + offs_m, mask=m_valid, other=0.0)
        # The same scores and weights as in the dK/dV kernel.  The table and AMM
        # values depend on the offset index only, not on b: the compiler hoists
        # their gathers out of this loop (sm_90 SASS: the only global loads left
        # in it are lse and Delta, besides the dense bias/modulation if given).
        s, _idx, _valid = _tile_scores(
            q, k, table_ptr, bias_ptr, b, h, u_m, offs_m, offs_n, pos_ptr,
            0, stride_pn, stride_tr, stride_th, n_table,
            stride_bb, stride_bh, stride_bm, stride_bn, m_valid, n_valid, qk_scale, COLS,
            HAS_GRID, HAS_POS, HAS_TABLE, HAS_BIAS, DOT_PRECISION)
        p = tl.math.exp2(s - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if HAS_AMM or HAS_MOD:
            dp = dp * _tile_weights(amm_ptr, mod_ptr, b, h, idx, offs_m, offs_n, pair_valid,
                                    stride_mb, stride_mh, stride_mm, stride_mn,
                                    HAS_AMM, HAS_MOD, BLOCK_M, BLOCK_N)
        acc += p * (dp - delta[:, None])
    # Padded rows/columns hold finite garbage or NaN: masked here.
    tl.atomic_add(dtable_ptr + idx * stride_dtr + h * stride_dth, acc, mask=pair_valid, sem="relaxed")
