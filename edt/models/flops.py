"""Operation counts.

``edt_flops`` reproduces the EDT authors' ``get_flops()`` (the numbers behind
the paper's "2.66 / 10.20 / 51.83 GFLOPs" column): it counts the
multiply-accumulates (MACs) of every matrix product of one *batch-1*
inference forward and nothing else (no softmax, LayerNorm, GELU, bias add,
AMM multiply, embedding lookup).  Terms, with N_s tokens and width C_s at a
block's grid, cond width D, heads H, MLP width 4C:

- patch embedding ``N * p^2 * C_in * D``; timestep MLP ``256 D + D^2``;
  final layer ``2 D^2 + N * D * p^2 C_out``;
- block: adaLN ``6 C D``, qkv ``3 N C^2``, scores ``N^2 C``, weights x values
  ``N^2 C``, proj ``N C^2``, MLP ``8 N C^2``;
- down-sampling: adaLN ``8 C D`` + reduction ``(N/4) 4C C_out``; up-sampling
  ``N C 4 C_out``; concat: adaLN ``4 C D`` + ``N 2C C``.

``mdt_flops`` applies the same convention to MDTv2 (encoder + decoder; the
side-interpolater runs only in masked training and is not counted), adding
the long-skip projections ``N 2C C``.  ``measured_macs`` counts the matmul
MACs actually executed, with ``torch.utils.flop_counter`` on the meta device.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .common import EAGER

__all__ = ["edt_flops", "mdt_flops", "measured_macs"]


def _block_macs(tokens: int, width: int, heads: int, cond: int, mlp_hidden: int) -> int:
    head_dim = width // heads
    adaln = cond * 6 * width
    qkv = tokens * width * 3 * width
    scores = heads * tokens * head_dim * tokens
    weighted = heads * tokens * tokens * head_dim
    proj = tokens * width * width
    mlp = 2 * tokens * width * mlp_hidden
    return adaln + qkv + scores + weighted + proj + mlp


def _stem_macs(model: nn.Module) -> int:
    N = model.x_embedder.num_patches
    p = model.patch_size
    D = model.hidden_size
    x_embed = N * p * p * model.in_channels * D
    t_embed = model.t_embedder.frequency_embedding_size * D + D * D
    final = D * 2 * D + N * D * (p * p * model.out_channels)
    return x_embed + t_embed + final


def edt_flops(model: nn.Module) -> int:
    """The EDT authors' count for an :class:`edt.models.EDT` (MACs, batch 1)."""
    total = _stem_macs(model)
    D = model.hidden_size
    for blk in model.blocks:
        total += _block_macs(blk.grid ** 2, blk.hidden_size, blk.attn.num_heads, D, blk.mlp.fc1.out_features)
    for blk in model.concat_blocks:
        total += blk.cond_dim * 4 * blk.hidden_size + blk.grid ** 2 * 2 * blk.hidden_size * blk.hidden_size
    for blk in model.down_blocks:
        total += blk.cond_dim * 8 * blk.hidden_size + blk.out_grid ** 2 * 4 * blk.hidden_size * blk.out_hidden_size
    for blk in model.up_blocks:
        total += blk.grid ** 2 * blk.hidden_size * 4 * blk.out_hidden_size
    return int(total)


def mdt_flops(model: nn.Module, include_skip: bool = True) -> int:
    """The same convention for :class:`edt.models.MDTv2` (inference path).
    ``include_skip=False`` leaves out the long-skip projections, which gives
    the MDTv2 figures quoted in the papers (6.06 / 23.0 / 118.6 GFLOPs for
    S / B / XL: the count of a DiT of the same depth and width)."""
    total = _stem_macs(model)
    D = model.hidden_size
    N = model.x_embedder.num_patches
    for blk in model.all_blocks():
        total += _block_macs(N, D, blk.attn.num_heads, D, blk.mlp.fc1.out_features)
        if include_skip and blk.skip_linear is not None:
            total += N * 2 * D * D
    return int(total)


def measured_macs(model: nn.Module, batch: int = 1, enable_mask: bool = False) -> int:
    """Matmul/conv MACs of one forward as executed (``torch.utils.flop_counter``
    reports 2 FLOPs per MAC), counted on a meta-device copy of the model's
    structure (rebuilt from ``model.config``, eager backend) at batch ``batch``."""
    from torch.utils.flop_counter import FlopCounterMode

    config = dict(model.config, backend=EAGER)  # materialising: every matmul reaches the counter
    with torch.device("meta"):
        meta_model = type(model)(**config)
        x = torch.zeros(batch, model.in_channels, model.input_size, model.input_size)
        t = torch.zeros(batch, dtype=torch.long)
        y = torch.zeros(batch, dtype=torch.long)
    meta_model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        meta_model(x, t, y, enable_mask=enable_mask)
    return int(counter.get_total_flops() // 2)
