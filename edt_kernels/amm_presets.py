"""Training-free AMM: EDT's Attention Modulation Matrix added to chosen blocks
of a pretrained DiT, with the model's own weights (DiT-with-AMM).

    out = (softmax(q k^T scale [+ bias]) ⊙ M) v   in those blocks only

    >>> handle = edt_kernels.apply_amm(model, "DiT-XL/2")   # blocks 15, 17, 19, 22, 24
    >>> handle.undo()

The published placements are the presets below (EDT, Chen et al. 2024, the
"DiT-XL-2 with AMM" experiments).  Blocks are indexed in ``model.blocks`` (the
DiT / MDT / EDT layout) or ``model.transformer_blocks`` (diffusers'
``DiTTransformer2DModel``, e.g. the transformer of ``facebook/DiT-XL-2-256``).
Attention not yet patched is patched for the call (see
:func:`edt_kernels.patch_model`) and unpatched again by ``undo()``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

from torch import nn

from . import diffusers as _diffusers
from ._validation import coerce_amm
from .amm import GridLike, AMMLike, normalize_grid
from .patch import (PatchReport, UnsupportedModuleError, _as_model, _check_backend, _detect, _native_kind,
                    _resolve_targets, _supported_text, _sync, is_patched, patch_model, state_of, unpatch_model)

__all__ = ["AMM_PRESETS", "AMMHandle", "apply_amm"]

# Published placements of the training-free AMM: preset -> (depth, block indices).
AMM_PRESETS: Dict[str, Tuple[int, Tuple[int, ...]]] = {
    "DiT-XL/2": (28, (15, 17, 19, 22, 24)),
    "DiT-S/2": (12, (8, 10)),
}

_BLOCK_LISTS = ("blocks", "transformer_blocks")  # DiT/MDT/EDT, diffusers


@dataclass
class _AMMEntry:
    module: nn.Module
    patched_here: Optional[PatchReport]
    previous: Tuple


class AMMHandle:
    """Returned by :func:`apply_amm`; ``undo()`` (or leaving a ``with`` block)
    restores the previous AMM settings and unpatches what ``apply_amm`` patched."""

    def __init__(self, entries: List[_AMMEntry], names: List[str]):
        self._entries = entries
        self.names = names

    @property
    def modules(self) -> List[nn.Module]:
        return [e.module for e in self._entries]

    def undo(self) -> int:
        n = 0
        for e in reversed(self._entries):
            st = state_of(e.module)
            if e.patched_here is not None:
                n += unpatch_model(e.patched_here)
            elif st is not None:
                st.amm, st.amm_eval_only, st.amm_grid = e.previous
                _sync(e.module)
                n += 1
            elif _native_kind(e.module) is not None:
                _native_restore(e.module, e.previous)
                n += 1
        self._entries = []
        return n

    remove = undo

    def __enter__(self) -> "AMMHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.undo()

    def __repr__(self) -> str:
        return f"AMMHandle({self.names})"


# ----------------------------------------------------------------------------- modules computing through amm_attention

def _native_set_amm(m: nn.Module, amm, eval_only: bool, grid, label: str) -> Tuple:
    """Switch the AMM of a module that already calls ``amm_attention``; returns
    what undo needs."""
    if _native_kind(m) == "AMMAttnProcessor":
        return _diffusers.set_processor_amm(m, amm, eval_only, grid)
    previous = (m.amm, m.amm_eval_only, m.grid)  # an AMMAttention
    if grid is not None and m.grid is not None and tuple(grid) != tuple(m.grid):
        raise ValueError(f"{label}: grid {grid} differs from the module's grid {m.grid}")
    m.amm = amm
    m.amm_eval_only = eval_only
    if grid is not None:
        m.grid = grid
    return previous


def _native_restore(m: nn.Module, previous: Tuple) -> None:
    if _native_kind(m) == "AMMAttnProcessor":
        _diffusers.restore_processor(m, previous)
    else:  # an AMMAttention
        m.amm, m.amm_eval_only, m.grid = previous


# ----------------------------------------------------------------------------- which blocks

def _is_attention(m: nn.Module, tmap) -> bool:
    if is_patched(m) or _native_kind(m) is not None:
        return True
    if tmap is not None:
        return any(isinstance(m, c) for c in tmap)
    kind = _detect(m)
    # a type that may be cross-attention (diffusers): only the ones the patch can reproduce
    return kind is not None and not (kind.skip_unsupported and kind.check(m))


def _attention_of(block: nn.Module, label: str, tmap) -> nn.Module:
    if _is_attention(block, tmap):
        return block
    for attr in ("attn", "attn1"):  # DiT/timm blocks, diffusers' BasicTransformerBlock
        attn = getattr(block, attr, None)
        if isinstance(attn, nn.Module) and _is_attention(attn, tmap):
            return attn
    found = [m for m in block.modules() if _is_attention(m, tmap)]
    if len(found) == 1:
        return found[0]
    if not found:
        raise UnsupportedModuleError(
            f"{label} ({type(block).__name__}) contains no supported attention module. Supported: "
            f"{_supported_text()}; or edt_kernels.AMMAttention. Pass targets={{YourAttention: '<kind>'}} "
            "for a type of your own")
    raise ValueError(f"{label} contains {len(found)} attention modules: pass the attention modules "
                     "themselves in blocks=[...]")


def _block_list(model: nn.Module) -> Tuple[Optional[str], Optional[nn.Module]]:
    for attr in _BLOCK_LISTS:
        seq = getattr(model, attr, None)
        if isinstance(seq, (nn.ModuleList, nn.Sequential)):
            return attr, seq
    return None, None


def _resolve_blocks(model: nn.Module, blocks) -> List[Tuple[str, nn.Module]]:
    attr, seq = _block_list(model)
    if isinstance(blocks, str):
        if blocks not in AMM_PRESETS:
            raise ValueError(f"unknown AMM preset {blocks!r}; presets: {sorted(AMM_PRESETS)} "
                             "(or pass a list of block indices / modules)")
        depth, idx = AMM_PRESETS[blocks]
        if seq is None or len(seq) != depth:
            raise ValueError(f"AMM preset {blocks!r} is for a model with {depth} blocks in model.blocks "
                             f"(or model.transformer_blocks); this model has "
                             f"{len(seq) if seq is not None else 'no'} blocks")
        blocks = list(idx)
    if isinstance(blocks, (nn.Module, int)):
        blocks = [blocks]
    if not isinstance(blocks, Sequence) or not blocks:
        raise TypeError("blocks must be a preset name, or a non-empty list of indices into model.blocks "
                        f"(or model.transformer_blocks) or of modules, got {blocks!r}")
    out = []
    for b in blocks:
        if isinstance(b, bool):
            raise TypeError(f"blocks must hold ints or nn.Modules, got {b!r}")
        if isinstance(b, int):
            if seq is None:
                raise ValueError("block indices need model.blocks or model.transformer_blocks (an "
                                 "nn.ModuleList); pass the modules instead")
            if not 0 <= b < len(seq):
                raise IndexError(f"block index {b} out of range for model.{attr} of length {len(seq)}")
            out.append((f"{attr}.{b}", seq[b]))
        elif isinstance(b, nn.Module):
            name = next((n for n, m in model.named_modules() if m is b), None)
            if name is None:
                raise ValueError(f"module {type(b).__name__} passed in blocks is not part of the model")
            out.append((name, b))
        else:
            raise TypeError(f"blocks must hold ints or nn.Modules, got {type(b).__name__}")
    return out


# ----------------------------------------------------------------------------- apply_amm

def apply_amm(model: nn.Module, blocks: Union[str, Sequence[Union[int, nn.Module]]],
              grid: Optional[GridLike] = None, amm: AMMLike = True, *, eval_only: bool = False,
              targets=None, backend: str = "auto") -> AMMHandle:
    """Training-free AMM (EDT) in the attention of the given blocks.

    ``out = (softmax(q k^T scale [+ bias]) ⊙ M) v`` in those blocks only, with the
    module's own weights (DiT-with-AMM).

    Args:
        model: the model (e.g. a stock DiT built from timm's ``Attention``, or
            diffusers' ``DiTTransformer2DModel`` / a ``DiTPipeline``).
        blocks: a preset name (``AMM_PRESETS``: ``"DiT-XL/2"`` -> blocks 15, 17,
            19, 22, 24; ``"DiT-S/2"`` -> 8, 10), or a list of indices into
            ``model.blocks`` (``model.transformer_blocks`` for diffusers), or of
            modules (blocks or their attention).
        grid: token grid ``n``/``(rows, cols)``; default: the module's own grid
            (MDT/EDT), the ``(H, W)`` of a 4-d diffusers input, or ``sqrt(N)`` at
            call time (N must be a square).
        amm: ``True`` (published), an ``AMM(...)`` config, or ``None``/``False``
            to switch the AMM off in those blocks (EDT's own included).
        eval_only: apply it in eval mode only (as the published EDT does).
        targets, backend: as :func:`patch_model`, for attention not yet patched.

    Returns an :class:`AMMHandle`; ``handle.undo()`` restores the previous state.
    """
    model = _as_model(model, "apply_amm")
    amm = coerce_amm(amm)
    grid = normalize_grid(grid) if grid is not None else None
    if not isinstance(eval_only, bool):
        raise TypeError(f"eval_only must be a bool, got {type(eval_only).__name__}")
    _check_backend(backend)
    tmap = _resolve_targets(targets)
    resolved = [(n, _attention_of(b, n, tmap)) for n, b in _resolve_blocks(model, blocks)]
    seen = set()
    entries: List[_AMMEntry] = []
    try:
        for label, attn in resolved:
            if id(attn) in seen:
                raise ValueError(f"{label}: the same attention module is listed twice in blocks")
            seen.add(id(attn))
            if _native_kind(attn) is not None:
                entries.append(_AMMEntry(attn, None, _native_set_amm(attn, amm, eval_only, grid, label)))
                continue
            patched_here = None
            if not is_patched(attn):
                sub_targets = None if tmap is None else {c: k for c, k in tmap.items() if isinstance(attn, c)}
                patched_here = patch_model(attn, targets=sub_targets, backend=backend, strict=True)
            st = state_of(attn)
            if grid is not None and st.grid is not None and tuple(grid) != tuple(st.grid):
                if patched_here is not None:
                    unpatch_model(patched_here)
                raise ValueError(f"{label}: grid {grid} differs from the module's own grid {st.grid}")
            entries.append(_AMMEntry(attn, patched_here, (st.amm, st.amm_eval_only, st.amm_grid)))
            st.amm, st.amm_eval_only, st.amm_grid = amm, eval_only, grid
            _sync(attn)
    except Exception:
        AMMHandle(entries, []).undo()
        raise
    return AMMHandle(entries, [label for label, _ in resolved])
