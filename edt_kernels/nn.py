"""``nn.Module`` layer over :func:`edt_kernels.amm_attention`.

* :class:`RelativePositionBias` holds the learned BEiT/Swin/MDT/EDT table
  ``T[(2 rows - 1)(2 cols - 1) + extra, H]`` (state_dict key
  ``relative_position_bias_table``; the bias of tokens i, j of head h is
  ``T[idx(i, j), h]`` with ``idx`` the BEiT/Swin relative-position index) and
  can materialise the dense bias for eager code paths.
* :class:`AMMAttention` is a drop-in multi-head self-attention whose
  state_dict keys are exactly those of timm's ``Attention`` (``qkv.weight``,
  ``qkv.bias``, ``proj.weight``, ``proj.bias``) plus
  ``rel_pos_bias.relative_position_bias_table``: the published EDT attention
  weights (``blocks.i.attn.*``) and timm/DiT attention weights load into it
  unchanged; MDT's (which also stores ``relative_position_index``) load too,
  the index being checked against the layout.  ``persistent_index=True``
  saves the index as MDT's checkpoints do, and ``rel_pos_first=True`` lists
  the table before ``qkv`` as EDT's do, so that the project's EDT and MDTv2
  models have the published state dicts key for key.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ._validation import check_tensor, coerce_amm
from .amm import KEEP, AMMLike, GridLike, normalize_grid, num_offsets, relative_position_index
from .attention import amm_attention_qkvpacked

__all__ = ["RelativePositionBias", "AMMAttention"]


class RelativePositionBias(nn.Module):
    """Learned relative-position bias table ``[(2 rows - 1)(2 cols - 1) + extra, H]``.

    ``extra_tokens`` rows are appended after the grid offsets (MDT has 3 unused
    ones, EDT none).  The fused kernels read the table directly; ``forward``
    builds the dense ``[H, N, N]`` (or ``[B, H, N, N]`` for ``positions [B, N]``)
    bias for eager code paths and tests.  ``persistent_index=True`` adds the
    (fixed) ``relative_position_index [N, N]`` to the state dict, as MDT's
    checkpoints have it; it is computed from the grid, never learned.
    """

    def __init__(self, grid: GridLike, num_heads: int, extra_tokens: int = 0,
                 persistent_index: bool = False):
        super().__init__()
        if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads < 1:
            raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
        if not isinstance(extra_tokens, int) or isinstance(extra_tokens, bool) or extra_tokens < 0:
            raise ValueError(f"extra_tokens must be a non-negative int, got {extra_tokens!r}")
        self.grid = normalize_grid(grid)
        self.num_heads = num_heads
        self.extra_tokens = extra_tokens
        self.persistent_index = bool(persistent_index)
        self.relative_position_bias_table = nn.Parameter(
            torch.empty(num_offsets(self.grid) + extra_tokens, num_heads))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    def relative_position_index(self, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The published index ``[N, N]`` (``[..., N, N]`` for ``positions``)."""
        return relative_position_index(self.grid, positions,
                                       device=self.relative_position_bias_table.device)

    def forward(self, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Dense bias: ``[H, N, N]``, or ``[B, H, N, N]`` for ``positions [B, N]``."""
        idx = self.relative_position_index(positions)
        return self.relative_position_bias_table[idx].movedim(-1, -3)

    def extra_repr(self) -> str:
        return f"grid={self.grid}, num_heads={self.num_heads}, extra_tokens={self.extra_tokens}"

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.persistent_index:
            destination[prefix + "relative_position_index"] = self.relative_position_index()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # MDT checkpoints also store the (fixed) index as a buffer: accept it when it
        # is the layout we compute, refuse it otherwise.
        key = prefix + "relative_position_index"
        if key not in state_dict and self.persistent_index and strict:
            missing_keys.append(key)
        if key in state_dict:
            idx = state_dict.pop(key)
            want = relative_position_index(self.grid)
            if tuple(idx.shape) != tuple(want.shape) or not torch.equal(idx.cpu().long(), want):
                error_msgs.append(
                    f"{key}: the checkpoint's relative_position_index (shape {tuple(idx.shape)}) is not "
                    f"the BEiT/Swin layout for grid {self.grid}; it cannot be loaded into {type(self).__name__}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class AMMAttention(nn.Module):
    """Multi-head self-attention computed by :func:`edt_kernels.amm_attention_qkvpacked`::

        out = proj((softmax(q k^T * scale + T[idx(p_i, p_j)]) ⊙ M(p_i, p_j)) v)

    with ``T`` the relative-position table (when ``rel_pos``), ``p`` the grid
    positions of the tokens and ``M`` EDT's Attention Modulation Matrix (when
    the module's ``amm`` is set and active).

    Args:
        dim: channels C of the input ``[B, N, C]``.
        num_heads: heads H; head dim ``C // H``.
        qkv_bias: bias in the fused ``qkv`` projection (timm default False;
            DiT, MDT and EDT use True).
        grid: token grid ``n`` or ``(rows, cols)``; required with ``rel_pos``.
        rel_pos: learn a relative-position bias table (EDT/MDT).
        extra_tokens: extra table rows (MDT: 3).
        amm: default EDT Attention Modulation Matrix: ``None``/``False``,
            ``True`` (published) or an ``AMM(...)`` config.
        amm_eval_only: apply ``amm`` only in eval mode (the published EDT does
            so).
        qk_scale: softmax scale, default ``head_dim ** -0.5``.
        attn_drop: must be 0 (the fused kernels have no attention dropout).
        proj_drop, proj_bias: as timm.
        backend: ``amm_attention`` backend ("auto", "triton", "cpp", "torch",
            or "eager": the published materialising code path).
        persistent_index: save ``rel_pos_bias.relative_position_index`` in the
            state dict (MDT's checkpoints).
        rel_pos_first: register ``rel_pos_bias`` before ``qkv``/``proj``; this
            only orders the state-dict keys (EDT's checkpoints list it first).
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False,
                 grid: Optional[GridLike] = None, rel_pos: bool = True, extra_tokens: int = 0,
                 amm: AMMLike = None, amm_eval_only: bool = False, qk_scale: Optional[float] = None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, proj_bias: bool = True,
                 backend: str = "auto", persistent_index: bool = False, rel_pos_first: bool = False):
        super().__init__()
        if (not isinstance(dim, int) or not isinstance(num_heads, int) or dim < 1 or num_heads < 1
                or dim % num_heads):
            raise ValueError(f"dim must be a positive multiple of num_heads (a positive int), got dim={dim!r}, "
                             f"num_heads={num_heads!r}")
        if attn_drop != 0:
            raise ValueError(f"attn_drop must be 0: the fused attention has no dropout on the "
                             f"attention weights (got {attn_drop})")
        if rel_pos and grid is None:
            raise ValueError("grid (n or (rows, cols)) is required when rel_pos=True")
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a str, got {type(backend).__name__}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = float(qk_scale) if qk_scale is not None else self.head_dim ** -0.5
        self.grid = normalize_grid(grid) if grid is not None else None
        self.amm = coerce_amm(amm)
        self.amm_eval_only = bool(amm_eval_only)
        self.backend = backend

        def make_rel_pos_bias():
            return (RelativePositionBias(self.grid, num_heads, extra_tokens, persistent_index)
                    if rel_pos else None)

        if rel_pos_first:
            self.rel_pos_bias = make_rel_pos_bias()
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)
        if not rel_pos_first:
            self.rel_pos_bias = make_rel_pos_bias()

    def amm_active(self) -> bool:
        """Whether a forward now applies the module's AMM (set, and not
        switched off by ``amm_eval_only`` in training mode)."""
        return self.amm is not None and not (self.training and self.amm_eval_only)

    def forward(self, x: torch.Tensor, positions: Optional[torch.Tensor] = None,
                amm: AMMLike = KEEP) -> torch.Tensor:
        """``x [B, N, C]`` -> ``[B, N, C]``.

        ``positions``: ``[B, N]``/``[N]`` flat grid indices of the tokens
        (MDT's ``ids_keep``); ``amm``: per-call override of the module's AMM
        (``KEEP``, the default, keeps the module's setting; ``None``/``False``
        switches it off; ``True``/``AMM(...)`` switches it on).
        """
        check_tensor("x", x, 3, "[B, N, C]")
        B, N, C = x.shape  # (B, N, C)
        if C != self.dim:
            raise ValueError(f"x must be [B, N, C] with C = {self.dim}, got {list(x.shape)}")
        H, D = self.num_heads, self.head_dim
        qkv = self.qkv(x).reshape(B, N, 3, H, D)  # (B, N, 3, H, D), a view; its gradient is written in place
        if amm is KEEP:
            amm = self.amm if self.amm_active() else None
        table = self.rel_pos_bias.relative_position_bias_table if self.rel_pos_bias is not None else None
        out = amm_attention_qkvpacked(qkv, scale=self.scale, rel_pos_bias=table, grid=self.grid,
                                      positions=positions, amm=amm, backend=self.backend)  # (B, N, H, D)
        x = out.reshape(B, N, C)
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, grid={self.grid}, amm={self.amm}, "
                f"amm_eval_only={self.amm_eval_only}, backend={self.backend!r}")
