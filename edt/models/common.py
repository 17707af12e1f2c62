"""Building blocks shared by EDT and MDTv2 (DiT lineage).

Layout (DiT ``models.py`` style): kernel shim, embedders, attention with a
relative-position bias table, the adaLN-Zero block, the final layer, fixed
sin-cos positional embeddings, and the random draws used by masked training.

Every module that has a fused route takes ``fused: bool``:

- ``fused=True``: attention through :func:`edt_kernels.amm_attention` (bias
  table + AMM + token positions read in-kernel, no ``N x N`` tensor), and the
  token/adaLN work through the ``edt_kernels`` token and adaLN kernels
  (``random_masking``, ``unshuffle_with_mask_token``, ``masked_shortcut``,
  ``patch_merge_modulate``, ``layernorm_modulate``, ``gated_residual``).
- ``fused=False``: the authors' eager code path, op for op: the bias is
  materialised from the table (for masked MDT tokens by the two gathers of
  the published ``get_masked_rel_bias`` into ``[B, H, K, K]``), softmax,
  then multiplication by the dense AMM.  Benchmarks call this path
  "published-style eager".

Facts (shapes, orders, constants) are from the published EDT, MDTv2 and DiT
code (SPEC 2-6); the code is ours.
"""
from __future__ import annotations

import importlib
import math
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from edt_kernels import amm_attention, amm_offset_table, relative_position_index

__all__ = [
    "modulate",
    "kernel_sources",
    "TimestepEmbedder",
    "LabelEmbedder",
    "PatchEmbed",
    "Mlp",
    "RelativePositionBias",
    "RelPosAttention",
    "AdaLNBlock",
    "FinalLayer",
    "get_2d_sincos_pos_embed",
    "uniform",
    "unpatchify",
    "LN_EPS",
]

LN_EPS = 1e-6  # every LayerNorm in DiT / MDT / EDT: no affine, eps 1e-6
FREQ_EMBED_SIZE = 256  # sinusoidal timestep features fed to the timestep MLP


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation: ``x * (1 + scale) + shift`` with per-sample ``(B, C)``
    shift/scale broadcast over the tokens of ``x`` ``(B, N, C)``."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#                 Kernel shim: edt_kernels token / adaLN ops                    #
#################################################################################
# The fused path calls the token and adaLN ops of ``edt_kernels`` by name
# (they pick Triton or their PyTorch reference themselves, see
# ``EDT_KERNELS_BACKEND``).  Where an op is missing from the installed
# ``edt_kernels`` (e.g. a build without the token ops), a PyTorch composition
# with the same semantics stands in, so the fused path always runs;
# ``kernel_sources()`` says which is in use.  Adapters bridge the few places
# where a kernel's contract differs from what the model needs.


def _torch_layernorm_modulate(x, shift, scale, eps: float = LN_EPS):
    return modulate(F.layer_norm(x, (x.shape[-1],), eps=eps), shift, scale)


def _torch_gated_residual(x, gate, y):
    return torch.addcmul(x, gate.unsqueeze(1), y)


def _torch_gather_tokens(x, ids_keep):
    return torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _torch_unshuffle_with_mask_token(x_kept, ids_restore, mask_token, pos_embed=None):
    B, K, C = x_kept.shape
    L = ids_restore.shape[1]
    full = torch.cat([x_kept, mask_token.to(x_kept.dtype).expand(B, L - K, C)], dim=1)
    out = torch.gather(full, 1, ids_restore.unsqueeze(-1).expand(-1, -1, C))
    return out if pos_embed is None else out + pos_embed


def _torch_masked_shortcut(x, x_before, mask):
    m = mask.to(x.dtype).unsqueeze(-1)
    return torch.lerp(x_before, x, m)  # x * m + (1 - m) * x_before


def _torch_random_masking(x, mask_ratio, generator=None):
    B, L, C = x.shape
    mask, ids_restore, ids_keep = random_masking_ids(B, L, mask_ratio, generator, x.device)
    return _torch_gather_tokens(x, ids_keep), mask, ids_restore, ids_keep


def _apply_subtoken_keep(merged, keep, grid):
    """Zero the C-channel chunk of every dropped sub-token inside the merged
    ``(B, L/4, 4C)`` features; ``keep`` ``(B, L)`` is at the input grid (the
    published down-masking draws one bit per pre-merge token, SPEC 6)."""
    B, T, C4 = merged.shape
    rows, cols = (grid, grid) if isinstance(grid, int) else grid
    # sub-token order (0,0), (1,0), (0,1), (1,1) of (row, col) offsets = dc * 2 + dr
    k = keep.to(merged.dtype).reshape(B, rows // 2, 2, cols // 2, 2).permute(0, 1, 3, 4, 2)
    return (merged.reshape(B, T, 4, C4 // 4) * k.reshape(B, T, 4, 1)).reshape(B, T, C4)


def _torch_patch_merge_modulate(x, shift, scale, grid, keep=None, eps: float = LN_EPS):
    B, L, C = x.shape
    rows, cols = (grid, grid) if isinstance(grid, int) else grid
    # (B, r/2, 2[dr], c/2, 2[dc], C) -> sub-token order (0,0), (1,0), (0,1), (1,1) = dc * 2 + dr
    merged = x.reshape(B, rows // 2, 2, cols // 2, 2, C).permute(0, 1, 3, 4, 2, 5)
    merged = merged.reshape(B, (rows // 2) * (cols // 2), 4 * C)
    out = _torch_layernorm_modulate(merged, shift, scale, eps)
    return out if keep is None else _apply_subtoken_keep(out, keep, grid)


_FALLBACKS: Dict[str, Callable] = {
    "layernorm_modulate": _torch_layernorm_modulate,
    "gated_residual": _torch_gated_residual,
    "gather_tokens": _torch_gather_tokens,
    "random_masking": _torch_random_masking,
    "unshuffle_with_mask_token": _torch_unshuffle_with_mask_token,
    "masked_shortcut": _torch_masked_shortcut,
    "patch_merge_modulate": _torch_patch_merge_modulate,
}
_KERNEL_MODULES = {
    "layernorm_modulate": "edt_kernels.ops.adaln",
    "gated_residual": "edt_kernels.ops.adaln",
    "gather_tokens": "edt_kernels.ops.tokens",
    "random_masking": "edt_kernels.ops.tokens",
    "unshuffle_with_mask_token": "edt_kernels.ops.tokens",
    "masked_shortcut": "edt_kernels.ops.tokens",
    "patch_merge_modulate": "edt_kernels.ops.tokens",
}


def _adapt_patch_merge(kernel: Callable) -> Callable:
    # The published down-masking keeps or drops each of the four sub-tokens
    # ([B, L] at the input grid); the kernel takes that per-input-token mask
    # and applies it in the same pass as the merge + LayerNorm + modulate.
    def call(x, shift, scale, grid, keep=None):
        return kernel(x, shift, scale, keep, grid=grid)

    return call


def _adapt_random_masking(kernel: Callable) -> Callable:
    # The kernel draws its noise on x's device; a generator elsewhere (e.g. a
    # CPU generator for CUDA tensors) is served by the fallback, which draws on
    # the generator's device like every other draw of the model.
    def call(x, mask_ratio, generator=None):
        if generator is not None and generator.device.type != x.device.type:
            return _torch_random_masking(x, mask_ratio, generator)
        return kernel(x, mask_ratio, generator)

    return call


# Wrap a kernel whose signature differs from the fallback's (identity otherwise).
_ADAPTERS: Dict[str, Callable[[Callable], Callable]] = {
    "patch_merge_modulate": _adapt_patch_merge,
    "random_masking": _adapt_random_masking,
}
_RESOLVED: Dict[str, Tuple[Callable, str]] = {}


def _kernel(name: str) -> Callable:
    """The fused implementation of ``name``: the edt_kernels op where it exists,
    else the PyTorch fallback."""
    hit = _RESOLVED.get(name)
    if hit is None:
        fn, source = _FALLBACKS[name], "torch fallback (edt/models/common.py)"
        try:
            mod = importlib.import_module(_KERNEL_MODULES[name])
        except ImportError:
            mod = None
        if mod is not None and callable(getattr(mod, name, None)):
            fn, source = getattr(mod, name), f"{_KERNEL_MODULES[name]}.{name}"
            if name in _ADAPTERS:
                fn = _ADAPTERS[name](fn)
        hit = _RESOLVED[name] = (fn, source)
    return hit[0]


def kernel_sources() -> Dict[str, str]:
    """Which implementation the fused path uses for each token/adaLN op."""
    for name in _FALLBACKS:
        _kernel(name)
    return {name: src for name, (_, src) in _RESOLVED.items()}


def layernorm_modulate(x, shift, scale):
    return _kernel("layernorm_modulate")(x, shift, scale)


def gated_residual(x, gate, y):
    return _kernel("gated_residual")(x, gate, y)


def gather_tokens(x, ids_keep):
    return _kernel("gather_tokens")(x, ids_keep)


def random_masking(x, mask_ratio, generator=None):
    """MDT's random masking (noise drawn from ``generator``): ``(x_kept, mask, ids_restore, ids_keep)``."""
    return _kernel("random_masking")(x, mask_ratio, generator)


def unshuffle_with_mask_token(x_kept, ids_restore, mask_token, pos_embed=None):
    return _kernel("unshuffle_with_mask_token")(x_kept, ids_restore, mask_token, pos_embed)


def masked_shortcut(x, x_before, mask):
    return _kernel("masked_shortcut")(x, x_before, mask)


def patch_merge_modulate(x, shift, scale, grid, keep=None):
    return _kernel("patch_merge_modulate")(x, shift, scale, grid, keep)


#################################################################################
#                            Random draws (masking)                             #
#################################################################################

def uniform(shape: Sequence[int], generator: Optional[torch.Generator], device) -> torch.Tensor:
    """``U[0, 1)`` samples drawn from ``generator`` (on the generator's device,
    then moved to ``device``) or from the global RNG on ``device``.  Every
    random draw of a forward goes through here, in the same order on the
    fused and the plain path."""
    if generator is None:
        return torch.rand(tuple(shape), device=device)
    return torch.rand(tuple(shape), generator=generator, device=generator.device).to(device)


def random_masking_ids(B: int, L: int, mask_ratio: torch.Tensor, generator: Optional[torch.Generator],
                       device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MDT's per-sample random masking, as indices: ``len_keep = int(L (1 - r))``;
    argsort of uniform noise gives ``ids_shuffle`` (small noise is kept),
    ``ids_restore = argsort(ids_shuffle)``, ``ids_keep = ids_shuffle[:, :len_keep]``;
    ``mask`` ``(B, L)`` is 1 for removed tokens, in the original order."""
    len_keep = int(L * (1 - mask_ratio))
    noise = uniform((B, L), generator, device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    mask = torch.ones(B, L, device=device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return mask, ids_restore, ids_keep


#################################################################################
#               Embedding Layers for Timesteps and Class Labels                 #
#################################################################################

class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> ``(B, hidden)``: sinusoidal features (GLIDE/DiT
    layout: cos half then sin half, max period 10000) through a 2-layer SiLU MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = FREQ_EMBED_SIZE):
        super().__init__()
        self.hidden_size = hidden_size
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels -> ``(B, hidden)``.  With ``dropout_prob > 0`` the table has
    one extra row (index ``num_classes``) for the null label of classifier-free
    guidance; in training, labels are dropped to it with that probability."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = int(dropout_prob > 0)
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels, force_drop_ids=None, generator=None):
        if force_drop_ids is None:
            drop_ids = uniform(labels.shape, generator, labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels, train: bool, force_drop_ids=None, generator=None):
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids, generator)
        return self.embedding_table(labels)


class PatchEmbed(nn.Module):
    """``(B, C, H, W)`` latent -> ``(B, N, D)`` tokens by a stride-p convolution
    (timm ``PatchEmbed`` state-dict layout: ``proj.weight``, ``proj.bias``)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, bias: bool = True):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"input_size ({img_size}) must be a multiple of patch_size ({patch_size})")
        self.img_size = img_size
        self.patch_size = (patch_size, patch_size)
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"x must be [B, C, {self.img_size}, {self.img_size}], got {list(x.shape)}")
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)


class Mlp(nn.Module):
    """``fc2(gelu_tanh(fc1(x)))`` (timm ``Mlp`` layout)."""

    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


#################################################################################
#                 Attention with relative position bias (+ AMM)                 #
#################################################################################

class RelativePositionBias(nn.Module):
    """BEiT-style learned table ``[(2n-1)^2 + extra_rows, H]`` (SPEC 2).

    ``relative_position_index`` ``[N, N]`` is a buffer; MDT saves it in its
    state dict (``persistent_index=True``), EDT does not.  ``amm_table`` (not
    saved) is EDT's AMM per grid offset, read with the same index (SPEC 3).
    """

    def __init__(self, grid: int, num_heads: int, extra_rows: int = 0, persistent_index: bool = False):
        super().__init__()
        self.grid = grid
        self.num_heads = num_heads
        num_offsets = (2 * grid - 1) ** 2
        self.relative_position_bias_table = nn.Parameter(torch.zeros(num_offsets + extra_rows, num_heads))
        index = relative_position_index(grid, device=self.relative_position_bias_table.device)
        self.register_buffer("relative_position_index", index, persistent=persistent_index)
        with torch.device("cpu"):  # edt_kernels caches this table: never build it under a meta/cuda default device
            amm = amm_offset_table(grid, True, device="cpu")
        self.register_buffer("amm_table", amm.to(self.relative_position_bias_table.device), persistent=False)

    def forward(self, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Materialised bias: ``[H, N, N]``; with ``positions`` ``[B, K]``, the
        published masked gather ``[B, H, K, K]`` (repeat over the batch, then
        one gather per token axis)."""
        N = self.grid * self.grid
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(N, N, self.num_heads).permute(2, 0, 1).contiguous()  # (H, N, N)
        if positions is None:
            return bias
        B, K = positions.shape
        H = self.num_heads
        bias = bias.unsqueeze(0).repeat(B, 1, 1, 1)  # (B, H, N, N)
        bias = torch.gather(bias, 2, positions[:, None, :, None].expand(B, H, K, N))
        return torch.gather(bias, 3, positions[:, None, None, :].expand(B, H, K, K))  # (B, H, K, K)

    def modulation(self, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Dense AMM ``[1, 1, N, N]`` (or ``[B, 1, K, K]`` at ``positions``)."""
        index = self.relative_position_index
        if positions is not None:
            index = index[positions[:, :, None], positions[:, None, :]]  # (B, K, K)
            return self.amm_table[index].unsqueeze(1)
        return self.amm_table[index][None, None]


class RelPosAttention(nn.Module):
    """Multi-head self-attention with a relative-position bias table and,
    where enabled, EDT's Attention Modulation Matrix (SPEC 2-3)::

        out = proj((softmax(q k^T * scale + bias) ⊙ M) v)

    ``amm`` switches M on for this layer; ``amm_in_training=False`` (EDT)
    applies it in eval mode only.  ``positions`` ``[B, K]`` are the grid
    indices of the tokens when only a subset is present (masked training).
    """

    def __init__(self, dim: int, num_heads: int, grid: int, extra_rows: int = 0,
                 persistent_index: bool = False, rel_pos_first: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.grid = grid
        self.amm = False
        self.amm_in_training = False
        # Registration order only sets the state-dict key order (EDT: table first; MDT: last).
        if rel_pos_first:
            self.rel_pos_bias = RelativePositionBias(grid, num_heads, extra_rows, persistent_index)
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        if not rel_pos_first:
            self.rel_pos_bias = RelativePositionBias(grid, num_heads, extra_rows, persistent_index)

    def amm_active(self) -> bool:
        return self.amm and (self.amm_in_training or not self.training)

    def forward(self, x: torch.Tensor, positions: Optional[torch.Tensor] = None, fused: bool = True) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, N, Dh) each
        use_amm = self.amm_active()
        if fused:
            table = self.rel_pos_bias.relative_position_bias_table
            out = amm_attention(q, k, v, scale=self.scale, rel_pos_bias=table, grid=self.grid,
                                positions=positions, amm=use_amm)
        else:
            attn = (q @ k.transpose(-2, -1)) * self.scale  # (B, H, N, N)
            attn = attn + self.rel_pos_bias(positions)
            attn = attn.softmax(dim=-1)
            if use_amm:
                attn = attn * self.rel_pos_bias.modulation(positions).to(attn.dtype)
            out = attn.to(v.dtype) @ v
        x = out.transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


#################################################################################
#                         adaLN-Zero block, final layer                         #
#################################################################################

class AdaLNBlock(nn.Module):
    """DiT block with adaLN-Zero conditioning and relative-position attention.

    ``shift, scale, gate`` (x2) come from ``Linear(SiLU(c))`` with ``c`` of
    width ``cond_dim``; ``skip=True`` adds MDT's long-skip input projection
    ``skip_linear(cat[x, skip])`` in front of the block.
    """

    def __init__(self, hidden_size: int, num_heads: int, grid: int, cond_dim: Optional[int] = None,
                 mlp_ratio: float = 4.0, skip: bool = False, extra_rows: int = 0,
                 persistent_index: bool = False, rel_pos_first: bool = False):
        super().__init__()
        cond_dim = hidden_size if cond_dim is None else cond_dim
        self.hidden_size = hidden_size
        self.grid = grid
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=LN_EPS)
        self.attn = RelPosAttention(hidden_size, num_heads, grid, extra_rows, persistent_index, rel_pos_first)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=LN_EPS)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * hidden_size, bias=True))
        self.skip_linear = nn.Linear(2 * hidden_size, hidden_size) if skip else None

    def forward(self, x: torch.Tensor, c: torch.Tensor, skip: Optional[torch.Tensor] = None,
                positions: Optional[torch.Tensor] = None, fused: bool = True) -> torch.Tensor:
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        if fused:
            h = self.attn(layernorm_modulate(x, shift_msa, scale_msa), positions, fused=True)
            x = gated_residual(x, gate_msa, h)
            x = gated_residual(x, gate_mlp, self.mlp(layernorm_modulate(x, shift_mlp, scale_mlp)))
        else:
            h = self.attn(modulate(self.norm1(x), shift_msa, scale_msa), positions, fused=False)
            x = x + gate_msa.unsqueeze(1) * h
            x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN (shift, scale) -> ``Linear(hidden -> p*p*out_channels)``."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=LN_EPS)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor, fused: bool = True) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        x = layernorm_modulate(x, shift, scale) if fused else modulate(self.norm_final(x), shift, scale)
        return self.linear(x)


def unpatchify(x: torch.Tensor, patch_size: int, out_channels: int) -> torch.Tensor:
    """``(B, N, p*p*C)`` tokens -> ``(B, C, H, W)``."""
    B, N, _ = x.shape
    h = w = int(round(N ** 0.5))
    if h * w != N:
        raise ValueError(f"cannot unpatchify {N} tokens: not a square grid")
    p, c = patch_size, out_channels
    x = x.reshape(B, h, w, p, p, c)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(B, c, h * p, w * p)


#################################################################################
#                   Sine/Cosine Positional Embedding Functions                  #
#################################################################################
# MAE / DiT layout: the first half of the channels encodes the column (w),
# the second half the row (h); each half is [sin(pos * omega), cos(pos * omega)]
# with omega_k = 10000^(-k / (D/4)).

def _sincos_1d(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding width must be even, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = pos.reshape(-1, 1).double() * omega[None]  # (M, D/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding ``[grid_size**2, embed_dim]`` (float32)."""
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos embedding width must be a multiple of 4, got {embed_dim}")
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    emb = torch.cat([_sincos_1d(embed_dim // 2, cols), _sincos_1d(embed_dim // 2, rows)], dim=1)
    return emb.float()


def init_weights_dit(model: nn.Module) -> None:
    """The DiT initialisation shared by EDT and MDT: xavier-uniform linears
    with zero bias, the patch projection like a linear, N(0, 0.02) label table
    and timestep MLP, trunc-normal(0.02) relative-position tables.  Model-specific
    zeroing (adaLN-Zero, output layer) is done by each model."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, RelativePositionBias):
            nn.init.trunc_normal_(m.relative_position_bias_table, std=0.02)
    w = model.x_embedder.proj.weight.data
    nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
    nn.init.zeros_(model.x_embedder.proj.bias)
    nn.init.normal_(model.y_embedder.embedding_table.weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[2].weight, std=0.02)


def zero_module_(linear: nn.Linear) -> None:
    nn.init.zeros_(linear.weight)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)
