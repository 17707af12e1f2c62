"""diffusers drop-in: an attention processor that computes diffusers'
``Attention`` through :func:`edt_kernels.amm_attention`.

    >>> pipe = DiTPipeline.from_pretrained(local_dir)         # facebook/DiT-XL-2-256
    >>> report = edt_kernels.patch_model(pipe.transformer)    # every self-attention
    >>> handle = edt_kernels.apply_amm(pipe.transformer, "DiT-XL/2")
    >>> handle.undo(); report.undo()                          # the original processors again

or by hand, for a model or one module::

    >>> attn.set_processor(AMMAttnProcessor())                # or model.set_attn_processor(...)

:class:`AMMAttnProcessor` reproduces the stock processors ``AttnProcessor2_0``,
``AttnProcessor`` and ``FusedAttnProcessor2_0`` for self-attention without a
mask: the optional ``spatial_norm`` and ``group_norm`` before the projections,
separate ``to_q``/``to_k``/``to_v`` or fused ``to_qkv`` (without q/k norms read as one
packed ``[B, N, 3, H, D]`` tensor by :func:`edt_kernels.amm_attention_qkvpacked`), ``norm_q``/``norm_k``
(which the classic ``AttnProcessor`` does not apply),
the output projection and dropout, ``residual_connection`` and
``rescale_output_factor``; 4-d inputs ``(B, C, H, W)`` give the AMM its grid
``(H, W)``.  A call with ``encoder_hidden_states`` or an ``attention_mask`` is
computed by the stock processor (the one it replaced), unless an AMM is on for
that call, which is then an error: the AMM is defined over the token grid of a
self-attention.

diffusers is optional: nothing here imports it until a processor falls back to
a stock one, and ``patch_model`` only looks for diffusers' ``Attention`` when
diffusers is already imported.
"""
from __future__ import annotations

import sys
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

from ._patch_kinds import AttentionKind, PatchState, square_grid
from .amm import AMM, GridLike, normalize_grid
from ._validation import coerce_amm
from .attention import amm_attention, amm_attention_qkvpacked

__all__ = ["AMMAttnProcessor", "unsupported_reasons"]

# Processors whose computation AMMAttnProcessor reproduces (by class name, in diffusers).
STOCK_PROCESSORS = ("AttnProcessor2_0", "AttnProcessor", "FusedAttnProcessor2_0")
_SDPA_PROCESSORS = ("AttnProcessor2_0", "FusedAttnProcessor2_0")  # scale = head_dim ** -0.5 (SDPA default)


def _attention_class() -> Optional[type]:
    """diffusers' ``Attention``, if diffusers is imported (never imports it)."""
    mod = sys.modules.get("diffusers.models.attention_processor")
    cls = getattr(mod, "Attention", None)
    return cls if isinstance(cls, type) else None


def _is_stock(processor) -> Optional[str]:
    cls = type(processor)
    if cls.__name__ in STOCK_PROCESSORS and cls.__module__.startswith("diffusers."):
        return cls.__name__
    return None


class AMMAttnProcessor:
    """diffusers attention processor computing through :func:`edt_kernels.amm_attention`.

    Args:
        amm: ``None``/``False`` (plain attention, the stock result), ``True``
            (EDT's published AMM) or an ``AMM(...)`` config.
        grid: token grid for the AMM; default ``(H, W)`` of a 4-d input, else a
            square ``sqrt(N)``.
        eval_only: apply the AMM in eval mode only.
        backend: ``amm_attention`` backend.
        fallback: the processor that computes calls this one cannot (cross-
            attention, a mask); default: diffusers' ``AttnProcessor2_0``
            (``FusedAttnProcessor2_0`` for fused projections).
    """

    def __init__(self, amm=None, *, grid: Optional[GridLike] = None, eval_only: bool = False,
                 backend: str = "auto", fallback=None):
        if not isinstance(eval_only, bool):
            raise TypeError(f"eval_only must be a bool, got {type(eval_only).__name__}")
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a str, got {type(backend).__name__}")
        if fallback is not None and not callable(fallback):
            raise TypeError(f"fallback must be a diffusers attention processor, got {type(fallback).__name__}")
        self.amm = coerce_amm(amm)
        self.grid = normalize_grid(grid) if grid is not None else None
        self.eval_only = eval_only
        self.backend = backend
        self.fallback = fallback

    def clone(self, **changes) -> "AMMAttnProcessor":
        kw = dict(amm=self.amm, grid=self.grid, eval_only=self.eval_only, backend=self.backend,
                  fallback=self.fallback)
        kw.update(changes)
        return AMMAttnProcessor(**kw)

    def __repr__(self) -> str:
        return (f"AMMAttnProcessor(amm={self.amm}, grid={self.grid}, eval_only={self.eval_only}, "
                f"backend={self.backend!r})")

    # -- helpers

    def active_amm(self, training: bool) -> Optional[AMM]:
        if self.amm is None or (self.eval_only and training):
            return None
        return self.amm

    def stock(self, attn: nn.Module) -> Callable:
        """The processor that computes what this one does not."""
        if self.fallback is not None:
            return self.fallback
        from diffusers.models.attention_processor import AttnProcessor2_0, FusedAttnProcessor2_0

        return FusedAttnProcessor2_0() if _uses_fused(attn, None) else AttnProcessor2_0()

    # -- the processor

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor,
                 encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None,
                 temb: Optional[torch.Tensor] = None) -> torch.Tensor:
        amm = self.active_amm(attn.training)
        if encoder_hidden_states is not None or attention_mask is not None:
            if amm is not None:
                what = "encoder_hidden_states (cross-attention)" if encoder_hidden_states is not None \
                    else "an attention_mask"
                raise ValueError(f"AMMAttnProcessor: the AMM is defined for self-attention over the token "
                                 f"grid without a mask; this call has {what}. Switch the AMM off for this "
                                 "module (apply_amm(..., amm=False) or handle.undo())")
            return self.stock(attn)(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                                    attention_mask=attention_mask, temb=temb)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        grid = self.grid
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
            grid = grid if grid is not None else (height, width)
        B, N, _ = hidden_states.shape  # (B, N, C)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        H = attn.heads
        normed = _is_stock(self.fallback) != "AttnProcessor" and (
            attn.norm_q is not None or attn.norm_k is not None)  # the classic processor has no q/k norms
        if amm is not None and grid is None:
            grid = square_grid(N)
        if _uses_fused(attn, self.fallback) and not normed:
            # to_qkv's output [q | k | v] reshaped is [B, N, 3, H, D]: one packed tensor, and one dqkv
            fused = attn.to_qkv(hidden_states)
            D = fused.shape[-1] // (3 * H)
            out = amm_attention_qkvpacked(fused.view(B, -1, 3, H, D), scale=attn.scale, grid=grid, amm=amm,
                                          backend=self.backend)  # (B, N, H, D)
            hidden_states = out.reshape(B, -1, H * D).to(fused.dtype)  # (B, N, C)
        else:
            if _uses_fused(attn, self.fallback):
                query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
            else:
                query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
            D = key.shape[-1] // H
            q = query.view(B, -1, H, D).transpose(1, 2)  # (B, H, N, D)
            k = key.view(B, -1, H, D).transpose(1, 2)
            v = value.view(B, -1, H, D).transpose(1, 2)
            if normed:
                if attn.norm_q is not None:
                    q = attn.norm_q(q)
                if attn.norm_k is not None:
                    k = attn.norm_k(k)
            out = amm_attention(q, k, v, scale=attn.scale, grid=grid, amm=amm, backend=self.backend)
            hidden_states = out.transpose(1, 2).reshape(B, -1, H * D).to(q.dtype)  # (B, N, C)
        hidden_states = attn.to_out[0](hidden_states)  # projection
        hidden_states = attn.to_out[1](hidden_states)  # dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _uses_fused(attn: nn.Module, stock) -> bool:
    """Fused ``to_qkv`` where the stock processor uses it (``FusedAttnProcessor2_0``),
    or, without a known stock processor, where the module has fused projections."""
    if stock is not None:
        return type(stock).__name__ == "FusedAttnProcessor2_0"
    return bool(getattr(attn, "fused_projections", False)) and isinstance(getattr(attn, "to_qkv", None), nn.Linear)


def unsupported_reasons(attn: nn.Module, processor=None) -> List[str]:
    """Why ``AMMAttnProcessor`` cannot replace ``processor`` (default: the
    module's own) on ``attn`` exactly; ``[]`` when it can."""
    cls = _attention_class()
    if cls is None or not isinstance(attn, cls):
        return [f"not a diffusers Attention ({type(attn).__name__})"]
    processor = attn.processor if processor is None else processor
    why = []
    name = _is_stock(processor)
    if name is None:
        why.append(f"processor {type(processor).__name__} is not one AMMAttnProcessor reproduces "
                   f"({', '.join(STOCK_PROCESSORS)})")
    if attn.is_cross_attention:
        why.append(f"cross-attention (cross_attention_dim={attn.cross_attention_dim}): keys and values "
                   "come from encoder_hidden_states")
    if attn.added_kv_proj_dim is not None or attn.only_cross_attention:
        why.append("added key/value projections (added_kv_proj_dim)")
    if attn.to_out is None or len(attn.to_out) < 2:
        why.append("no output projection (pre_only)")
    if name == "FusedAttnProcessor2_0":
        if not isinstance(getattr(attn, "to_qkv", None), nn.Linear):
            why.append("FusedAttnProcessor2_0 without a fused to_qkv projection")
    elif not all(isinstance(getattr(attn, p, None), nn.Linear) for p in ("to_q", "to_k", "to_v")):
        why.append("needs to_q, to_k and to_v (nn.Linear)")
    if not why and name != "FusedAttnProcessor2_0":
        if attn.to_k.out_features != attn.to_q.out_features or attn.to_v.out_features != attn.to_q.out_features:
            why.append(f"keys/values of width {attn.to_k.out_features} and queries of width "
                       f"{attn.to_q.out_features} (grouped key/value heads)")
        elif attn.to_q.out_features % attn.heads:
            why.append(f"inner width {attn.to_q.out_features} is not a multiple of heads = {attn.heads}")
    if not why and name in _SDPA_PROCESSORS:
        width = attn.to_qkv.out_features // 3 if name == "FusedAttnProcessor2_0" else attn.to_k.out_features
        sdpa_scale = (width // attn.heads) ** -0.5
        if abs(attn.scale - sdpa_scale) > 1e-12 * sdpa_scale:
            why.append(f"{name} ignores attn.scale = {attn.scale:.6g} (it uses head_dim ** -0.5 = "
                       f"{sdpa_scale:.6g})")
    return why


def has_amm_processor(m: nn.Module) -> bool:
    """A diffusers ``Attention`` computing through an ``AMMAttnProcessor`` set by hand."""
    cls = _attention_class()
    return (cls is not None and isinstance(m, cls) and isinstance(getattr(m, "processor", None), AMMAttnProcessor)
            and "_edt_kernels_patch" not in m.__dict__)


def set_processor_amm(m: nn.Module, amm, eval_only: bool, grid) -> Tuple:
    """``apply_amm`` on a module with a hand-set ``AMMAttnProcessor``: a copy for
    this module only (the hand-set one may be shared by every layer)."""
    previous = m.processor
    m.set_processor(previous.clone(amm=amm, eval_only=eval_only,
                                   grid=grid if grid is not None else previous.grid))
    return (previous,)


def restore_processor(m: nn.Module, previous: Tuple) -> None:
    m.set_processor(previous[0])


# ----------------------------------------------------------------------------- the patch-table row

def _match(m: nn.Module) -> bool:
    cls = _attention_class()
    return cls is not None and isinstance(m, cls) and not isinstance(getattr(m, "processor", None),
                                                                     AMMAttnProcessor)


def _check(m: nn.Module) -> List[str]:
    return unsupported_reasons(m)


def _amm_of(st: PatchState) -> Tuple[Optional[AMM], bool]:
    amm = st.amm if isinstance(st.amm, AMM) else None
    return amm, st.amm_eval_only


def _install(m: nn.Module, st: PatchState) -> None:
    amm, eval_only = _amm_of(st)
    st.original_processor = m.processor
    st.processor = AMMAttnProcessor(amm, grid=st.amm_grid, eval_only=eval_only, backend=st.backend,
                                    fallback=m.processor)
    m.set_processor(st.processor)


def _restore(m: nn.Module, st: PatchState) -> None:
    if m.processor is st.processor:  # not replaced by someone else since
        m.set_processor(st.original_processor)


def _sync(m: nn.Module, st: PatchState) -> None:
    st.processor.amm, st.processor.eval_only = _amm_of(st)
    st.processor.grid = st.amm_grid


def _sample(m: nn.Module, st: PatchState):
    p = next(m.parameters())
    x = torch.randn(2, 16, m.query_dim, device=p.device, dtype=p.dtype)
    return x, lambda h: st.original_processor(m, h)


DIFFUSERS_KIND = AttentionKind(
    "diffusers",
    "diffusers Attention as self-attention with its stock processor (DiTTransformer2DModel, PixArt attn1, ...)",
    _match, _check, install=_install, restore=_restore, sync=_sync, sample=_sample, skip_unsupported=True)

