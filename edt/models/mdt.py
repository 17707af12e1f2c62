"""MDTv2: Masked Diffusion Transformer v2 (Gao et al., ICCV 2023 / arXiv 2303.14389),
the baseline of EDT's speed comparison.

An asymmetric encoder-decoder: encoder in-blocks and out-blocks joined by
long skips (``skip_linear(cat[x, skip])``), a side-interpolater block used in
masked training only, and decoder blocks that take the input embedding as
their skip.  Every attention has a relative-position bias table (3 unused
extra rows, BEiT layout) whose index is a buffer saved in the state dict.

Masked training (``enable_mask=True``): a ratio ``r = mask_ratio + 0.2 U(0,1)``
of the tokens is removed per sample; the encoder runs on the kept tokens with
the bias taken at their grid positions (``ids_keep``), then the
side-interpolater fills the removed ones from a learned mask token.  With
``sort_kept`` (the default) the kept tokens run in ascending grid order
instead of the draw's order: the encoder blocks are permutation-equivariant
over tokens (attention with the positions carried along, per-token
LayerNorm/MLP/adaLN) and the unshuffle puts every token back at its place,
so the output is the same up to float summation order, from the same random
draws; neighbouring kept tokens then read neighbouring rows of the bias table.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
import torch.nn as nn

from edt_kernels import masked_shortcut, random_masking, unshuffle_with_mask_token
from edt_kernels.ops.random_masking import kept_count

from .checkpointing import CheckpointSpec, parse_checkpoint, run_block
from .common import (
    CFG_CHANNELS,
    AdaLNBlock,
    Draws,
    DiffusionTransformer,
    FinalLayer,
    get_2d_sincos_pos_embed,
    host_generator,
    init_weights_dit,
    uniform,
)

__all__ = ["MDTv2", "MDTBlock", "MDTv2_models", "MASK_RATIO_SPREAD"]

# r = mask_ratio + MASK_RATIO_SPREAD * U(0, 1)
MASK_RATIO_SPREAD = 0.2
# Number of rows of the BEiT bias table beyond the (2n-1)^2 offsets (cls-token rows, unused).
TABLE_EXTRA_ROWS = 3


class MDTBlock(AdaLNBlock):
    """adaLN-Zero block with relative-position attention; ``skip=True`` adds the
    long-skip projection ``skip_linear(cat[x, skip])``."""

    def __init__(self, hidden_size: int, num_heads: int, grid: int, mlp_ratio: float = 4.0, skip: bool = False,
                 backend: str = "auto"):
        super().__init__(hidden_size, num_heads, grid, cond_dim=hidden_size, mlp_ratio=mlp_ratio, skip=skip,
                         extra_rows=TABLE_EXTRA_ROWS, persistent_index=True, rel_pos_first=False,
                         backend=backend)


#################################################################################
#                                  MDTv2 model                                  #
#################################################################################

class MDTv2(DiffusionTransformer):
    """Masked Diffusion Transformer v2.

    Args (published names): ``input_size``, ``patch_size``, ``in_channels``,
    ``hidden_size``, ``depth`` (all blocks but the side block), ``num_heads``,
    ``mlp_ratio``, ``class_dropout_prob``, ``num_classes``, ``learn_sigma``,
    ``mask_ratio`` (None: no masked training, the mask token is frozen),
    ``decode_layer`` (decoder blocks; the encoder has ``(depth - decode_layer) // 2``
    in-blocks and as many out-blocks).  Ours: ``amm_blocks`` (AMM at these
    encoder/decoder blocks in eval mode, as the authors' MDT-with-AMM
    ablation; default none), ``sort_kept`` (masked training: the kept
    tokens in ascending grid order, see the module docstring; False: in the
    order of the random draw, as the authors' code) and ``backend``
    (``"auto"``: the edt_kernels kernels; ``"eager"``: the authors' code path),
    ``checkpoint`` (activation checkpointing of the blocks in training:
    ``"none"``, ``"all"``, an int k for every k-th block of :meth:`all_blocks`
    followed by the side block, or ``"selective"``; see
    :mod:`edt.models.checkpointing`).
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        mask_ratio: Optional[float] = None,
        decode_layer: int = 4,
        amm_blocks: Sequence[int] = (),
        sort_kept: bool = True,
        backend: str = "auto",
        checkpoint: CheckpointSpec = None,
    ):
        super().__init__(locals())
        decode_layer = int(decode_layer)
        if not 0 <= decode_layer <= depth:
            raise ValueError(f"decode_layer must be in [0, depth={depth}], got {decode_layer}")
        if mask_ratio is not None and not 0.0 <= float(mask_ratio) < 1.0 - MASK_RATIO_SPREAD:
            raise ValueError(f"mask_ratio must be in [0, {1 - MASK_RATIO_SPREAD}) (r = mask_ratio + "
                             f"{MASK_RATIO_SPREAD} U(0,1) must stay below 1), got {mask_ratio}")
        if not isinstance(sort_kept, bool):
            raise TypeError(f"sort_kept must be a bool, got {type(sort_kept).__name__}")
        self.num_heads = num_heads
        self.mask_ratio = None if mask_ratio is None else float(mask_ratio)
        self.decode_layer = decode_layer
        self.sort_kept = sort_kept
        self.checkpoint = parse_checkpoint(checkpoint)

        self._embedders(input_size, patch_size, in_channels, hidden_size, num_classes, class_dropout_prob,
                        learn_sigma)
        grid = self.x_embedder.grid_size
        self.grid = grid
        num_patches = grid * grid
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size))  # learnable, sin-cos init

        half_depth = (depth - decode_layer) // 2
        self.half_depth = half_depth
        def block(skip: bool) -> MDTBlock:
            return MDTBlock(hidden_size, num_heads, grid, mlp_ratio, skip=skip, backend=backend)

        self.en_inblocks = nn.ModuleList([block(skip=False) for _ in range(half_depth)])
        self.en_outblocks = nn.ModuleList([block(skip=True) for _ in range(half_depth)])
        self.de_blocks = nn.ModuleList([block(skip=True) for _ in range(decode_layer)])
        self.sideblocks = nn.ModuleList([block(skip=False)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, backend=backend)

        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, hidden_size), requires_grad=mask_ratio is not None)

        self.default_amm_blocks = self._check_blocks(amm_blocks)
        self.set_amm(bool(self.default_amm_blocks))
        self.initialize_weights()

    # ------------------------------------------------------------------ set-up

    def initialize_weights(self) -> None:
        init_weights_dit(self)
        with torch.no_grad():
            self.pos_embed.copy_(get_2d_sincos_pos_embed(self.hidden_size, self.grid)[None])
            self.decoder_pos_embed.copy_(get_2d_sincos_pos_embed(self.hidden_size, self.grid)[None])
        self._zero_adaln(self.all_blocks() + list(self.sideblocks))
        if self.mask_ratio is not None:
            nn.init.normal_(self.mask_token, std=0.02)

    def all_blocks(self) -> List[MDTBlock]:
        """Encoder in-blocks, out-blocks and decoder blocks: the flat list the
        AMM placement indexes (the side block is training-only)."""
        return list(self.en_inblocks) + list(self.en_outblocks) + list(self.de_blocks)

    # ----------------------------------------------------------------- forward

    def forward_side_interpolater(self, x: torch.Tensor, c: torch.Tensor, mask: torch.Tensor,
                                  ids_restore: torch.Tensor, mods: Optional[dict] = None) -> torch.Tensor:
        """Append mask tokens, unshuffle to the grid order, add the decoder
        pos_embed, run the side block, and keep its output on the removed
        tokens only (``x * mask + (1 - mask) * x_before``).

        x ``(B, K, D)`` kept tokens, mask ``(B, L)`` (1 = removed),
        ids_restore ``(B, L)`` -> ``(B, L, D)``; ``mods``: the side block's
        modulation rows (:meth:`_modulations`), if the forward computed them."""
        x = unshuffle_with_mask_token(x, ids_restore, self.mask_token, self.decoder_pos_embed,
                                      backend=self.backend)  # (B, L, D)
        x_before = x
        first = len(self.all_blocks())  # the side block follows all_blocks() in the checkpointing order
        for i, blk in enumerate(self.sideblocks):
            x = run_block(blk, first + i, self.checkpoint, x, c, mod=(mods or {}).get(blk))
        return masked_shortcut(x, x_before, mask, backend=self.backend)  # (B, L, D)

    def draw_ahead(self, batch: int, enable_mask: bool = False, generator: Optional[torch.Generator] = None,
                   device=None) -> Draws:
        """The random draws of one forward on ``batch`` samples, in the forward's order, for
        ``forward(..., draws=)``: the label dropout in training; with ``enable_mask`` the kept
        count ``int(L (1 - r))``, ``r = mask_ratio + 0.2 U(0, 1)`` (as the authors draw it, but
        on the host: from a CPU ``generator`` itself, for a device generator from
        :func:`host_generator`, with none from the global CPU RNG), then the ``(B, L)`` noise
        whose argsort shuffles the tokens (from ``generator`` on ``device``)."""
        device = torch.device("cpu") if device is None else torch.device(device)
        values = self._draw_labels(batch, generator, device)
        if enable_mask:
            if self.mask_ratio is None:
                raise ValueError("enable_mask=True needs a model built with mask_ratio (e.g. mask_ratio=0.3)")
            host = host_generator(generator)
            ratio = self.mask_ratio + MASK_RATIO_SPREAD * uniform((1,), host, "cpu")
            L = self.grid * self.grid
            values.append(kept_count(L, ratio))  # a CPU tensor read: no device sync
            values.append(uniform((batch, L), generator, device))
        return Draws(values)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, enable_mask: bool = False,
                generator: Optional[torch.Generator] = None, draws: Optional[Draws] = None) -> torch.Tensor:
        """x ``(B, C, H, W)``, t ``(B,)``, y ``(B,)`` -> ``(B, out_channels, H, W)``.
        ``enable_mask``: the published masked-training forward (needs
        ``mask_ratio``).  Random draws use ``generator`` if given, or are taken
        from ``draws`` (:meth:`draw_ahead`)."""
        if enable_mask and self.mask_ratio is None:
            raise ValueError("enable_mask=True needs a model built with mask_ratio (e.g. mask_ratio=0.3)")
        if draws is None:
            draws = self.draw_ahead(x.shape[0], enable_mask, generator, x.device)
        x, c = self._embed(x, t, y, draws)  # (B, L, D), (B, D)
        mods = self._modulations(c, [*self.all_blocks(), *(self.sideblocks if enable_mask else ()),
                                     self.final_layer])
        input_skip = x

        ids_keep = None
        if enable_mask:
            len_keep, noise = draws.take(), draws.take()
            # argsort of the noise and the gather of the kept tokens: mask and ids_restore (B, L), ids_keep (B, K)
            x, mask, ids_restore, ids_keep = random_masking(x, len_keep=len_keep, noise=noise,
                                                            sort_kept=self.sort_kept,
                                                            backend=self.backend)  # (B, K, D)

        skips = []
        ck, i = self.checkpoint, 0  # i: index of the block in all_blocks()
        for blk in self.en_inblocks:
            x = run_block(blk, i, ck, x, c, positions=ids_keep, mod=mods.get(blk))  # (B, K, D); K = L unmasked
            skips.append(x)
            i += 1
        for blk in self.en_outblocks:
            x = run_block(blk, i, ck, x, c, skip=skips.pop(), positions=ids_keep, mod=mods.get(blk))
            i += 1

        if enable_mask:
            x = self.forward_side_interpolater(x, c, mask, ids_restore, mods)  # (B, L, D)
        else:
            x = x + self.decoder_pos_embed
        for blk in self.de_blocks:
            x = run_block(blk, i, ck, x, c, skip=input_skip, mod=mods.get(blk))  # (B, L, D)
            i += 1
        x = self.final_layer(x, c, mod=mods.get(self.final_layer))  # (B, L, p*p*out_channels)
        return self.unpatchify(x)  # (B, out_channels, H, W)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                         cfg_scale: Optional[float] = None, diffusion_steps: int = 1000,
                         scale_pow: float = 4.0, cfg_channels: int = CFG_CHANNELS) -> torch.Tensor:
        """Classifier-free guidance with MDT's power-cosine schedule of t::

            s(t) = (cfg_scale - 1) * (1 - cos(((1 - t / steps) ** scale_pow) * pi)) / 2 + 1

        on [cond, uncond] halves, first ``cfg_channels`` channels.  Without
        ``cfg_scale`` it is the plain forward."""
        if cfg_scale is None:
            return self.forward(x, t, y)
        scale_step = (1 - torch.cos(((1 - t / diffusion_steps) ** scale_pow) * math.pi)) / 2
        real_cfg_scale = ((cfg_scale - 1) * scale_step + 1)[: len(x) // 2].view(-1, 1, 1, 1)
        return self._guided(x, t, y, real_cfg_scale, cfg_channels)

    def get_flops(self, include_skip: bool = True) -> int:
        """Operation count in the EDT authors' convention (matmul MACs at batch 1,
        inference path, no side block), see :func:`edt.models.flops.mdt_flops`;
        ``include_skip=False`` gives the papers' MDTv2 figures."""
        from .flops import mdt_flops

        return mdt_flops(self, include_skip=include_skip)


#################################################################################
#                                  MDTv2 Configs                                #
#################################################################################
# The published factories set depth/width/heads; the training commands add
# mask_ratio 0.3 and decode_layer (S: 6, B and XL: 4), which are the defaults here.

def MDTv2_XL_2(**kwargs) -> MDTv2:
    return MDTv2(**dict(dict(depth=28, hidden_size=1152, patch_size=2, num_heads=16,
                             mask_ratio=0.3, decode_layer=4), **kwargs))


def MDTv2_B_2(**kwargs) -> MDTv2:
    return MDTv2(**dict(dict(depth=12, hidden_size=768, patch_size=2, num_heads=12,
                             mask_ratio=0.3, decode_layer=4), **kwargs))


def MDTv2_S_2(**kwargs) -> MDTv2:
    return MDTv2(**dict(dict(depth=12, hidden_size=384, patch_size=2, num_heads=6,
                             mask_ratio=0.3, decode_layer=6), **kwargs))


MDTv2_models = {
    "MDTv2-XL/2": MDTv2_XL_2,
    "MDTv2-B/2": MDTv2_B_2,
    "MDTv2-S/2": MDTv2_S_2,
}
