"""Route the attention of existing DiT / MDT / EDT models (and diffusers'
transformers) through :func:`edt_kernels.amm_attention`, in place, and add
EDT's AMM to pretrained DiTs without retraining.

    >>> report = edt_kernels.patch_model(model)            # same outputs, fused attention
    >>> handle = edt_kernels.apply_amm(model, "DiT-XL/2")  # training-free AMM (blocks 15,17,19,22,24)
    >>> handle.undo(); edt_kernels.unpatch_model(report)   # back to the original forwards

How it works: each supported attention module gets an instance attribute
``forward`` (a bound replacement from the table ``ATTENTION_KINDS`` below) that
computes exactly what the module's own forward computes, from the module's own
``qkv``/``proj``/bias-table parameters (no copy: ``state_dict()`` is the same
tensors before and after).  ``unpatch_model`` deletes that attribute (or puts
back the one that was there), so the original forward is the very same
function again.  diffusers' ``Attention`` keeps its forward and gets an
:class:`edt_kernels.diffusers.AMMAttnProcessor` instead; undo puts the very
same processor object back.  Nothing global is rebound.

Supported module types (``ATTENTION_KINDS``):

* ``"timm"``: timm's ``Attention`` (``timm.layers`` / ``timm.models.vision_transformer``,
  any version; used by DiT, SiT, ...).  Detected by class name and module;
  timm itself is optional.  ``q_norm``/``k_norm``/``norm``/``gate``,
  ``attn_mask`` and ``is_causal`` are honoured; with attention dropout
  (``attn_drop.p > 0``) in training mode the module computes eagerly (one
  warning), as its own forward does.
* ``"mdt"``: MDT/MDTv2's ``Attention`` (``rel_pos_bias`` table with a
  ``relative_position_index`` buffer, ``forward(x, ids_keep=None)``): the bias
  is gathered at ``ids_keep`` inside the kernel instead of materialised.
* ``"edt"``: EDT's ``AttentionBlock`` (``rel_pos_bias`` table, ``local`` flag
  switching on the AMM in eval mode, ``input_resolution``).
* ``"diffusers"``: diffusers' ``Attention`` used as self-attention (DiT, PixArt's
  ``attn1``, ...) with its stock processor; cross-attention and other
  processors are left alone and listed in the report (see
  :mod:`edt_kernels.diffusers`).  diffusers itself is optional.

A module type of your own that computes what one of these computes can be
patched with ``patch_model(model, targets={MyAttention: "timm"})``.

Modules that already compute through ``amm_attention`` (``edt_kernels.AMMAttention``,
on which this repository's models are built, and diffusers ``Attention`` with an
``AMMAttnProcessor`` set by hand) are left alone by ``patch_model`` (listed as
skipped) and take ``apply_amm`` through their own AMM settings.  When a call
patches nothing and nothing in the model computes through ``amm_attention``,
``patch_model`` warns and lists the modules that looked like attention
(``strict=True`` raises instead).  The training-free AMM presets and
``apply_amm`` live in :mod:`edt_kernels.amm_presets`.
"""
from __future__ import annotations

import types
import warnings
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from . import diffusers as _diffusers
from ._patch_kinds import KINDS, STATE_ATTR, AttentionKind, PatchState, grid_of, state_of
from ._validation import coerce_amm
from .amm import KEEP, AMMLike
from .attention import available_backends
from .nn import AMMAttention

__all__ = [
    "ATTENTION_KINDS",
    "AttentionKind",
    "PatchReport",
    "PatchedModule",
    "UnsupportedModuleError",
    "patch_model",
    "unpatch_model",
    "is_patched",
]

class UnsupportedModuleError(TypeError):
    """A module handed to the patcher is not one of ``ATTENTION_KINDS``."""


def is_patched(module: nn.Module) -> bool:
    """Whether ``module``'s forward is currently routed through ``amm_attention``."""
    return state_of(module) is not None


# ----------------------------------------------------------------------------- the table

ATTENTION_KINDS: Dict[str, AttentionKind] = {k.name: k for k in KINDS + (_diffusers.DIFFUSERS_KIND,)}


def _supported_text() -> str:
    return "; ".join(f"{k.name!r}: {k.description}" for k in ATTENTION_KINDS.values())


def _detect(module: nn.Module) -> Optional[AttentionKind]:
    for kind in ATTENTION_KINDS.values():
        if kind.match(module):
            return kind
    return None


def _native_kind(m: nn.Module) -> Optional[str]:
    """Modules that compute through ``amm_attention`` already (nothing to patch),
    recognised by type."""
    if isinstance(m, AMMAttention):
        return "AMMAttention"
    if _diffusers.has_amm_processor(m):
        return "AMMAttnProcessor"
    return None


# ----------------------------------------------------------------------------- report

@dataclass
class PatchedModule:
    name: str
    kind: str
    cls: str
    module: nn.Module = field(repr=False, compare=False)
    state: PatchState = field(repr=False, compare=False)


@dataclass
class PatchReport:
    """What :func:`patch_model` did.  ``undo()`` restores the original forwards.

    ``patched``: the modules now computing through ``amm_attention``;
    ``skipped``: ``(name, reason)`` for modules already computing through it;
    ``left_alone``: ``(name, reason)`` for modules of a supported type that the
    patch cannot reproduce exactly (cross-attention, another processor, ...);
    ``seen``: ``(name, class)`` of other modules that looked like attention.
    """

    patched: List[PatchedModule] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)  # (name, reason)
    left_alone: List[Tuple[str, str]] = field(default_factory=list)  # (name, reason)
    seen: List[Tuple[str, str]] = field(default_factory=list)  # (name, class)

    def __len__(self) -> int:
        return len(self.patched)

    def __iter__(self) -> Iterator[PatchedModule]:
        return iter(self.patched)

    @property
    def names(self) -> List[str]:
        return [p.name for p in self.patched]

    def counts(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for p in self.patched:
            out[p.kind] = out.get(p.kind, 0) + 1
        return out

    def undo(self) -> int:
        return unpatch_model(self)

    def __str__(self) -> str:
        kinds = ", ".join(f"{n} x {k}" for k, n in self.counts().items()) or "nothing"
        lines = [f"edt_kernels.patch_model: patched {len(self.patched)} attention module(s) ({kinds})"]
        lines += [f"  {p.name or '<root>'}: {p.kind} ({p.cls})" for p in self.patched]
        lines += [f"  skipped {n or '<root>'}: {why}" for n, why in self.skipped]
        lines += [f"  left alone {n or '<root>'}: {why}" for n, why in self.left_alone]
        if self.seen:
            lines.append("  other modules that look like attention: " + _seen_text(self.seen))
        return "\n".join(lines)


def _seen_text(seen: List[Tuple[str, str]]) -> str:
    by_cls: Dict[str, List[str]] = {}
    for name, cls in seen:
        by_cls.setdefault(cls, []).append(name or "<root>")
    return "; ".join(f"{cls} x {len(names)} (e.g. {names[0]})" for cls, names in by_cls.items())


def _looks_like_attention(m: nn.Module) -> bool:
    """A hint for the "patched nothing" message, not a detection."""
    if isinstance(m, nn.MultiheadAttention):
        return True
    name = type(m).__name__.lower()
    if "attention" in name or name.endswith("attn") or name.startswith("attn"):
        return True
    return any(isinstance(getattr(m, a, None), nn.Linear) for a in ("qkv", "to_q", "q_proj", "to_qkv"))


# ----------------------------------------------------------------------------- patch / unpatch

def _as_model(model, fn: str) -> nn.Module:
    """An ``nn.Module``, or a pipeline holding one as ``.transformer`` (diffusers)."""
    if isinstance(model, nn.Module):
        return model
    inner = getattr(model, "transformer", None)
    if isinstance(inner, nn.Module):
        return inner
    raise TypeError(f"{fn}: model must be an nn.Module (or a pipeline with an nn.Module .transformer), "
                    f"got {type(model).__name__}")


def _check_backend(backend: str) -> None:
    names = available_backends()  # also imports the optional backends now, not inside a compiled region
    if not isinstance(backend, str) or (backend != "auto" and backend not in names):
        raise ValueError(f"backend must be 'auto' or one of {names}, got {backend!r}")


def _coerce_override(amm: AMMLike):
    """``KEEP`` (each module's own AMM setting) or the one meaning of ``amm``
    (:func:`edt_kernels._validation.coerce_amm`: None/False = no AMM)."""
    return amm if amm is KEEP else coerce_amm(amm)


def _resolve_targets(targets) -> Optional[Dict[type, Optional[str]]]:
    """``None`` | iterable of classes | mapping class -> kind name."""
    if targets is None:
        return None
    if isinstance(targets, type):
        targets = [targets]
    if isinstance(targets, Mapping):
        items = list(targets.items())
    elif isinstance(targets, Iterable) and not isinstance(targets, (str, bytes)):
        items = [(t, None) for t in targets]
    else:
        raise TypeError(f"targets must be a list of nn.Module classes or a dict {{class: kind}}, "
                        f"got {type(targets).__name__}")
    out: Dict[type, Optional[str]] = {}
    for cls, kind in items:
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TypeError(f"targets must contain nn.Module subclasses, got {cls!r}")
        if kind is not None and kind not in ATTENTION_KINDS:
            raise ValueError(f"unknown attention kind {kind!r} for {cls.__name__}; supported kinds: "
                             f"{_supported_text()}")
        out[cls] = kind
    return out


def _patch_one(module: nn.Module, kind: AttentionKind, backend: str, amm) -> PatchState:
    why = kind.check(module)
    if why:
        raise UnsupportedModuleError(
            f"cannot patch {type(module).__name__} as {kind.name!r}: " + "; ".join(why))
    had = "forward" in module.__dict__
    st = PatchState(kind=kind.name, backend=backend, grid=grid_of(module) if kind.own_grid else None,
                    had_instance_forward=had, instance_forward=module.__dict__.get("forward"), amm=amm)
    if kind.prepare is not None:
        kind.prepare(module, st)
    if kind.install is not None:
        kind.install(module, st)
        module.__dict__[STATE_ATTR] = st
    else:
        module.__dict__[STATE_ATTR] = st
        module.forward = types.MethodType(kind.forward, module)
    return st


def _restore_one(module: nn.Module) -> bool:
    st = state_of(module)
    if st is None:
        return False
    kind = ATTENTION_KINDS.get(st.kind)
    if kind is not None and kind.restore is not None:
        kind.restore(module, st)
    elif st.had_instance_forward:
        module.__dict__["forward"] = st.instance_forward
    else:
        module.__dict__.pop("forward", None)
    del module.__dict__[STATE_ATTR]
    return True


def _sync(module: nn.Module) -> None:
    """Push the AMM fields of a patched module's state to where the kind reads them."""
    st = state_of(module)
    kind = ATTENTION_KINDS.get(st.kind) if st is not None else None
    if kind is not None and kind.sync is not None:
        kind.sync(module, st)


def _verify(module: nn.Module, st: PatchState, name: str) -> None:
    """Run the original and the patched computation on one random input; undo
    and raise when they differ."""
    kind = ATTENTION_KINDS[st.kind]
    x, original = kind.sample(module, st)
    p = next(module.parameters())
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            want, got = original(x), module(x)
    finally:
        module.train(was_training)
    tol = 1e-4 if p.dtype in (torch.float32, torch.float64) else 2e-2
    if not torch.allclose(got.float(), want.float(), rtol=tol, atol=tol):
        _restore_one(module)
        raise RuntimeError(f"patch_model(verify=True): the patched forward of {name or '<root>'} "
                           f"({type(module).__name__}, kind {st.kind!r}) differs from the original by "
                           f"{(got.float() - want.float()).abs().max().item():.3g}: not patched")


def _nothing_patched_message(report: PatchReport, model: nn.Module) -> str:
    msg = [f"edt_kernels.patch_model patched nothing in {type(model).__name__}: no module of a "
           f"supported type was found (supported: {', '.join(ATTENTION_KINDS)}; or edt_kernels.AMMAttention)."]
    if report.left_alone:
        msg.append("Left alone (a supported type, but not reproducible exactly): " + "; ".join(
            f"{n or '<root>'}: {why}" for n, why in report.left_alone) + ".")
    if report.seen:
        msg.append("Modules that looked like attention: " + _seen_text(report.seen) + ".")
    else:
        msg.append("No module looked like attention.")
    msg.append("A type of your own that computes what one of the kinds computes can be declared with "
               "targets={YourAttention: '<kind>'}.")
    return " ".join(msg)


def patch_model(model: nn.Module, amm: AMMLike = KEEP, *, targets=None, backend: str = "auto",
                verify: bool = False, strict: bool = False) -> PatchReport:
    """Route every supported attention module of ``model`` through ``amm_attention``, in place.

    Args:
        model: any ``nn.Module`` (the model itself may be an attention module),
            or a diffusers pipeline (its ``.transformer`` is patched).
        amm: ``KEEP`` (the default) keeps each module's own behaviour (EDT: its
            ``local`` AMM in eval mode); ``True``/``AMM(...)`` applies the AMM in
            every patched attention (see :func:`edt_kernels.apply_amm` for chosen
            blocks); ``None``/``False`` switches every AMM off.
        targets: ``None`` patches every module recognised in ``ATTENTION_KINDS``;
            a list of classes patches only those (each must be recognised, else
            :class:`UnsupportedModuleError` lists the supported types); a dict
            ``{cls: kind}`` declares a class of your own to compute what ``kind``
            computes.
        backend: ``amm_attention`` backend for the patched modules.
        verify: compare each patched forward with the original on a random input
            (eval mode, no grad) and refuse the patch if they differ.
        strict: raise :class:`UnsupportedModuleError` instead of warning when
            nothing in the model ends up computing through ``amm_attention``, and
            when a module of a supported type had to be left alone.

    Returns a :class:`PatchReport`; modules already patched are listed as skipped,
    modules that cannot be reproduced exactly as left alone.
    """
    model = _as_model(model, "patch_model")
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be a bool, got {type(strict).__name__}")
    _check_backend(backend)
    amm = _coerce_override(amm)
    tmap = _resolve_targets(targets)
    report = PatchReport()
    found_classes = set()
    plan: List[Tuple[str, nn.Module, AttentionKind]] = []
    for name, module in model.named_modules():
        if tmap is None:
            kind = _detect(module)
            if kind is None:
                native = _native_kind(module)
                if native is not None:
                    report.skipped.append((name, f"{native}: already computed by amm_attention"))
                elif not is_patched(module) and _looks_like_attention(module):
                    report.seen.append((name, f"{type(module).__module__}.{type(module).__qualname__}"))
                continue
        else:
            cls = next((c for c in tmap if isinstance(module, c)), None)
            if cls is None:
                continue
            found_classes.add(cls)
            kind = ATTENTION_KINDS[tmap[cls]] if tmap[cls] is not None else _detect(module)
            if kind is None:
                raise UnsupportedModuleError(
                    f"{name or '<root>'} ({type(module).__module__}.{type(module).__qualname__}) is not "
                    f"a supported attention type. Supported: {_supported_text()}. If it computes what "
                    f"one of these computes, pass targets={{{type(module).__name__}: '<kind>'}}")
        if is_patched(module):
            report.skipped.append((name, "already patched"))
            continue
        if kind.skip_unsupported:
            why = kind.check(module)
            if why:
                report.left_alone.append((name, f"{type(module).__name__}: " + "; ".join(why)))
                continue
        plan.append((name, module, kind))
    if tmap is not None:
        missing = [c.__name__ for c in tmap if c not in found_classes]
        if missing:
            raise ValueError(f"targets {missing} do not occur in the model")
    for name, module, kind in plan:  # check everything before touching anything
        why = kind.check(module)
        if why:
            raise UnsupportedModuleError(
                f"cannot patch {name or '<root>'} ({type(module).__name__}) as {kind.name!r}: " + "; ".join(why))
    if strict and report.left_alone:
        raise UnsupportedModuleError("patch_model(strict=True): modules of a supported type cannot be "
                                     "reproduced exactly: " + "; ".join(
                                         f"{n or '<root>'}: {why}" for n, why in report.left_alone))
    if not plan and not report.skipped:
        msg = _nothing_patched_message(report, model)
        if strict:
            raise UnsupportedModuleError(msg)
        warnings.warn(msg, UserWarning, stacklevel=2)
    for name, module, kind in plan:
        st = _patch_one(module, kind, backend, amm)
        report.patched.append(PatchedModule(name, kind.name, type(module).__name__, module, st))
    if verify:
        try:
            for p in report.patched:
                _verify(p.module, p.state, p.name)
        except Exception:
            unpatch_model(report)
            raise
    return report


def unpatch_model(target: Union[nn.Module, PatchReport]) -> int:
    """Restore the original forward of the modules patched by a report (or of
    every patched module inside a model).  Returns how many were restored.
    (The handle of :func:`edt_kernels.apply_amm` is undone by its ``undo()``.)"""
    if isinstance(target, PatchReport):
        n = 0
        for p in target.patched:
            if state_of(p.module) is p.state:
                n += _restore_one(p.module)
        return n
    if isinstance(target, nn.Module) or isinstance(getattr(target, "transformer", None), nn.Module):
        return sum(_restore_one(m) for m in list(_as_model(target, "unpatch_model").modules()))
    raise TypeError(f"unpatch_model takes a model or a PatchReport, got {type(target).__name__}")
