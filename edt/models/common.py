"""Building blocks shared by EDT and MDTv2 (DiT lineage).

Layout (DiT ``models.py`` style): the random draws of masked training,
embedders, the adaLN-Zero block, the final layer, fixed sin-cos positional
embeddings, initialisation, and the model base class (configuration,
``backend``, AMM placement, classifier-free guidance).

Every module computes through the ``edt_kernels`` ops (``amm_attention`` via
:class:`edt_kernels.nn.AMMAttention`, ``layernorm_modulate``,
``gated_residual``, ``patch_merge_modulate``, ``random_masking``,
``unshuffle_with_mask_token``, ``masked_shortcut``) and passes them its
``backend``:

- ``"auto"`` (default): each op picks its fastest implementation that fits
  the inputs (``EDT_KERNELS_BACKEND`` overrides the choice);
- ``"eager"``: the authors' code path, op for op: the attention bias is
  materialised from the table (for masked MDT tokens by the two gathers of the
  published ``get_masked_rel_bias`` into ``[B, H, K, K]``), softmax, then the
  dense AMM; the token and adaLN work in plain PyTorch.  Benchmarks call it
  "published-style eager";
- any other backend name an op accepts (``"triton"``, ``"torch"``, ...).

Shapes, orders and constants follow the published EDT, MDTv2 and DiT code;
the code is ours.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from edt_kernels import AMM, gated_residual, layernorm_modulate, mlp_gelu_tanh
from edt_kernels import nn as kernels_nn
from edt_kernels._validation import infer_grid
from edt_kernels.nn import AMMAttention

__all__ = [
    "modulate",
    "TimestepEmbedder",
    "LabelEmbedder",
    "PatchEmbed",
    "Mlp",
    "Modulated",
    "batched_modulations",
    "AdaLNBlock",
    "FinalLayer",
    "get_2d_sincos_pos_embed",
    "uniform",
    "host_generator",
    "Draws",
    "unpatchify",
    "LN_EPS",
    "EAGER",
    "CFG_CHANNELS",
    "DiffusionTransformer",
]

LN_EPS = 1e-6  # every LayerNorm in DiT / MDT / EDT: no affine, eps 1e-6
FREQ_EMBED_SIZE = 256  # sinusoidal timestep features fed to the timestep MLP
EAGER = "eager"  # the backend that runs the authors' code path
# Classifier-free guidance is applied to the first 3 latent channels (DiT's choice, kept by MDT and EDT).
CFG_CHANNELS = 3


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation: ``x * (1 + scale) + shift`` with per-sample ``(B, C)``
    shift/scale broadcast over the tokens of ``x`` ``(B, N, C)``."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#                            Random draws (masking)                             #
#################################################################################

def uniform(shape: Sequence[int], generator: Optional[torch.Generator], device) -> torch.Tensor:
    """``U[0, 1)`` samples drawn from ``generator`` (on the generator's device,
    then moved to ``device``) or from the global RNG on ``device``.
    The label dropout and the masks draw through here, in the same order on every
    backend."""
    if generator is None:
        return torch.rand(tuple(shape), device=device)
    out = torch.rand(tuple(shape), generator=generator, device=generator.device)
    return out.to(device)


def host_generator(generator: Optional[torch.Generator]) -> Optional[torch.Generator]:
    """A CPU generator for the draws that size a step (read on the host, so no device sync):
    ``generator`` itself when it is a CPU one (or None: the global CPU RNG); for a device
    generator, a CPU generator seeded from its seed and offset, both host-side state, so
    it follows the device generator's draws and is the same for the same seed."""
    if generator is None or generator.device.type == "cpu":
        return generator
    seed = (generator.initial_seed() * 0x9E3779B97F4A7C15 + generator.get_offset()) % (1 << 63)
    return torch.Generator().manual_seed(seed)


class Draws:
    """A forward's random draws made ahead of it, taken back in the order they were made
    (one forward per ``Draws``).

    A model's ``draw_ahead`` makes them with the generator, in the order its forward would,
    and the forward given ``draws=`` takes them instead of drawing: the same numbers, and a
    forward that draws nothing and reads nothing back from the device, so that it compiles
    whole (``torch.compile(fullgraph=True)``) and is captured as one CUDA graph."""

    def __init__(self, values: Sequence[Any]):
        self.values = tuple(values)
        self._next = 0

    def take(self) -> Any:
        value = self.values[self._next]
        self._next += 1
        return value


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

    def drops(self, train: bool) -> bool:
        """Whether a forward in this mode draws the label dropout."""
        return train and self.dropout_prob > 0

    def token_drop(self, labels, force_drop_ids=None, draw=None):
        """``draw``: the ``U[0, 1)`` samples of the dropout drawn ahead (the model's
        ``draw_ahead``); without it they come from the global RNG."""
        if force_drop_ids is None:
            if draw is None:
                draw = uniform(labels.shape, None, labels.device)
            drop_ids = draw < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels, train: bool, force_drop_ids=None, draw=None):
        if self.drops(train) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids, draw)
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
    """``fc2(gelu_tanh(fc1(x)))`` (timm ``Mlp`` layout), one
    ``edt_kernels.mlp_gelu_tanh`` call (its backward recomputes the GELU)."""

    def __init__(self, in_features: int, hidden_features: int, backend: str = "auto"):
        super().__init__()
        self.backend = backend
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The op has the "torch" and "eager" backends only: a model on a kernel
        # backend ("triton", ...) runs its MLP on "auto".
        backend = self.backend if self.backend in ("torch", EAGER) else "auto"
        return mlp_gelu_tanh(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
                             backend=backend)


#################################################################################
#                 Attention with relative position bias (+ AMM)                 #
#################################################################################
# The models' attention is edt_kernels.nn.AMMAttention (state-dict keys qkv.*,
# proj.*, rel_pos_bias.relative_position_bias_table[, relative_position_index])
# with a qkv bias and AMM (when set) in eval mode only.

def _attention(dim: int, num_heads: int, grid: int, extra_rows: int, persistent_index: bool,
               rel_pos_first: bool, backend: str) -> AMMAttention:
    if dim % num_heads:
        raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
    return AMMAttention(dim, num_heads, qkv_bias=True, grid=grid, extra_tokens=extra_rows,
                        amm_eval_only=True, backend=backend, persistent_index=persistent_index,
                        rel_pos_first=rel_pos_first)


#################################################################################
#                 adaLN modulation, per module or batched                       #
#################################################################################

class Modulated(nn.Module):
    """A module conditioned by adaLN: ``adaLN_modulation = Sequential(SiLU, Linear(cond_dim,
    n * width))`` whose output is cut into ``n = modulation_chunks`` rows ``(B, width)``
    (shift, scale, gate, ...)."""

    modulation_chunks: int

    def modulation(self, c: torch.Tensor, rows: Optional[Tuple[torch.Tensor, ...]] = None
                   ) -> Tuple[torch.Tensor, ...]:
        """The module's modulation rows ``Linear(SiLU(c)).chunk(n)``, or ``rows`` when the model
        computed them for all its modules at once (:func:`batched_modulations`)."""
        if rows is not None:
            return rows
        return self.adaLN_modulation(c).chunk(self.modulation_chunks, dim=1)


class _ConcatLinear(torch.autograd.Function):
    """``x @ cat(weights).T + cat(biases)`` that keeps the parameters, not their concatenation, for the
    backward (which concatenates the weights again): a copy of every modulation weight would otherwise
    stay alive until the backward of each pass."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, n: int, *params: torch.Tensor) -> torch.Tensor:
        weights, biases = params[:n], params[n:]
        ctx.save_for_backward(x, *weights)
        ctx.sizes = [w.shape[0] for w in weights]
        return torch.addmm(torch.cat(biases), x, torch.cat(weights).t())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, *weights = ctx.saved_tensors
        grad_x = grad @ torch.cat(weights) if ctx.needs_input_grad[0] else None
        grad_w = (grad.t() @ x).split(ctx.sizes)  # rows of one matmul: contiguous per weight
        grad_b = grad.sum(0).split(ctx.sizes)
        return (grad_x, None, *grad_w, *grad_b)


def batched_modulations(modules: Sequence[Modulated], c: torch.Tensor) -> List[Tuple[torch.Tensor, ...]]:
    """Every module's :meth:`Modulated.modulation` rows from one SiLU and one matmul.

    The modules' modulation linears all read ``SiLU(c)``: their weights (and biases) are
    concatenated along the outputs and applied at once, and the result is split back into each
    module's rows.  The parameters stay per module (the published state dict), and the backward
    keeps them rather than their concatenation.  Each row is the same dot product as the module's
    own linear, up to float summation order.  On a GPU this is 4 launches (SiLU, two
    concatenations, the matmul) instead of 2 per module, and in the backward one concatenation, one
    matmul per input and per weight gradient and one bias sum instead of one each per module, with
    no sum of per-module gradients into ``c``."""
    linears = [m.adaLN_modulation[-1] for m in modules]
    out = _ConcatLinear.apply(F.silu(c), len(linears), *[lin.weight for lin in linears],
                              *[lin.bias for lin in linears])  # (B, sum of outputs)
    sizes = [lin.out_features // m.modulation_chunks for m, lin in zip(modules, linears)
             for _ in range(m.modulation_chunks)]
    rows = out.split(sizes, dim=1)  # one split: its backward is one concatenation
    result, start = [], 0
    for m in modules:
        result.append(rows[start:start + m.modulation_chunks])
        start += m.modulation_chunks
    return result


#################################################################################
#                         adaLN-Zero block, final layer                         #
#################################################################################

class AdaLNBlock(Modulated):
    """DiT block with adaLN-Zero conditioning and relative-position attention::

        x = x + gate_msa * attn(LN(x) * (1 + scale_msa) + shift_msa)
        x = x + gate_mlp * mlp(LN(x) * (1 + scale_mlp) + shift_mlp)

    ``shift, scale, gate`` (x2) come from ``Linear(SiLU(c))`` with ``c`` of
    width ``cond_dim``; ``skip=True`` adds MDT's long-skip input projection
    ``skip_linear(cat[x, skip])`` in front of the block.  The attention applies
    EDT's AMM, when switched on, in eval mode only.
    """

    modulation_chunks = 6

    def __init__(self, hidden_size: int, num_heads: int, grid: int, cond_dim: Optional[int] = None,
                 mlp_ratio: float = 4.0, skip: bool = False, extra_rows: int = 0,
                 persistent_index: bool = False, rel_pos_first: bool = False, backend: str = "auto"):
        super().__init__()
        cond_dim = hidden_size if cond_dim is None else cond_dim
        self.hidden_size = hidden_size
        self.grid = grid
        self.backend = backend
        self.attn = _attention(hidden_size, num_heads, grid, extra_rows, persistent_index, rel_pos_first,
                               backend)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), backend)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * hidden_size, bias=True))
        self.skip_linear = nn.Linear(2 * hidden_size, hidden_size) if skip else None

    def forward(self, x: torch.Tensor, c: torch.Tensor, skip: Optional[torch.Tensor] = None,
                positions: Optional[torch.Tensor] = None,
                mod: Optional[Tuple[torch.Tensor, ...]] = None) -> torch.Tensor:
        """x ``(B, N, C)``, c ``(B, cond_dim)``, skip ``(B, N, C)``; ``positions``
        ``(B, N)``: grid indices of the tokens when only a subset is present; ``mod``: the
        modulation rows computed by the model (:meth:`Modulated.modulation`)."""
        be = self.backend
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))  # (B, N, C)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(c, mod)  # (B, C) each
        h = self.attn(layernorm_modulate(x, shift_msa, scale_msa, LN_EPS, backend=be), positions)
        x = gated_residual(x, gate_msa, h, backend=be)
        h = self.mlp(layernorm_modulate(x, shift_mlp, scale_mlp, LN_EPS, backend=be))
        return gated_residual(x, gate_mlp, h, backend=be)  # (B, N, C)


class FinalLayer(Modulated):
    """adaLN (shift, scale) -> ``Linear(hidden -> p*p*out_channels)``."""

    modulation_chunks = 2

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, backend: str = "auto"):
        super().__init__()
        self.backend = backend
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor,
                mod: Optional[Tuple[torch.Tensor, ...]] = None) -> torch.Tensor:
        shift, scale = self.modulation(c, mod)  # (B, D) each
        x = layernorm_modulate(x, shift, scale, LN_EPS, backend=self.backend)
        return self.linear(x)  # (B, N, p*p*out_channels)


def unpatchify(x: torch.Tensor, patch_size: int, out_channels: int) -> torch.Tensor:
    """``(B, N, p*p*C)`` tokens -> ``(B, C, H, W)``."""
    B, N, _ = x.shape
    h = w = infer_grid(N, "the number of tokens")
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
        elif isinstance(m, kernels_nn.RelativePositionBias):
            nn.init.trunc_normal_(m.relative_position_bias_table, std=0.02)
    w = model.x_embedder.proj.weight.data
    nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
    nn.init.zeros_(model.x_embedder.proj.bias)
    nn.init.normal_(model.y_embedder.embedding_table.weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[2].weight, std=0.02)


def zero_module_(linear: nn.Linear) -> None:
    """Zero a linear layer (adaLN-Zero gates, the output layer)."""
    nn.init.zeros_(linear.weight)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


def _check_backend(backend: Any) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str such as 'auto' or '{EAGER}', got {type(backend).__name__}")
    return backend


#################################################################################
#                                   Model base                                  #
#################################################################################

class DiffusionTransformer(nn.Module):
    """What EDT and MDTv2 share around their layouts.

    - ``config``: the constructor arguments (``type(model)(**model.config)``
      rebuilds the model); a subclass passes its ``locals()`` first thing in
      its ``__init__``;
    - ``backend``: setting it sets every submodule's ``backend`` (all ops of a
      forward run on the same choice);
    - AMM placement over the flat list :meth:`all_blocks` (``set_amm``,
      ``amm_blocks``, ``default_amm_blocks``), AMM in eval mode only;
    - classifier-free guidance on ``[cond, uncond]`` halves (``_guided``).
    """

    def __init__(self, arguments: Mapping[str, Any]):
        super().__init__()
        config = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in arguments.items()
                  if k not in ("self", "__class__")}
        self._backend = _check_backend(config["backend"])
        self.config = config  # constructor arguments: type(model)(**model.config) rebuilds it

    def _embedders(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int,
                   num_classes: int, class_dropout_prob: float, learn_sigma: bool) -> None:
        """The input/output sizes and the three embedders (patches, timesteps, labels)."""
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.learn_sigma = learn_sigma
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.hidden_size = hidden_size
        self.num_classes = num_classes
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)

    def _zero_adaln(self, blocks: Sequence[AdaLNBlock]) -> None:
        """adaLN-Zero: the modulation of ``blocks`` and of the final layer, and the output layer, zeroed."""
        for blk in blocks:
            zero_module_(blk.adaLN_modulation[-1])
        zero_module_(self.final_layer.adaLN_modulation[-1])
        zero_module_(self.final_layer.linear)

    # ----------------------------------------------------------------- backend

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        self._backend = _check_backend(value)
        for m in self.modules():
            if m is not self and hasattr(m, "backend"):
                m.backend = value

    # --------------------------------------------------------------------- AMM

    def all_blocks(self) -> List[AdaLNBlock]:
        """The blocks an AMM placement indexes, in order (a training-only block is not among them)."""
        raise NotImplementedError

    def _check_blocks(self, blocks: Sequence[int]) -> Tuple[int, ...]:
        blocks = tuple(sorted({int(b) for b in blocks}))
        n = len(self.all_blocks())
        bad = [b for b in blocks if not 0 <= b < n]
        if bad:
            raise ValueError(f"amm_blocks {bad} out of range: this model has blocks 0..{n - 1}")
        return blocks

    def set_amm(self, enabled: bool = True, blocks: Optional[Sequence[int]] = None) -> Tuple[int, ...]:
        """Switch AMM (eval mode only) on at ``blocks`` (default: the model's
        placement ``default_amm_blocks``) or off everywhere.  Returns the
        previous placement, so that ``model.set_amm(True, prev)`` /
        ``set_amm(False)`` restores it."""
        previous = self.amm_blocks
        active = self._check_blocks(self.default_amm_blocks if blocks is None else blocks) if enabled else ()
        for i, blk in enumerate(self.all_blocks()):
            blk.attn.amm = AMM() if i in active else None  # the published AMM of the block's grid
            blk.attn.amm_eval_only = True
        return previous

    @property
    def amm_blocks(self) -> Tuple[int, ...]:
        """Blocks (indices into :meth:`all_blocks`) whose attention applies AMM in eval mode."""
        return tuple(i for i, blk in enumerate(self.all_blocks()) if blk.attn.amm is not None)

    # ----------------------------------------------------------------- forward

    def _draw_labels(self, batch: int, generator: Optional[torch.Generator], device) -> List[Any]:
        """The label dropout's draw of a forward in the current mode (first of :class:`Draws`)."""
        return [uniform((batch,), generator, device)] if self.y_embedder.drops(self.training) else []

    def _embed(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
               draws: Draws) -> Tuple[torch.Tensor, torch.Tensor]:
        """Tokens ``(B, N, D)`` with the positional embedding, and the conditioning
        ``c = t_emb + y_emb`` ``(B, D)`` (labels dropped in training, the draw taken from ``draws``)."""
        x = self.x_embedder(x) + self.pos_embed  # (B, N, D)
        draw = draws.take() if self.y_embedder.drops(self.training) else None
        c = self.t_embedder(t) + self.y_embedder(y, self.training, draw=draw)  # (B, D)
        return x, c

    def _modulations(self, c: torch.Tensor, modules: Sequence[Modulated]) -> Dict[Modulated, Tuple[torch.Tensor, ...]]:
        """The modulation rows of ``modules`` (those this forward runs), by module, computed at
        once (:func:`batched_modulations`); empty on the authors' path (``"eager"``) and under
        torch.compile, where every module computes its own."""
        if self.backend == EAGER or torch.compiler.is_compiling():
            # under torch.compile launches are the compiler's to fuse, and its partitioner would keep
            # the concatenated weights for the backward (hundreds of MiB per pass at XL)
            return {}
        return dict(zip(modules, batched_modulations(modules, c)))

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        return unpatchify(x, self.patch_size, self.out_channels)

    def _guided(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                scale: Union[float, torch.Tensor], cfg_channels: int) -> torch.Tensor:
        """Classifier-free guidance on a batch made of [cond, uncond] halves:
        the first half of ``x`` is run twice (labels ``y`` carry the null
        class in the second half) and ``uncond + scale * (cond - uncond)`` is
        applied to the first ``cfg_channels`` output channels; ``scale`` is a
        number or a per-sample ``(B/2, 1, 1, 1)`` tensor."""
        half = x[: len(x) // 2]
        combined = torch.cat([half, half], dim=0)
        model_out = self.forward(combined, t, y)
        eps, rest = model_out[:, :cfg_channels], model_out[:, cfg_channels:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        if isinstance(scale, torch.Tensor):
            scale = scale.to(eps.dtype)
        half_eps = uncond_eps + scale * (cond_eps - uncond_eps)
        eps = torch.cat([half_eps, half_eps], dim=0)
        return torch.cat([eps, rest], dim=1)
