"""Plain-PyTorch definitions of the token kernels of masked diffusion training.

MDT / MDTv2 (Gao et al., 2023) and EDT (Chen et al., 2024) move whole token
rows around: random masking keeps a per-sample random subset of the tokens,
the side-interpolater puts them back in place with a learned mask token in the
holes, and EDT's down-sampling merges 2x2 patches before a LayerNorm and an
adaLN modulation.  These functions are written from the published maths (no
code copied) and are what the Triton kernels in ``edt_kernels.ops.tokens`` are
tested against; autograd comes from PyTorch.

Shapes: ``x`` is ``[B, L, C]`` (batch, tokens, channels), index tensors are
int64 ``[B, K]`` or ``[B, L]``.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from .._validation import infer_grid
from ..amm import GridLike, normalize_grid

__all__ = [
    "reference_random_masking",
    "reference_sort_kept_ids",
    "reference_gather_tokens",
    "reference_scatter_tokens",
    "reference_unshuffle_with_mask_token",
    "reference_masked_shortcut",
    "merged_keep_multiplier",
    "reference_patch_merge",
    "reference_patch_merge_modulate",
]


def reference_sort_kept_ids(ids_shuffle: torch.Tensor, len_keep: int) -> torch.Tensor:
    """A per-row permutation ``[B, L]`` with its first ``len_keep`` entries
    sorted ascending and, after them, the others sorted ascending."""
    return torch.cat([ids_shuffle[:, :len_keep].sort(dim=1).values,
                      ids_shuffle[:, len_keep:].sort(dim=1).values], dim=1)


def reference_random_masking(x: torch.Tensor, mask_ratio: Union[float, torch.Tensor, None] = None,
                             generator: Optional[torch.Generator] = None, sort_kept: bool = False, *,
                             len_keep: Optional[int] = None, noise: Optional[torch.Tensor] = None
                             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """MDT's per-sample random masking with the final ratio ``mask_ratio``.

    ``len_keep = int(L * (1 - mask_ratio))``; per sample, uniform noise
    ``rand(B, L)`` (drawn from ``generator`` on x's device) is argsorted into
    ``ids_shuffle``, ``ids_restore = argsort(ids_shuffle)``, the first
    ``len_keep`` shuffled tokens are kept.  ``sort_kept``: ``ids_shuffle``
    reordered by :func:`reference_sort_kept_ids` first (the same kept set in
    ascending position order).  ``len_keep`` (instead of ``mask_ratio``) and
    ``noise`` (instead of the draw) give them drawn ahead.  Returns ``(x_kept [B, K, C],
    mask [B, L] (1 = removed, original order, default float dtype),
    ids_restore [B, L], ids_keep [B, K])``.
    """
    B, L, C = x.shape
    if len_keep is None:
        len_keep = int(L * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(B, L, device=x.device, generator=generator)
    ids_shuffle = torch.argsort(noise, dim=1)
    if sort_kept:
        ids_shuffle = reference_sort_kept_ids(ids_shuffle, len_keep)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(B, len_keep, C))
    mask = torch.ones(B, L, device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return x_kept, mask, ids_restore, ids_keep


def reference_gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``out[b, k] = x[b, ids[b, k]]``: ``[B, L, C]``, ``[B, K]`` -> ``[B, K, C]``."""
    B, K = ids.shape
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(B, K, x.shape[-1]))


def reference_scatter_tokens(y: torch.Tensor, ids: torch.Tensor, length: int) -> torch.Tensor:
    """Inverse of the gather for unique ``ids``: ``out[b, ids[b, k]] = y[b, k]``,
    zeros elsewhere; ``[B, K, C]`` -> ``[B, length, C]``."""
    B, K, C = y.shape
    out = y.new_zeros(B, length, C)
    return out.scatter(1, ids.unsqueeze(-1).expand(B, K, C), y)


def reference_unshuffle_with_mask_token(x_kept: torch.Tensor, ids_restore: torch.Tensor,
                                        mask_token: torch.Tensor,
                                        pos_embed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """MDT's side-interpolater input: append ``L - K`` copies of ``mask_token``
    (``[1, 1, C]``) to the kept tokens, unshuffle with ``ids_restore`` and add
    ``pos_embed`` (``[1, L, C]``).  Row ``l`` is ``x_kept[ids_restore[l]]`` when
    ``ids_restore[l] < K``, else the mask token."""
    B, K, C = x_kept.shape
    L = ids_restore.shape[1]
    dtype = torch.promote_types(x_kept.dtype, mask_token.dtype)
    filler = mask_token.reshape(1, 1, C).expand(B, L - K, C)
    full = torch.cat([x_kept.to(dtype), filler.to(dtype)], dim=1)
    out = torch.gather(full, 1, ids_restore.unsqueeze(-1).expand(B, L, C))
    if pos_embed is not None:
        out = out + pos_embed
    return out


def reference_masked_shortcut(x: torch.Tensor, x_before: torch.Tensor,
                              mask: torch.Tensor) -> torch.Tensor:
    """MDT's masked shortcut ``x * mask + (1 - mask) * x_before`` with ``mask``
    ``[B, L]`` (or ``[B, L, 1]``) broadcast over channels; ``x_before`` is
    ``[B, L, C]`` or ``[1, L, C]`` (EDT's pos-embed replacement)."""
    m = mask if mask.dim() == 3 else mask.unsqueeze(-1)
    if m.dtype == torch.bool:
        m = m.to(torch.promote_types(x.dtype, x_before.dtype))
    return x * m + (1 - m) * x_before


def reference_patch_merge(x: torch.Tensor, grid: Optional[GridLike] = None) -> torch.Tensor:
    """EDT's 2x2 patch merge (Swin's order): ``[B, H*W, C]`` on an ``H x W`` grid
    (row-major) -> ``[B, H*W/4, 4C]`` on the ``H/2 x W/2`` grid, channels in
    the order (even row, even col), (odd row, even col), (even row, odd col),
    (odd row, odd col)."""
    B, L, C = x.shape
    H, W = normalize_grid(grid if grid is not None else infer_grid(L, "L = x.shape[1]"))
    g = x.reshape(B, H, W, C)
    parts = [g[:, 0::2, 0::2], g[:, 1::2, 0::2], g[:, 0::2, 1::2], g[:, 1::2, 1::2]]
    return torch.cat(parts, dim=-1).reshape(B, (H // 2) * (W // 2), 4 * C)


def reference_patch_merge_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                                   keep_mask: Optional[torch.Tensor] = None,
                                   grid: Optional[GridLike] = None,
                                   eps: float = 1e-6) -> torch.Tensor:
    """EDT's down-sampling front end: patch merge -> LayerNorm(4C, no affine)
    -> ``* (1 + scale) + shift`` (``[B, 4C]``) -> ``* keep_mask``: ``[B, L/4]``
    (one value per merged token) or ``[B, L]`` (one per input token, zeroing
    its C channels of the merged vector: EDT's down-masking); None keeps all."""
    merged = reference_patch_merge(x, grid)
    out = F.layer_norm(merged, (merged.shape[-1],), eps=eps)
    out = out * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
    if keep_mask is not None:
        out = out * merged_keep_multiplier(keep_mask, x.shape[1], x.shape[-1], out.dtype, grid)
    return out


def merged_keep_multiplier(keep_mask: torch.Tensor, L: int, C: int, dtype: torch.dtype,
                           grid: Optional[GridLike] = None) -> torch.Tensor:
    """What :func:`reference_patch_merge_modulate` multiplies its ``[B, L/4, 4C]``
    rows by for ``keep_mask`` (in ``dtype``): ``[B, L/4, 1]`` for a mask per
    merged token, ``[B, L/4, 4C]`` for one per input token (the mask merged
    like the features, 1 channel each, then repeated over the C channels)."""
    if keep_mask.shape[1] == L and L != L // 4:
        sub = reference_patch_merge(keep_mask.unsqueeze(-1).to(dtype), grid)  # [B, L/4, 4]
        return sub.repeat_interleave(C, dim=-1)
    return keep_mask.unsqueeze(-1).to(dtype)
