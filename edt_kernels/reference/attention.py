"""Plain-PyTorch definition of ``amm_attention``.

    out = (softmax(q k^T * scale + T[idx(p_i, p_j), h] + bias) ⊙ M(p_i, p_j) ⊙ W) v

with ``T`` the learned relative-position table (SPEC 2), ``p`` the grid
positions of the tokens, ``M`` EDT's AMM (SPEC 3, after the softmax, no
renormalisation), ``bias`` a dense additive bias and ``W`` a dense
post-softmax ``modulation``.  Every backend is tested against this function;
it materialises everything and is meant for float64 ground truth and small
problems.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from ..amm import AMM, GridLike, amm_offset_table, normalize_grid, relative_position_index

__all__ = ["reference_attention", "reference_attention_lse"]


def _positions_or_arange(positions: Optional[torch.Tensor], n_tokens: int, device) -> torch.Tensor:
    if positions is None:
        return torch.arange(n_tokens, device=device)
    return positions.to(device=device, dtype=torch.long)


def reference_scores(q, k, *, scale=None, rel_pos_bias=None, grid=None, positions=None, bias=None):
    """Pre-softmax scores ``[B, H, N, N]`` in q's dtype."""
    B, H, N, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    s = torch.matmul(q, k.transpose(-2, -1)) * scale
    if rel_pos_bias is not None:
        rows, cols = normalize_grid(grid if grid is not None else _square_side(N))
        pos = _positions_or_arange(positions, N, q.device)
        idx = relative_position_index((rows, cols), pos)  # [N, N] or [B, N, N]
        tb = rel_pos_bias.to(s.dtype)[idx]  # [..., N, N, H]
        tb = tb.movedim(-1, -3)  # [..., H, N, N]
        s = s + tb
    if bias is not None:
        s = s + bias.to(s.dtype)
    return s


def _square_side(n_tokens: int) -> int:
    side = int(round(n_tokens ** 0.5))
    if side * side != n_tokens:
        raise ValueError(f"grid not given and N={n_tokens} is not a square: pass grid=(rows, cols)")
    return side


def reference_modulation(q, *, grid=None, positions=None, amm=None, modulation=None):
    """The dense post-softmax multiplier (AMM ⊙ modulation), or None."""
    B, H, N, D = q.shape
    w = None
    if amm is not None and amm is not False:
        rows, cols = normalize_grid(grid if grid is not None else _square_side(N))
        pos = _positions_or_arange(positions, N, q.device)
        table = amm_offset_table((rows, cols), amm, device=q.device, dtype=torch.float64)
        w = table[relative_position_index((rows, cols), pos)].to(q.dtype)  # [N, N] or [B, N, N]
        if w.dim() == 3:
            w = w[:, None]
    if modulation is not None:
        w = modulation.to(q.dtype) if w is None else w * modulation.to(q.dtype)
    return w


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                        scale: Optional[float] = None,
                        rel_pos_bias: Optional[torch.Tensor] = None,
                        grid: Optional[GridLike] = None,
                        positions: Optional[torch.Tensor] = None,
                        amm: Union[None, bool, AMM] = None,
                        bias: Optional[torch.Tensor] = None,
                        modulation: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Materialising reference; same arguments as ``amm_attention``.

    Computes in the dtype of ``q`` (give it float64 tensors for ground truth).
    Differentiable in q, k, v, rel_pos_bias and bias through autograd.
    """
    s = reference_scores(q, k, scale=scale, rel_pos_bias=rel_pos_bias, grid=grid,
                         positions=positions, bias=bias)
    p = torch.softmax(s, dim=-1)
    w = reference_modulation(q, grid=grid, positions=positions, amm=amm, modulation=modulation)
    if w is not None:
        p = p * w
    return torch.matmul(p, v.to(p.dtype))


def reference_attention_lse(q, k, *, scale=None, rel_pos_bias=None, grid=None,
                            positions=None, bias=None) -> torch.Tensor:
    """Natural-log log-sum-exp of each score row, ``[B, H, N]``: what the
    forward kernels save for the backward."""
    s = reference_scores(q, k, scale=scale, rel_pos_bias=rel_pos_bias, grid=grid,
                         positions=positions, bias=bias)
    return torch.logsumexp(s, dim=-1)
