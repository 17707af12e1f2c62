"""Plain-PyTorch definition of ``amm_attention``.

    out = (softmax(q k^T * scale + T[idx(p_i, p_j), h] + bias) ⊙ M(p_i, p_j) ⊙ W) v

with ``T`` the learned relative-position table (BEiT/Swin layout, one row
per grid offset ``(dr + rows - 1) * (2 cols - 1) + (dc + cols - 1)``), ``p``
the grid positions of the tokens, ``M`` EDT's Attention Modulation Matrix
(applied after the softmax, without renormalisation), ``bias`` a dense
additive bias and ``W`` a dense post-softmax ``modulation``.

``reference_attention`` is the definition every backend is tested against; it
materialises everything and is meant for float64 ground truth and small
problems.  ``eager_attention`` is the authors' published code path op for op
(the ``"eager"`` backend of ``amm_attention``): the models' comparison runs
and the benchmarks' baseline.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch

from .._validation import coerce_amm, infer_grid
from ..amm import AMM, GridLike, amm_offset_table, cached_amm_offset_table, normalize_grid, relative_position_index

__all__ = ["reference_attention", "reference_attention_lse", "eager_attention", "eager_rel_pos_bias",
           "eager_modulation"]


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
    return infer_grid(n_tokens, "N")


def reference_modulation(q, *, grid=None, positions=None, amm=None, modulation=None):
    """The dense post-softmax multiplier (AMM ⊙ modulation), or None."""
    B, H, N, D = q.shape
    w = None
    amm = coerce_amm(amm)
    if amm is not None:
        rows, cols = normalize_grid(grid if grid is not None else _square_side(N))
        pos = _positions_or_arange(positions, N, q.device)
        table = cached_amm_offset_table((rows, cols), amm, device=q.device, dtype=torch.float64)  # read-only
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


# ----------------------------------------------------------------------------- the published eager path

def eager_rel_pos_bias(table: torch.Tensor, grid: GridLike,
                       positions: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The bias as MDT/EDT's ``RelativePositionBias`` materialises it every
    forward: ``table[relative_position_index.view(-1)]`` viewed ``[L, L, H]``
    and permuted to ``[1, H, L, L]``; for a token subset ``positions``
    ``[B, N]`` (MDT's ``ids_keep``), the published ``get_masked_rel_bias``:
    repeat over the batch, then one gather per token axis, ``[B, H, N, N]``.
    A 1-d ``positions`` ``[N]`` gives ``[1, H, N, N]``."""
    rows, cols = normalize_grid(grid)
    L, H = rows * cols, table.shape[1]
    index = relative_position_index((rows, cols), device=table.device)  # [L, L] buffer of the model
    bias = table[index.view(-1)].view(L, L, H).permute(2, 0, 1).contiguous()  # [H, L, L]
    if positions is None:
        return bias.unsqueeze(0)
    pos = positions.to(device=table.device, dtype=torch.long)
    if pos.dim() == 1:
        pos = pos.unsqueeze(0)
    B, N = pos.shape
    bias = bias.unsqueeze(0).repeat(B, 1, 1, 1)  # [B, H, L, L]
    bias = torch.gather(bias, 2, pos[:, None, :, None].expand(B, H, N, L))  # rows
    return torch.gather(bias, 3, pos[:, None, None, :].expand(B, H, N, N))  # cols: [B, H, N, N]


def eager_modulation(grid: GridLike, amm: Union[bool, AMM], positions: Optional[torch.Tensor] = None,
                     device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """EDT's dense AMM buffer ``[1, 1, L, L]`` (float32, the models' buffer; float64 on request),
    or at ``positions`` ``[B, 1, N, N]`` (a 1-d ``positions`` gives ``[1, 1, N, N]``)."""
    rows, cols = normalize_grid(grid)
    # Built on the CPU and moved, as the models build their AMM buffer.
    offsets = amm_offset_table((rows, cols), amm, device="cpu", dtype=dtype).to(device)
    index = relative_position_index((rows, cols), device=device)
    if positions is None:
        return offsets[index][None, None]
    pos = positions.to(device=index.device, dtype=torch.long)
    if pos.dim() == 1:
        pos = pos.unsqueeze(0)
    return offsets[index[pos[:, :, None], pos[:, None, :]]].unsqueeze(1)


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                    scale: Optional[float] = None,
                    rel_pos_bias: Optional[torch.Tensor] = None,
                    grid: Optional[GridLike] = None,
                    positions: Optional[torch.Tensor] = None,
                    amm: Union[None, bool, AMM] = None,
                    bias: Optional[torch.Tensor] = None,
                    modulation: Optional[torch.Tensor] = None,
                    dropout: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """The published MDT/EDT attention, op for op; same arguments as
    ``amm_attention``, plus the module's attention ``dropout`` layer (what the
    fused kernels cannot do: the patcher computes here a module whose attention
    dropout is active)::

        attn = (q @ k^T) * scale + bias_table     # q's dtype; + the table's dtype (promotes)
        attn = dropout(softmax(attn) * AMM)        # dense [.., N, N] AMM buffer
        out  = attn.to(v.dtype) @ v

    Every ``N x N`` tensor is materialised, as in the authors' code; under
    mixed precision (float16/bfloat16 q with a float32 table) the bias add,
    softmax and AMM multiply run in float32 like the authors' autocast code,
    and the product with v in v's dtype.  Returns q's dtype.
    """
    N = q.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    amm = coerce_amm(amm)
    g = grid if grid is not None or (rel_pos_bias is None and amm is None) else _square_side(N)
    attn = (q @ k.transpose(-2, -1)) * scale  # [B, H, N, N]
    if rel_pos_bias is not None:
        attn = attn + eager_rel_pos_bias(rel_pos_bias, g, positions)
    if bias is not None:
        attn = attn + bias
    attn = attn.softmax(dim=-1)
    if amm is not None:
        amm_dtype = torch.float64 if attn.dtype == torch.float64 else torch.float32
        attn = attn * eager_modulation(g, amm, positions, device=q.device, dtype=amm_dtype).to(attn.dtype)
    if modulation is not None:
        attn = attn * modulation.to(attn.dtype)
    if dropout is not None:
        attn = dropout(attn)
    return (attn.to(v.dtype) @ v).to(q.dtype)
