"""EDT: Efficient Diffusion Transformer (Chen et al., NeurIPS 2024, arXiv 2410.23788).

A lightweight U-shaped diffusion transformer: five stages on token grids
n, n/2, n/4, n/2, n (16, 8, 4, 8, 16 for 256px latents), adaLN-Zero blocks
with a relative-position bias, 2x2 patch-merge down-sampling and linear
up-sampling with concatenated long skips.  Two extras from the paper:

- the Attention Modulation Matrix (AMM), training-free, multiplies the
  attention weights of a few blocks after the softmax, in eval mode only:
  ``M(i, j) = 0.5 exp(cos(2 pi d_ij / (4 (n-1) sqrt 2)))`` for token grid
  distance ``d_ij`` with ``d_ij^2 <= 2^2 + (n-1)^2``, else 0;
- token relation-enhanced masking training: ``enable_mask=True`` drops
  tokens inside the 2x2 merge of each down-sampling (and, for EDT-XL,
  replaces tokens of stage 0 by the positional embedding before its block 4).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from edt_kernels import layernorm_modulate, masked_shortcut, patch_merge_modulate
from edt_kernels.reference import reference_patch_merge

from .checkpointing import CheckpointSpec, parse_checkpoint, run_block
from .common import (
    CFG_CHANNELS,
    AdaLNBlock,
    DiffusionTransformer,
    FinalLayer,
    LN_EPS,
    Modulated,
    get_2d_sincos_pos_embed,
    Draws,
    init_weights_dit,
    uniform,
)

__all__ = ["EDT", "EDTBlock", "DownSample", "UpSample", "ConcatLayer", "EDT_models",
           "AMM_BLOCKS", "AMM_BLOCKS_HIGH_CFG"]

# Published AMM placements (index into the flat list of blocks).
AMM_BLOCKS: Dict[str, Tuple[int, ...]] = {"S": (7, 10), "B": (7, 10), "XL": (23, 25)}
# The authors' alternative arrangement for guidance scales >= 2.
AMM_BLOCKS_HIGH_CFG: Dict[str, Tuple[int, ...]] = {"S": (8,), "B": (8,), "XL": (24,)}

# Down masking: drop ratio p ~ U(lo, hi) before the first merge, then before the others.
DOWN_MASK_RATIOS: Tuple[Tuple[float, float], ...] = ((0.4, 0.5), (0.1, 0.2))
# EDT-XL mid masking: before block MID_MASK_BLOCK of stage 0, p ~ U(lo, hi) of the tokens
# are replaced by the positional embedding.
MID_MASK_BLOCK = 4
MID_MASK_RATIO = (0.15, 0.25)


#################################################################################
#                                   EDT blocks                                  #
#################################################################################

class EDTBlock(AdaLNBlock):
    """adaLN-Zero transformer block on a ``grid x grid`` token grid; the
    conditioning ``c`` has the width of stage 0 (``cond_dim``)."""

    def __init__(self, hidden_size: int, num_heads: int, grid: int, cond_dim: int, mlp_ratio: float = 4.0,
                 backend: str = "auto"):
        super().__init__(hidden_size, num_heads, grid, cond_dim=cond_dim, mlp_ratio=mlp_ratio,
                         extra_rows=0, persistent_index=False, rel_pos_first=True, backend=backend)


class DownSample(Modulated):
    """2x2 patch merge -> LayerNorm(4C) -> adaLN modulate -> (keep-mask) ->
    ``Linear(4C -> C_out, no bias)`` + fixed sin-cos ``pos_embed``.

    Merge order of the four sub-tokens: (even row, even col), (odd row, even
    col), (even row, odd col), (odd row, odd col).  ``keep`` ``(B, L)`` is a
    keep-mask at the *input* resolution: a dropped token zeroes its C channels
    inside the merged 4C vector.  The front end up to the keep-mask is one
    ``edt_kernels.patch_merge_modulate`` call.
    """

    merge = staticmethod(reference_patch_merge)  # (B, n*n, C) -> (B, n/2*n/2, 4C)
    modulation_chunks = 2

    def __init__(self, hidden_size: int, out_hidden_size: int, grid: int, cond_dim: int,
                 backend: str = "auto"):
        super().__init__()
        if grid % 2:
            raise ValueError(f"DownSample needs an even grid, got {grid}")
        self.hidden_size = hidden_size
        self.out_hidden_size = out_hidden_size
        self.grid = grid
        self.out_grid = grid // 2
        self.cond_dim = cond_dim
        self.backend = backend
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 8 * hidden_size, bias=True))
        self.reduction = nn.Linear(4 * hidden_size, out_hidden_size, bias=False)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.out_grid ** 2, out_hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor, c: torch.Tensor, keep: Optional[torch.Tensor] = None,
                mod: Optional[Tuple[torch.Tensor, ...]] = None) -> torch.Tensor:
        B, L, C = x.shape
        if L != self.grid ** 2:
            raise ValueError(f"DownSample expects {self.grid}x{self.grid} = {self.grid ** 2} tokens, got {L}")
        shift, scale = self.modulation(c, mod)  # (B, 4C) each
        x = patch_merge_modulate(x, shift, scale, keep, grid=self.grid, eps=LN_EPS,
                                 backend=self.backend)  # (B, L/4, 4C)
        return self.reduction(x) + self.pos_embed  # (B, L/4, C_out)


class UpSample(nn.Module):
    """``Linear(C -> 4 C_out, no bias)``, then ``b h w (p1 p2 c) -> b (h p1) (w p2) c``."""

    def __init__(self, hidden_size: int, out_hidden_size: int, grid: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.out_hidden_size = out_hidden_size
        self.grid = grid
        self.expand = nn.Linear(hidden_size, 4 * out_hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.expand(x)  # (B, n*n, 4 C_out)
        B, L, C4 = x.shape
        n, c = self.grid, C4 // 4
        x = x.view(B, n, n, 2, 2, c).permute(0, 1, 3, 2, 4, 5)  # (B, h, p1, w, p2, c)
        return x.reshape(B, 4 * L, c)  # (B, 2n*2n, C_out)


class ConcatLayer(Modulated):
    """Long-skip fusion: ``cat([x, skip]) -> LayerNorm(2C) -> modulate ->
    Linear(2C -> C)`` + fixed sin-cos ``pos_embed``."""

    modulation_chunks = 2

    def __init__(self, hidden_size: int, cond_dim: int, grid: int, backend: str = "auto"):
        super().__init__()
        self.hidden_size = hidden_size
        self.cond_dim = cond_dim
        self.grid = grid
        self.backend = backend
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 4 * hidden_size, bias=True))
        self.cat = nn.Linear(2 * hidden_size, hidden_size, bias=True)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid ** 2, hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor, skip: torch.Tensor, c: torch.Tensor,
                mod: Optional[Tuple[torch.Tensor, ...]] = None) -> torch.Tensor:
        x = torch.cat([x, skip], dim=-1)  # (B, L, 2C)
        shift, scale = self.modulation(c, mod)  # (B, 2C) each
        x = layernorm_modulate(x, shift, scale, LN_EPS, backend=self.backend)
        return self.cat(x) + self.pos_embed  # (B, L, C)


#################################################################################
#                                   EDT model                                   #
#################################################################################

class EDT(DiffusionTransformer):
    """Efficient Diffusion Transformer.

    Args (published names): ``input_size`` latent side, ``patch_size``,
    ``in_channels``, ``hidden_size`` (= ``dims[0]`` = ``dims[-1]``, the width of
    the conditioning), ``depth`` (= ``sum(stages_depth)``), ``num_heads`` and
    ``dims`` per stage, ``stages_depth``, ``mlp_ratio``, ``class_dropout_prob``,
    ``num_classes``, ``learn_sigma``, ``mid_mask`` (EDT-XL mid masking; forced on
    for ``size="XL"`` as published), ``size`` ("S"/"B"/"XL": selects the
    published AMM placement), ``local`` (AMM on at construction).
    Ours: ``amm_blocks`` (placement overriding the one of ``size``) and
    ``backend`` (``"auto"``: the edt_kernels kernels; ``"eager"``: the authors'
    code path; or any backend name the ops accept), ``checkpoint``
    (activation checkpointing of the blocks in training: ``"none"``, ``"all"``,
    an int k for every k-th block, or ``"selective"``; see
    :mod:`edt.models.checkpointing`).

    The blocks are one flat list (AMM placements index it); ``stage_blocks[s]``
    is the range of indices of stage ``s``: down stages ``0 .. mid_stage - 1``,
    the middle stage ``mid_stage``, up stages after it.
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 312,
        depth: int = 12,
        num_heads: Sequence[int] = (6, 8, 10, 8, 6),
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        stages_depth: Sequence[int] = (2, 2, 2, 3, 3),
        dims: Sequence[int] = (312, 416, 520, 416, 312),
        mid_mask: bool = False,
        size: Optional[str] = "S",
        local: bool = True,
        amm_blocks: Optional[Sequence[int]] = None,
        backend: str = "auto",
        checkpoint: CheckpointSpec = None,
    ):
        super().__init__(locals())
        stages_depth, dims, num_heads = list(stages_depth), list(dims), list(num_heads)
        S = len(stages_depth)
        if S % 2 == 0 or len(dims) != S or len(num_heads) != S:
            raise ValueError(f"stages_depth, dims and num_heads must have the same odd length, got "
                             f"{len(stages_depth)}, {len(dims)}, {len(num_heads)}")
        if sum(stages_depth) != depth:
            raise ValueError(f"depth ({depth}) must equal sum(stages_depth) = {sum(stages_depth)}")
        if dims[0] != hidden_size or dims[-1] != hidden_size:
            raise ValueError(f"dims[0] and dims[-1] must equal hidden_size ({hidden_size}), got {dims}")
        if any(dims[s] != dims[S - 1 - s] for s in range(S)):
            raise ValueError(f"dims must be symmetric (the up path mirrors the down path), got {dims}")
        self.mid_stage = S // 2  # index of the bottom stage
        grid = input_size // patch_size
        if grid % (2 ** self.mid_stage):
            raise ValueError(f"token grid {grid} must be divisible by 2**{self.mid_stage}")
        if size == "XL":
            mid_mask = True  # published: EDT-XL always trains with mid masking
        if mid_mask and stages_depth[0] <= MID_MASK_BLOCK:
            raise ValueError(f"mid_mask needs more than {MID_MASK_BLOCK} blocks in stage 0, got {stages_depth[0]}")

        self.num_heads = num_heads
        self.dims = dims
        self.stages_depth = stages_depth
        self.num_stages = S
        self.mid_mask = bool(mid_mask)
        self.size = size
        self.checkpoint = parse_checkpoint(checkpoint)

        self._embedders(input_size, patch_size, in_channels, hidden_size, num_classes, class_dropout_prob,
                        learn_sigma)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, hidden_size), requires_grad=False)

        self.blocks = nn.ModuleList()
        self.concat_blocks = nn.ModuleList()
        self.down_blocks = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        self.stage_grids: List[int] = []
        self.stage_blocks: List[range] = []
        n = grid
        for s in range(S):
            if s > self.mid_stage:
                self.up_blocks.append(UpSample(dims[s - 1], dims[s], n))
                n *= 2
                self.concat_blocks.append(ConcatLayer(dims[s], cond_dim=hidden_size, grid=n, backend=backend))
            self.stage_grids.append(n)
            self.stage_blocks.append(range(len(self.blocks), len(self.blocks) + stages_depth[s]))
            for _ in range(stages_depth[s]):
                self.blocks.append(EDTBlock(dims[s], num_heads[s], n, cond_dim=hidden_size, mlp_ratio=mlp_ratio,
                                            backend=backend))
            if s < self.mid_stage:
                self.down_blocks.append(DownSample(dims[s], dims[s + 1], n, cond_dim=hidden_size, backend=backend))
                n //= 2
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, backend=backend)

        if amm_blocks is None:
            amm_blocks = AMM_BLOCKS.get(size, ())
        self.default_amm_blocks = self._check_blocks(amm_blocks)
        self.set_amm(bool(local))
        self.initialize_weights()

    # ------------------------------------------------------------------ set-up

    def initialize_weights(self) -> None:
        """Published initialisation: DiT's, with adaLN-Zero in the blocks and
        the output layer zeroed; fixed sin-cos embeddings at every resolution
        (the down/concat adaLN layers are *not* zeroed, as published)."""
        init_weights_dit(self)
        with torch.no_grad():
            self.pos_embed.copy_(get_2d_sincos_pos_embed(self.hidden_size, self.stage_grids[0])[None])
            for blk in self.concat_blocks:
                blk.pos_embed.copy_(get_2d_sincos_pos_embed(blk.hidden_size, blk.grid)[None])
            for blk in self.down_blocks:
                blk.pos_embed.copy_(get_2d_sincos_pos_embed(blk.out_hidden_size, blk.out_grid)[None])
        self._zero_adaln(self.blocks)

    def all_blocks(self) -> List[EDTBlock]:
        """Every block, stage by stage: the flat list AMM placements index."""
        return list(self.blocks)

    # ----------------------------------------------------------------- forward

    @staticmethod
    def _keep_mask(shape, ratio_range, generator, device) -> torch.Tensor:
        """Keep-mask ``rand(shape) >= p`` with ``p ~ U(lo, hi)`` (p drawn first)."""
        lo, hi = ratio_range
        p = lo + (hi - lo) * uniform((), generator, device)
        return uniform(shape, generator, device) >= p

    def draw_ahead(self, batch: int, enable_mask: bool = False, generator: Optional[torch.Generator] = None,
                   device=None) -> Draws:
        """The random draws of one forward on ``batch`` samples, in the forward's order (label
        dropout in training; with ``enable_mask`` the mid keep-mask (EDT-XL) and one keep-mask
        per down stage), for ``forward(..., draws=)``; from ``generator`` as the forward would."""
        device = torch.device("cpu") if device is None else torch.device(device)
        values = self._draw_labels(batch, generator, device)
        if enable_mask:
            for s in range(len(self.down_blocks)):
                shape = (batch, self.stage_grids[s] ** 2)
                if s == 0 and self.mid_mask:
                    values.append(self._keep_mask(shape, MID_MASK_RATIO, generator, device))
                ratio = DOWN_MASK_RATIOS[min(s, len(DOWN_MASK_RATIOS) - 1)]
                values.append(self._keep_mask(shape, ratio, generator, device))
        return Draws(values)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, enable_mask: bool = False,
                generator: Optional[torch.Generator] = None, draws: Optional[Draws] = None) -> torch.Tensor:
        """x ``(B, C, H, W)`` latents, t ``(B,)`` timesteps, y ``(B,)`` labels ->
        ``(B, out_channels, H, W)``.  ``enable_mask``: the published masked
        training forward (down masking, and mid masking for EDT-XL).  All
        random draws (label dropout, masks) use ``generator`` if given, or are
        taken from ``draws`` (:meth:`draw_ahead`)."""
        if draws is None:
            draws = self.draw_ahead(x.shape[0], enable_mask, generator, x.device)
        x, c = self._embed(x, t, y, draws)  # (B, N, D), (B, D)
        mods = self._modulations(c, [*self.blocks, *self.down_blocks, *self.concat_blocks, self.final_layer])
        skips: List[torch.Tensor] = []
        for s, down in enumerate(self.down_blocks):  # down stages: blocks, then a patch merge
            skips.append(x)
            x = self._stage(s, x, c, mods, enable_mask, draws)  # (B, N_s, D_s)
            keep = draws.take() if enable_mask else None  # (B, N_s)
            x = down(x, c, keep=keep, mod=mods.get(down))  # (B, N_s / 4, D_s+1)
        x = self._stage(self.mid_stage, x, c, mods, enable_mask, draws)  # middle stage
        for k, (up, concat) in enumerate(zip(self.up_blocks, self.concat_blocks)):  # up stages
            x = concat(up(x), skips.pop(), c, mod=mods.get(concat))  # (B, 4 N_s, D_s+1)
            x = self._stage(self.mid_stage + 1 + k, x, c, mods, enable_mask, draws)
        x = self.final_layer(x, c, mod=mods.get(self.final_layer))  # (B, N, p*p*out_channels)
        return self.unpatchify(x)  # (B, out_channels, H, W)

    def _stage(self, s: int, x: torch.Tensor, c: torch.Tensor, mods: dict, enable_mask: bool,
               draws: Draws) -> torch.Tensor:
        """The blocks of stage ``s`` (``mods``: their modulation rows, :meth:`_modulations`);
        with ``enable_mask`` on an EDT-XL layout, stage 0 replaces masked tokens by the
        positional embedding before its block ``MID_MASK_BLOCK``."""
        first = self.stage_blocks[s].start
        for i in self.stage_blocks[s]:
            if enable_mask and self.mid_mask and s == 0 and i - first == MID_MASK_BLOCK:
                keep = draws.take()  # (B, N)
                x = masked_shortcut(x, self.pos_embed, keep, backend=self.backend)  # dropped -> pos_embed
            blk = self.blocks[i]
            x = run_block(blk, i, self.checkpoint, x, c, mod=mods.get(blk))  # (B, N_s, D_s)
        return x

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float,
                         cfg_channels: int = CFG_CHANNELS) -> torch.Tensor:
        """Classifier-free guidance with a constant scale ``cfg_scale`` on
        [cond, uncond] halves (see ``DiffusionTransformer._guided``)."""
        return self._guided(x, t, y, cfg_scale, cfg_channels)

    def get_flops(self) -> int:
        """The authors' operation count (multiply-accumulates of the matmuls
        at batch 1), see :func:`edt.models.flops.edt_flops`."""
        from .flops import edt_flops

        return edt_flops(self)


#################################################################################
#                                   EDT Configs                                 #
#################################################################################

_EDT_CONFIGS = {
    "S": dict(depth=12, hidden_size=312, patch_size=2, num_heads=[6, 8, 10, 8, 6],
              stages_depth=[2, 2, 2, 3, 3], dims=[312, 416, 520, 416, 312]),
    "B": dict(depth=12, hidden_size=624, patch_size=2, num_heads=[12, 16, 20, 16, 12],
              stages_depth=[2, 2, 2, 3, 3], dims=[624, 832, 1040, 832, 624]),
    "XL": dict(depth=28, hidden_size=936, patch_size=2, num_heads=[18, 24, 30, 24, 18],
               stages_depth=[6, 4, 4, 7, 7], dims=[936, 1248, 1560, 1248, 936]),
}


def _edt_factory(size: str, local: bool):
    def factory(**kwargs) -> EDT:
        config = dict(_EDT_CONFIGS[size], size=size, local=local)
        config.update(kwargs)
        return EDT(**config)

    factory.__name__ = f"EDT_{size}_2" + ("" if local else "_noAMM")
    factory.__doc__ = f"EDT-{size}/2{'' if local else ' without AMM'} (published configuration)."
    return factory


EDT_XL_2 = _edt_factory("XL", True)
EDT_B_2 = _edt_factory("B", True)
EDT_S_2 = _edt_factory("S", True)
EDT_XL_2_noAMM = _edt_factory("XL", False)
EDT_B_2_noAMM = _edt_factory("B", False)
EDT_S_2_noAMM = _edt_factory("S", False)

EDT_models = {
    "EDT-XL/2": EDT_XL_2,
    "EDT-B/2": EDT_B_2,
    "EDT-S/2": EDT_S_2,
    "EDT-XL/2_noAMM": EDT_XL_2_noAMM,
    "EDT-B/2_noAMM": EDT_B_2_noAMM,
    "EDT-S/2_noAMM": EDT_S_2_noAMM,
}
