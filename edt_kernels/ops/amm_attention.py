"""Fused AMM attention in Triton: forward, backward, custom op, backend.

    out = (softmax(q k^T * scale + T[idx(p_i, p_j), h] + bias) ⊙ M(p_i, p_j) ⊙ W) v

Layout: the ``@triton.jit`` kernels (``_amm_attention_kernels.py``), then here the launchers that
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
- Scores are kept in the log2 domain (scale folded with log2 e) so ``exp2`` is used;
  with a positive scale the table is stored divided by it and starts the ``q k^T``
  dot as its accumulator, the scale is applied in the FFMA feeding ``exp2``.
- The table and the AMM are one packed, head-major per-offset table built here per
  call (``_grid_args``): one 64-bit gather per score; token grid indices are computed
  here too, so the kernels do no division.
- Head dims that are not powers of two are handled by masked loads of a
  padded ``BLOCK_D`` tile, or above 64 by a tile plus a narrow tail tile
  (``_head_blocks``: 72 = 64 + 16); inputs are read through their strides, never copied.
- Full tiles run unmasked; the last partial tile of each loop is peeled.
- The grid is 1-D (``B * H * cdiv(N, BLOCK_M)`` programs), so batch * heads
  beyond 65535 is fine; offsets into q/k/v use int64.
"""
from __future__ import annotations

import weakref
from functools import lru_cache
from typing import List, Optional

import torch

from ..backends import allow_tf32
from .._triton_support import interpreting, triton_unavailable_reason
from ._attention_op import (AttentionBackend, AttentionInputs, _empty_like_out, register_attention_op,
                            register_attention_qkvpacked_op, register_backend)
from ._triton_utils import HAS_TRITON, alignment, cdiv, next_power_of_2, triton
from ._amm_attention_kernels import (  # noqa: F401  (the @triton.jit kernels; tools reach them here)
    _aligned, _amm_attn_bwd_delta_kernel, _amm_attn_grid_kernel, _amm_attn_bwd_dkdv_kernel, _amm_attn_bwd_dq_kernel,
    _amm_attn_bwd_dtable_kernel, _amm_attn_fwd_kernel, _load_rows, _load_tile, _tile_scores, _tile_weights,
)

__all__ = ["amm_attention_forward", "amm_attention_backward", "TritonBackend"]

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


# ============================================================================ launchers

def _fwd_configs():
    # Forward tiles for Hopper/Ampere, each free of register spills at D <= 128
    # in the sm_90 profile (benchmarks/profiling/sm90_profile.py); the backward kernels use
    # fixed tiles (their atomics make autotuning re-runs unsafe without resets).
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
            for bm, bn, w, st in [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 3), (64, 32, 4, 2)]]


def _fwd_config_fits(cfg, block_d: int) -> bool:
    """The float32 accumulator and score tiles per thread stay <= 80 registers
    (above that the forward spills on sm_90 with table + AMM, see the profile)."""
    bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
    return (bm * block_d + bm * bn) <= 80 * 32 * cfg.num_warps


def _prune_fwd_configs(configs, named_args, **kwargs):
    width = kwargs["BLOCK_D"] + kwargs.get("BLOCK_D2", 0)  # both head-dim tiles
    fits = [c for c in configs if _fwd_config_fits(c, width)]
    return fits or configs[-1:]


_FWD_KEY = ["N_BUCKET", "BLOCK_D", "BLOCK_D2", "HEAD_DIM", "ALIGN", "HAS_GRID", "HAS_TABLE", "HAS_AMM",
            "HAS_BIAS", "HAS_MOD", "FOLD", "DOT_PRECISION"]
# Under the interpreter (or without Triton) there is nothing to tune: the plain kernel with the
# tiles of _block_sizes is launched.  On a GPU the autotuner is keyed on a
# power-of-two bucket of N (MDT's kept-token count changes every step).
_fwd_kernel = (_amm_attn_fwd_kernel if interpreting() or not HAS_TRITON else
               triton.autotune(configs=_fwd_configs(), key=_FWD_KEY,
                               prune_configs_by={"early_config_prune": _prune_fwd_configs})(_amm_attn_fwd_kernel))
_fwd_choice: dict = {}  # autotuned config per key, reused under CUDA-graph capture


def _on_gpu(t: torch.Tensor) -> bool:
    """GPU tiles/configs (the sm_90 profile compiles them for CPU tensors)."""
    return t.device.type == "cuda"


def _capturing(t: torch.Tensor) -> bool:
    return t.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _block_sizes(N: int, D: int, q: torch.Tensor):
    return _tile_sizes(D, _on_gpu(q), N > 32)


@lru_cache(maxsize=None)
def _tile_sizes(D: int, gpu: bool, long: bool):
    block_d = max(16, next_power_of_2(D))  # the padded width of one tile (the Delta kernel's)
    if not gpu:  # interpreter: large tiles mean fewer Python-level steps
        bm = 64 if long else 32
        return bm, bm, block_d, 4, 1
    # Hopper/Ampere heuristic (the first autotune config that fits), used under CUDA-graph capture.
    d1, d2 = _head_blocks(D)
    cfg = _prune_fwd_configs(_fwd_configs(), {}, BLOCK_D=d1, BLOCK_D2=d2)[0]
    return cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], block_d, cfg.num_warps, cfg.num_stages


# Backward tiles (BLOCK_M, BLOCK_N, num_warps, num_stages), preferred first, per
# width of the head-dim tiles (<= 64, 64 + 16, <= 128, larger).  A tile whose shared memory does not
# fit the device fails with OutOfResources before anything runs (so the atomics
# never double-count) and the next one is tried; the first that fits is
# remembered per kernel specialisation.  Registers, spills and shared memory of
# each on sm_90: benchmarks/profiling/sm90_profile.py.
_BWD_DKDV_TILES_BY_D = {
    # The 64-row tile spills on sm_90 at D = 52/64; the 32-row one does not
    # and issues fewer instructions per score.
    64: [(32, 64, 8, 1), (32, 64, 4, 1), (32, 32, 4, 1), (16, 32, 4, 1)],
    # 64 + 16 (D = 72, 80): the 32-key tiles of the 128 list spill with the two head-dim tiles.
    80: [(32, 64, 8, 1), (16, 64, 4, 1)],
    128: [(32, 64, 8, 1), (32, 32, 4, 1), (16, 32, 4, 1)],
    256: [(32, 32, 8, 1), (16, 32, 4, 1)],
}
_BWD_DQ_TILES_BY_D = {
    64: [(128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 1), (32, 32, 4, 1)],
    # 64 + 16 (D = 72, 80): the 32-key tile issues ~40% fewer instructions per score.
    80: [(64, 32, 4, 1), (64, 64, 8, 2), (32, 32, 4, 1), (16, 32, 4, 1)],
    128: [(64, 64, 8, 2), (64, 32, 4, 1), (32, 32, 4, 1), (16, 32, 4, 1)],
    256: [(32, 32, 8, 1), (16, 32, 4, 1)],
}
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
    if dtype == torch.float32 and not allow_tf32():
        return "ieee"
    return "tf32"


def _strides4(t: Optional[torch.Tensor], shape=None):
    if t is None:
        return (0, 0, 0, 0)
    st = list(t.stride())
    # Broadcast (size-1) dims are read with stride 0.
    return tuple(0 if t.shape[i] == 1 else st[i] for i in range(4))


def _head_blocks(D: int):
    """(BLOCK_D, BLOCK_D2): the head dim as one power-of-two tile, or above 64
    as a power-of-two tile plus a narrower tail tile when that wastes less
    MMA work (72 = 64 + 16 with 8 valid lanes, 90% useful, instead of 128,
    56%).  At D <= 64 one tile (52 on 64)."""
    full = max(16, next_power_of_2(D))
    if D > 64 and D != full:
        head = full // 2
        tail = max(16, next_power_of_2(D - head))
        if head + tail < full:
            return head, tail
    return full, 0


def _fold_scale(scale: float) -> bool:
    """The scale can be folded (table stored divided by it, applied in the exp2
    FFMA): positive, and neither it nor its inverse extreme."""
    return 2.0 ** -30 < scale < 2.0 ** 30


class _GridCache:
    """Grid tables derived from source tensors (table, AMM, positions), reused while every source
    is the same live object with the same version counter and data pointer.  Who may reuse an
    entry (:func:`_grid_args`): the backward, the forward's tables; a later call, only when no
    source takes a gradient (a frozen table, the AMM, positions), since a fused optimizer step
    (``fused=True``) writes parameters without bumping their version counter.  Sources are held by
    weak references; inference tensors (no version counter) are never cached, nor is anything
    built under CUDA-graph capture (the graph must rebuild the tables it reads at every replay).
    A write through ``.data`` bypasses the version counter: after one, call ``_grid_cache.clear()``."""

    LIMIT = 512  # entries; dead ones are dropped first when it is reached

    def __init__(self):
        self._entries: dict = {}

    @staticmethod
    def _state(t):
        return None if t is None else (t._version, t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)

    def get(self, sources, params):
        entry = self._entries.get((tuple(map(id, sources)), params))
        if entry is None:
            return None
        refs, states, value = entry
        for t, ref, st in zip(sources, refs, states):
            if t is not None and (ref() is not t or self._state(t) != st):
                return None
        return value

    def put(self, sources, params, value):
        if len(self._entries) >= self.LIMIT:
            self._entries = {k: e for k, e in self._entries.items()
                             if all(r is None or r() is not None for r in e[0])}
            if len(self._entries) >= self.LIMIT:
                self._entries.clear()
        refs = tuple(None if t is None else weakref.ref(t) for t in sources)
        self._entries[(tuple(map(id, sources)), params)] = (refs, tuple(map(self._state, sources)), value)

    def clear(self):
        self._entries.clear()


_grid_cache = _GridCache()
_arange_u: dict = {}  # (N, cols, device) -> the grid indices of tokens 0..N-1
_pre: dict = {}  # (scale, fold, device) -> float64 [forward factor, backward factor]


def _cacheable(ts, q) -> bool:
    return not _capturing(q) and not any(t is not None and t.is_inference() for t in ts)


def _build_grid(table, positions, amm_table, rows, cols, scale, H, device, fold):
    """``(tab, tab_bwd, u)`` by one launch of ``_amm_attn_grid_kernel``: the forward's table
    (divided by the scale when ``fold``, else times log2 e), the backward's (times log2 e; the
    same tensor when ``fold`` is off) and the grid indices of ``positions`` (None without)."""
    n_table = (2 * rows - 1) * (2 * cols - 1)
    key = (float(scale), fold, device)
    pre = _pre.get(key)
    if pre is None:
        pre = _pre[key] = torch.tensor([1.0 / scale if fold else _LOG2E, _LOG2E], dtype=torch.float64,
                                       device=device)
    packed = table is not None and amm_table is not None
    shape = (H, n_table) if table is not None else (n_table,)
    dtype = torch.int64 if packed else torch.float32
    tab = torch.empty(shape, device=device, dtype=dtype)
    tab2 = torch.empty(shape, device=device, dtype=dtype) if fold and table is not None else tab
    amm = None if amm_table is None else amm_table.reshape(n_table)
    n_pos = 0 if positions is None else positions.numel()
    u = None if positions is None else torch.empty(positions.shape, device=device, dtype=torch.int32)
    pos2 = None if positions is None else (positions if positions.dim() == 2 else positions[None])
    block = 1024
    n_tab = n_table * (H if table is not None else 1)
    _amm_attn_grid_kernel[(cdiv(n_tab, block) + cdiv(n_pos, block),)](
        _dummy(table, pre), _dummy(amm, pre), _dummy(positions, pre), pre, tab, tab2, _dummy(u, tab),
        *(table.stride() if table is not None else (0, 0)), *(pos2.stride() if pos2 is not None else (0, 0)),
        n_table, H, pos2.shape[1] if pos2 is not None else 1, n_pos, cols, rows * cols,
        HAS_TABLE=table is not None, HAS_AMM=amm_table is not None, HAS_POS=n_pos > 0,
        TWO=tab2 is not tab, BLOCK=block, num_warps=4)
    return tab, tab2, u


def _grid_args(table, positions, amm_table, rows, cols, scale, H, N, device, backward=False, q=None):
    """Per-call tables of the grid terms (float32/int32, so exactness is kept):

    - ``tab``: the per-offset table, head-major ``[H, n_table]``: with table and
      AMM each entry is one 64-bit word, the table value in its low and the AMM
      in its high float32 half; with one of them the plain float32 table
      ``[H, n_table]`` or AMM ``[n_table]`` (head stride 0).  The table is stored
      divided by the scale when it is folded, else times log2(e).
    - ``u``: each token's grid index ``row * (2 cols - 1) + col`` (int32,
      ``[B, N]`` with per-batch positions, else ``[N]`` with batch stride 0).
    The kernels gather ``tab[h, idx_off + u_j - u_i]``, i.e. offset ``u_i - u_j``.
    ``backward=True``: the backward's form (the scale unfolded whatever its value).

    Both tables and ``u`` come from one launch of ``_amm_attn_grid_kernel`` and are kept in
    ``_grid_cache`` (see there): a forward builds the backward's table too, and the backward
    finds it; a forward reuses a table built by an earlier call only when no source takes a
    gradient.  Without positions ``u`` is the same for every call of a given ``(N, cols)`` and
    built once per device."""
    has_grid = table is not None or amm_table is not None
    fold_fwd = _fold_scale(scale)
    fold = fold_fwd and not backward
    n_table = (2 * rows - 1) * (2 * cols - 1)
    idx_off = (rows - 1) * (2 * cols - 1) + (cols - 1)
    tab, u, stride_th, stride_ub = None, None, 0, 0
    if has_grid:
        sources = (table, amm_table, positions)
        params = (rows, cols, float(scale), H, N, device)
        cache = _cacheable(sources, q if q is not None else table if table is not None else amm_table)
        reuse = cache and (backward or not any(t is not None and t.requires_grad for t in sources))
        got = _grid_cache.get(sources, params) if reuse else None
        if got is None:
            got = _build_grid(table, positions, amm_table, rows, cols, scale, H, device, fold_fwd)
            if cache:
                _grid_cache.put(sources, params, got)
        tab = got[0] if fold else got[1]
        u = got[2]
        if u is None:
            key = (N, cols, device)
            u = _arange_u.get(key)
            if u is None:
                p = torch.arange(N, device=device, dtype=torch.int32)
                u = ((p // cols) * (2 * cols - 1) + p % cols).to(torch.int32)
                if _cacheable((), table if table is not None else amm_table):
                    _arange_u[key] = u
        stride_th = n_table if table is not None else 0
        stride_ub = u.stride(0) if u.dim() == 2 else 0
    return dict(has_grid=has_grid, fold=fold, idx_off=idx_off, tab=tab, u=u, stride_th=stride_th,
                stride_ub=stride_ub, qk_scale=scale * _LOG2E, bias_scale=(1.0 / scale if fold else _LOG2E))


def _dummy(t: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return t if t is not None else like


_flag_sets: dict = {}  # what _flags depends on -> (flags, their sorted items)


def _flags(g: dict, q, bias, modulation, amm_table, table, D: int, align: int):
    """The kernels' compile-time flags (read-only: shared by calls) and their items
    as a hashable key."""
    key = (g["has_grid"], g["fold"], table is not None, amm_table is not None, bias is not None,
           modulation is not None, q.dtype, D, align, allow_tf32())
    got = _flag_sets.get(key)
    if got is None:
        block_d, block_d2 = _head_blocks(D)
        flags = dict(HAS_GRID=g["has_grid"], HAS_TABLE=table is not None, HAS_AMM=amm_table is not None,
                     HAS_BIAS=bias is not None, HAS_MOD=modulation is not None, FOLD=g["fold"],
                     DOT_PRECISION=_dot_precision(q.dtype), BLOCK_D=block_d, BLOCK_D2=block_d2, HEAD_DIM=D,
                     ALIGN=align)
        got = _flag_sets[key] = (flags, tuple(sorted(flags.items())))
    return got


def amm_attention_forward(q, k, v, table, positions, amm_table, bias, modulation, scale, rows, cols,
                          out=None, lse=None):
    """Launch the forward kernel; returns ``(out, lse)`` (natural-log LSE, float32).
    ``out``/``lse`` may be given preallocated (tests poison them)."""
    B, H, N, D = q.shape
    out = _empty_like_out(q) if out is None else out
    lse = torch.empty((B, H, N), device=q.device, dtype=torch.float32) if lse is None else lse
    if B * H * N == 0:
        return out, lse
    BLOCK_M, BLOCK_N, _, warps, stages = _block_sizes(N, D, q)
    g = _grid_args(table, positions, amm_table, rows, cols, scale, H, N, q.device, q=q)
    flags, flag_items = _flags(g, q, bias, modulation, amm_table, table, D, alignment(q, k, v))
    n_bucket = next_power_of_2(N)
    key = (n_bucket, q.dtype, q.device, flag_items)
    tiles = dict(BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=warps, num_stages=stages)
    autotuned = isinstance(_fwd_kernel, triton.runtime.Autotuner)
    if autotuned and not _capturing(q):
        tiles = {}
        launch = _fwd_kernel[lambda meta: (B * H * cdiv(N, meta["BLOCK_M"]),)]
    else:
        # No autotuning under CUDA-graph capture: the config tuned earlier for
        # this key, else the heuristic tiles.
        cfg = _fwd_choice.get(key)
        if cfg is not None:
            tiles = dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        plain = _amm_attn_fwd_kernel if autotuned else _fwd_kernel
        launch = plain[(B * H * cdiv(N, tiles["BLOCK_M"]),)]
    launch(
        q, k, v, out, lse,
        _dummy(g["tab"], q), _dummy(g["u"], q), _dummy(bias, q), _dummy(modulation, q),
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        g["stride_th"], g["stride_ub"], *_strides4(bias), *_strides4(modulation),
        H, N, n_bucket, g["qk_scale"], g["bias_scale"], g["idx_off"], **flags, **tiles,
    )
    if autotuned and not tiles and getattr(_fwd_kernel, "best_config", None) is not None:
        _fwd_choice[key] = _fwd_kernel.best_config
    return out, lse


# Table gradient without per-sample positions (the offset index of a tile is the
# same for every batch element): _amm_attn_bwd_dtable_kernel sums dS over the
# batch in registers and adds one atomic per (head, query, key) instead of one
# per (batch, head, query, key) in the dK/dV kernel.  Tiles as for the other
# backward kernels (preferred first, per width of the head-dim tiles).  On
# sm_90 (benchmarks/profiling/sm90_profile.py): at D <= 64 the 4-warp 64 x 64 tile
# reaches 255 registers and spills at D = 52 or with a dense bias, the 8-warp
# one does not; at 64 + 16 (D = 72) the 32 x 64 tile is the one that fits
# without spilling and with the fewest instructions per score; at 128 the
# 2-stage 64 x 64 tile needs more shared memory than a block may use.
_BWD_DTABLE_TILES_BY_D = {
    64: [(64, 64, 8, 2), (64, 64, 8, 1), (32, 64, 4, 1)],
    80: [(32, 64, 4, 2), (32, 64, 4, 1), (16, 64, 4, 1)],
    128: [(64, 64, 8, 1), (32, 64, 4, 1), (16, 32, 4, 1)],
    256: [(32, 64, 8, 1), (16, 32, 4, 1)],
}


_ZERO_BLOCK = 1024  # elements of the table gradient each clearing program of the Delta kernel writes


def _batch_shared_offsets(positions) -> bool:
    """The grid offsets of every (query, key) pair are the same for all batch elements."""
    return positions is None or positions.dim() == 1


_sm_count: dict = {}


def _dtable_batch_per_program(B: int, programs: int, q: torch.Tensor) -> int:
    """Batch elements each dtable program sums: all of them when the
    (head, query block, key block) programs alone fill the GPU's SMs, else the
    batch is split into as many chunks as fill them (each chunk adds its own
    atomics)."""
    if not _on_gpu(q):
        return B
    sms = _sm_count.get(q.device)
    if sms is None:  # CPU tensors here: the sm_90 profile, which compiles for an H100 (132 SMs)
        sms = _sm_count[q.device] = (torch.cuda.get_device_properties(q.device).multi_processor_count
                                     if q.device.type == "cuda" else 132)
    chunks = min(B, max(1, -(-sms // programs)))
    return -(-B // chunks)


def amm_attention_backward(dout, q, k, v, out, lse, table, positions, amm_table, bias, modulation,
                           scale, rows, cols, need_dtable, need_dbias, grads=None):
    """Launch the backward kernels; returns ``(dq, dk, dv, dtable, dbias)``.
    ``grads`` may give preallocated ``(dq, dk, dv)`` of shape ``[B, H, N, D]`` with any
    strides, e.g. the views of one ``[B, N, 3, H, D]`` dqkv buffer (tests poison them)."""
    B, H, N, D = q.shape
    if grads is None:
        grads = [torch.empty((B, H, N, D), device=q.device, dtype=q.dtype) for _ in range(3)]
    dq, dk, dv = grads
    # The table gradient is accumulated into: the Delta kernel clears it (no launch of its own).
    dtable = (torch.empty(table.shape, device=q.device, dtype=torch.float32) if need_dtable
              else q.new_empty((0,), dtype=torch.float32))
    dbias = (torch.zeros(bias.shape, device=q.device, dtype=torch.float32) if need_dbias
             else q.new_empty((0,), dtype=torch.float32))
    if B * H * N == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), dtable.zero_(), dbias
    BLOCK_M, BLOCK_N, BLOCK_D, warps, stages = _block_sizes(N, D, q)
    # Delta_i = dO_i . O_i (O includes the modulation, see module docstring), in a
    # Triton preprocess kernel.
    delta = torch.empty((B, H, N), device=q.device, dtype=torch.float32)
    dm = 64 if _on_gpu(q) else BLOCK_M
    zero = dict(zero_ptr=dtable, n_zero=dtable.numel(), ZERO_BLOCK=_ZERO_BLOCK) if need_dtable else {}
    n_zero_programs = cdiv(dtable.numel(), _ZERO_BLOCK) if need_dtable else 0
    _amm_attn_bwd_delta_kernel[(B * H * cdiv(N, dm) + n_zero_programs,)](
        out, dout, delta, H, N, *out.stride(), *dout.stride(), BLOCK_M=dm, BLOCK_D=BLOCK_D, HEAD_DIM=D,
        ALIGN=alignment(out, dout), num_warps=4, **zero)
    lse = lse.contiguous()
    # The backward kernels take the unfolded scores (scaled dot + table * log2 e): in their
    # SASS the fold saves nothing, and this form keeps the table gradient's rounding noise
    # lower (it sums dS terms that cancel, e.g. to exactly 0 on a 1 x 1 grid).
    g = _grid_args(table, positions, amm_table, rows, cols, scale, H, N, q.device, backward=True, q=q)
    flags, _ = _flags(g, q, bias, modulation, amm_table, table, D, alignment(q, k, v, dout))
    width = flags["BLOCK_D"] + flags["BLOCK_D2"]
    ptrs = (_dummy(g["tab"], q), _dummy(g["u"], q), _dummy(bias, q), _dummy(modulation, q))
    strides = (*q.stride(), *k.stride(), *v.stride(), *dout.stride(), g["stride_th"], g["stride_ub"],
               *_strides4(bias), *_strides4(modulation))
    dtstr = (dtable.stride(0), dtable.stride(1)) if need_dtable else (0, 0)
    scales = (g["qk_scale"], g["bias_scale"], scale, g["idx_off"])
    cpu_tiles = (BLOCK_M, BLOCK_N, warps, stages)
    # Batch-independent offsets: the table gradient is pre-reduced over the batch by its own kernel.
    dtable_apart = need_dtable and _batch_shared_offsets(positions)
    _launch_tiled(
        _amm_attn_bwd_dkdv_kernel, _bwd_tiles(_BWD_DKDV_TILES_BY_D, width, positions is not None), cpu_tiles,
        lambda bm, bn: B * H * cdiv(N, bn),
        (q, k, v, dout, lse, delta, dk, dv, *ptrs, _dummy(dtable if need_dtable else None, lse),
         _dummy(dbias if need_dbias else None, lse), *strides, *dtstr,
         *(_strides4(dbias) if need_dbias else (0, 0, 0, 0)), *dk.stride(), *dv.stride(),
         H, N, *scales),
        dict(NEED_DTABLE=need_dtable and not dtable_apart, NEED_DBIAS=need_dbias, **flags), q)
    if dtable_apart:
        tiles = _bwd_tiles(_BWD_DTABLE_TILES_BY_D, width)
        bm0, bn0 = tiles[0][:2] if _on_gpu(q) else cpu_tiles[:2]  # the batch split, sized on the first tile
        per_program = _dtable_batch_per_program(B, H * cdiv(N, bm0) * cdiv(N, bn0), q)
        _launch_tiled(
            _amm_attn_bwd_dtable_kernel, tiles, cpu_tiles,
            lambda bm, bn: H * cdiv(N, bm) * cdiv(N, bn) * cdiv(B, per_program),
            (q, k, v, dout, lse, delta, *ptrs, dtable, *strides, *dtstr,
             B, H, N, g["qk_scale"], g["bias_scale"], g["idx_off"], per_program),
            flags, q)
    _launch_tiled(
        _amm_attn_bwd_dq_kernel, _bwd_tiles(_BWD_DQ_TILES_BY_D, width), cpu_tiles,
        lambda bm, bn: B * H * cdiv(N, bm),
        (q, k, v, dout, lse, delta, dq, *ptrs, *strides, *dq.stride(), H, N, *scales),
        flags, q)
    return dq, dk, dv, dtable, dbias



# ============================================================================ op + backend

_apply = register_attention_op("amm_attention_triton", amm_attention_forward, amm_attention_backward)
# qkv [B, N, 3, H, D] in, dqkv written in place through the backward's grads= views
_apply_qkvpacked = register_attention_qkvpacked_op("amm_attention_triton", amm_attention_forward,
                                                   amm_attention_backward)


class TritonBackend(AttentionBackend):
    """Fused Triton kernels: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1."""

    name = "triton"
    dtypes = (torch.float16, torch.bfloat16, torch.float32)

    def unavailable_reason(self) -> Optional[str]:
        return triton_unavailable_reason()

    def not_supported_reasons(self, inp: AttentionInputs) -> List[str]:
        why = []
        if inp.device.type == "cpu" and not interpreting():
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

    def apply_qkvpacked(self, inp: AttentionInputs) -> torch.Tensor:
        return _apply_qkvpacked(*inp.packed_kernel_args())


register_backend(TritonBackend(), auto_rank=0)
