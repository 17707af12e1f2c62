"""Route the attention of existing DiT / MDT / EDT models through
:func:`edt_kernels.amm_attention`, in place, and add EDT's AMM to pretrained
DiTs without retraining.

    >>> report = edt_kernels.patch_model(model)            # same outputs, fused attention
    >>> handle = edt_kernels.apply_amm(model, "DiT-XL/2")  # training-free AMM (blocks 15,17,19,22,24)
    >>> handle.undo(); edt_kernels.unpatch_model(report)   # back to the original forwards

How it works: each supported attention module gets an instance attribute
``forward`` (a bound replacement from the table ``ATTENTION_KINDS`` below) that
computes exactly what the module's own forward computes, from the module's own
``qkv``/``proj``/bias-table parameters (no copy: ``state_dict()`` is the same
tensors before and after).  ``unpatch_model`` deletes that attribute (or puts
back the one that was there), so the original forward is the very same
function again.  Nothing global is rebound.

Supported module types (``ATTENTION_KINDS``):

* ``"timm"``: timm's ``Attention`` (``timm.layers`` / ``timm.models.vision_transformer``,
  any version; used by DiT, SiT, ...).  Detected by class name and module;
  timm itself is optional.  ``q_norm``/``k_norm``/``norm``/``gate``,
  ``attn_mask`` and ``is_causal`` are honoured; attention dropout is not
  (a module with ``attn_drop.p > 0`` raises in training mode).
* ``"mdt"``: MDT/MDTv2's ``Attention`` (``rel_pos_bias`` table with a
  ``relative_position_index`` buffer, ``forward(x, ids_keep=None)``): the bias
  is gathered at ``ids_keep`` inside the kernel instead of materialised.
* ``"edt"``: EDT's ``AttentionBlock`` (``rel_pos_bias`` table, ``local`` flag
  switching on the AMM in eval mode, ``input_resolution``).

A module type of your own that computes what one of these computes can be
patched with ``patch_model(model, targets={MyAttention: "timm"})``.

Modules that already compute through ``amm_attention`` (``edt_kernels.AMMAttention``
and the attention of this repository's ``edt.models``) are left alone by
``patch_model`` (listed as skipped) and take ``apply_amm`` through their own
AMM settings.
"""
from __future__ import annotations

import inspect
import math
import types
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .amm import AMM, GridLike, modulation_matrix, normalize_grid, relative_position_index
from .attention import amm_attention, available_backends

__all__ = [
    "ATTENTION_KINDS",
    "AMM_PRESETS",
    "AttentionKind",
    "AMMHandle",
    "PatchReport",
    "PatchedModule",
    "UnsupportedModuleError",
    "patch_model",
    "unpatch_model",
    "apply_amm",
    "is_patched",
]

_STATE_ATTR = "_edt_kernels_patch"

AMMLike = Union[None, bool, AMM]


class UnsupportedModuleError(TypeError):
    """A module handed to the patcher is not one of ``ATTENTION_KINDS``."""


# ----------------------------------------------------------------------------- per-module state

@dataclass
class _PatchState:
    """Stored on a patched module (a plain attribute: not in ``state_dict``)."""

    kind: str
    backend: str
    grid: Optional[Tuple[int, int]]  # the module's own grid (mdt/edt), None for timm
    had_instance_forward: bool
    instance_forward: object = None  # the instance-level ``forward`` that was there, if any
    # AMM override: None = the module's own behaviour, False = off, AMM = on.
    amm: Union[None, bool, AMM] = None
    amm_eval_only: bool = False
    amm_grid: Optional[Tuple[int, int]] = None  # grid for the AMM override (timm: else from N)
    native_modulation: Optional[torch.Tensor] = field(default=None, repr=False)  # edt, non-published M


def _state(module: nn.Module) -> Optional[_PatchState]:
    st = module.__dict__.get(_STATE_ATTR)
    return st if isinstance(st, _PatchState) else None


def is_patched(module: nn.Module) -> bool:
    """Whether ``module``'s forward is currently routed through ``amm_attention``."""
    return _state(module) is not None


def _square_grid(n_tokens: int) -> Tuple[int, int]:
    side = math.isqrt(n_tokens)
    if side * side != n_tokens:
        raise ValueError(f"AMM needs the token grid: N = {n_tokens} tokens is not a square; "
                         "pass grid=(rows, cols) to apply_amm / patch_model")
    return side, side


def _override_amm(st: _PatchState, training: bool):
    """(active, amm) for the patcher's AMM override; active False = use the module's own."""
    if st.amm is None:
        return False, None
    if st.amm is False or (st.amm_eval_only and training):
        return True, None
    return True, st.amm


def _check_attn_dropout(module: nn.Module) -> None:
    drop = getattr(module, "attn_drop", None)
    p = getattr(drop, "p", 0.0)
    if module.training and p:
        raise RuntimeError(
            f"{type(module).__name__} has attention dropout p={p} in training mode, which the "
            "fused attention does not implement: set attn_drop.p = 0, call model.eval(), or "
            "edt_kernels.unpatch_model(model)")


# ----------------------------------------------------------------------------- replacement forwards

def _timm_forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                  is_causal: bool = False) -> torch.Tensor:
    """timm ``Attention.forward`` through ``amm_attention``."""
    st: _PatchState = getattr(self, _STATE_ATTR)
    _check_attn_dropout(self)
    B, N, C = x.shape  # (B, N, C)
    H = self.num_heads
    D = self.qkv.out_features // (3 * H)
    gate_layer = getattr(self, "gate", None)
    gate = gate_layer(x).sigmoid() if gate_layer is not None else None
    qkv = self.qkv(x).reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)  # (3, B, H, N, D), a view
    q, k, v = qkv.unbind(0)
    q_norm, k_norm = getattr(self, "q_norm", None), getattr(self, "k_norm", None)
    if q_norm is not None:
        q = q_norm(q)
    if k_norm is not None:
        k = k_norm(k)

    bias = None
    if is_causal:  # timm: is_causal takes precedence over attn_mask
        bias = torch.full((N, N), float("-inf"), device=x.device, dtype=q.dtype).triu(1)
    elif attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            bias = torch.zeros(attn_mask.shape, device=x.device, dtype=q.dtype).masked_fill(
                ~attn_mask, float("-inf"))
        else:
            bias = attn_mask

    active, amm = _override_amm(st, self.training)
    grid = None
    if active and amm is not None:
        grid = st.amm_grid if st.amm_grid is not None else _square_grid(N)
    out = amm_attention(q, k, v, scale=self.scale, grid=grid, amm=amm, bias=bias,
                        backend=st.backend)  # (B, H, N, D)
    x = out.transpose(1, 2).reshape(B, N, H * D)
    norm = getattr(self, "norm", None)
    if norm is not None:
        x = norm(x)
    if gate is not None:
        x = x * gate
    x = self.proj(x)
    drop = getattr(self, "proj_drop", None)
    return drop(x) if drop is not None else x


def _mdt_forward(self, x: torch.Tensor, ids_keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """MDT ``Attention.forward(x, ids_keep)``: bias gathered at ``ids_keep`` in-kernel."""
    st: _PatchState = getattr(self, _STATE_ATTR)
    _check_attn_dropout(self)
    B, N, C = x.shape  # (B, N, C); N = len(ids_keep[0]) when masked
    H = self.num_heads
    qkv = self.qkv(x).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)  # (3, B, H, N, D)
    q, k, v = qkv.unbind(0)
    _, amm = _override_amm(st, self.training)
    out = amm_attention(q, k, v, scale=self.scale,
                        rel_pos_bias=self.rel_pos_bias.relative_position_bias_table,
                        grid=st.grid, positions=ids_keep, amm=amm, backend=st.backend)
    x = out.transpose(1, 2).reshape(B, N, C)
    return self.proj_drop(self.proj(x))


def _edt_forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """EDT ``AttentionBlock.forward``: bias table + AMM (``local`` and eval mode)."""
    st: _PatchState = getattr(self, _STATE_ATTR)
    if mask is not None:
        raise NotImplementedError(
            "EDT attention: the published forward ignores its `mask` argument; the patched "
            "forward refuses it rather than ignore it silently (pass mask=None)")
    _check_attn_dropout(self)
    B, N, C = x.shape  # (B, N, C)
    H = self.num_heads
    qkv = self.qkv(x).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)  # (3, B, H, N, D)
    q, k, v = qkv.unbind(0)
    active, amm = _override_amm(st, self.training)
    modulation = None
    if not active and getattr(self, "local", False) and not self.training:
        if st.native_modulation is None:
            amm = AMM()  # the published matrix, computed in-kernel from the grid
        else:  # a module whose stored matrix is not the published one: use it as is
            modulation = st.native_modulation.to(device=x.device, dtype=q.dtype)
    out = amm_attention(q, k, v, scale=self.scale,
                        rel_pos_bias=self.rel_pos_bias.relative_position_bias_table,
                        grid=st.grid, amm=amm, modulation=modulation, backend=st.backend)
    x = out.transpose(1, 2).reshape(B, N, C)
    return self.proj_drop(self.proj(x))


# ----------------------------------------------------------------------------- the table

def _has_linear(module: nn.Module, name: str) -> bool:
    return isinstance(getattr(module, name, None), nn.Linear)


def _has_common(module: nn.Module) -> bool:
    return (_has_linear(module, "qkv") and _has_linear(module, "proj")
            and isinstance(getattr(module, "num_heads", None), int)
            and isinstance(getattr(module, "scale", None), (int, float)))


def _forward_params(module: nn.Module) -> List[str]:
    try:
        return list(inspect.signature(type(module).forward).parameters)[1:]
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return []


def _table(module: nn.Module) -> Optional[torch.Tensor]:
    rpb = getattr(module, "rel_pos_bias", None)
    t = getattr(rpb, "relative_position_bias_table", None)
    return t if isinstance(t, torch.Tensor) else None


def _match_timm(m: nn.Module) -> bool:
    cls = type(m)
    return (cls.__name__ == "Attention" and cls.__module__.split(".")[0] == "timm"
            and _has_common(m))


def _check_timm(m: nn.Module) -> List[str]:
    why = []
    if not _has_common(m):
        why.append("needs qkv (nn.Linear), proj (nn.Linear), num_heads (int) and scale (float)")
        return why
    if m.qkv.out_features % (3 * m.num_heads):
        why.append(f"qkv.out_features = {m.qkv.out_features} is not a multiple of 3 * num_heads")
    if getattr(m, "rel_pos_bias", None) is not None:
        why.append("has a rel_pos_bias that timm's Attention does not use (an MDT/EDT module?)")
    return why


def _grid_of(m: nn.Module) -> Optional[Tuple[int, int]]:
    rpb = getattr(m, "rel_pos_bias", None)
    ws = getattr(rpb, "window_size", None)
    if ws is not None:
        return normalize_grid(tuple(int(w) for w in ws) if isinstance(ws, (tuple, list)) else int(ws))
    res = getattr(m, "input_resolution", None)
    if res is not None:
        return normalize_grid(tuple(res) if isinstance(res, (tuple, list)) else int(res))
    return None


def _check_table_grid(m: nn.Module, grid, why: List[str]) -> None:
    table = _table(m)
    if grid is None:
        why.append("cannot tell the token grid (no rel_pos_bias.window_size / input_resolution)")
        return
    need = (2 * grid[0] - 1) * (2 * grid[1] - 1)
    if table.dim() != 2 or table.shape[0] < need or table.shape[1] != m.num_heads:
        why.append(f"rel_pos_bias.relative_position_bias_table has shape {list(table.shape)}, "
                   f"expected [>= {need}, num_heads={m.num_heads}] for grid {grid}")
    idx = getattr(m.rel_pos_bias, "relative_position_index", None)
    if isinstance(idx, torch.Tensor) and idx.device.type != "meta":
        want = relative_position_index(grid)
        if tuple(idx.shape) != tuple(want.shape) or not torch.equal(idx.detach().cpu().long(), want):
            why.append("rel_pos_bias.relative_position_index is not the BEiT/Swin layout of SPEC 2")


def _match_mdt(m: nn.Module) -> bool:
    return (_has_common(m) and _table(m) is not None
            and isinstance(getattr(m.rel_pos_bias, "relative_position_index", None), torch.Tensor)
            and "ids_keep" in _forward_params(m))


def _check_mdt(m: nn.Module) -> List[str]:
    why = []
    if not _has_common(m) or _table(m) is None:
        return ["needs qkv, proj, num_heads, scale and rel_pos_bias.relative_position_bias_table"]
    if "ids_keep" not in _forward_params(m):
        why.append("forward has no ids_keep parameter")
    if m.qkv.out_features != 3 * m.qkv.in_features:
        why.append("qkv must map C -> 3C")
    _check_table_grid(m, _grid_of(m), why)
    return why


def _match_edt(m: nn.Module) -> bool:
    return (_has_common(m) and _table(m) is not None and hasattr(m, "local")
            and hasattr(m, "input_resolution") and "ids_keep" not in _forward_params(m))


def _check_edt(m: nn.Module) -> List[str]:
    why = []
    if not _has_common(m) or _table(m) is None:
        return ["needs qkv, proj, num_heads, scale and rel_pos_bias.relative_position_bias_table"]
    if m.qkv.out_features != 3 * m.qkv.in_features:
        why.append("qkv must map C -> 3C")
    _check_table_grid(m, _grid_of(m), why)
    return why


def _prepare_edt(m: nn.Module, st: _PatchState) -> None:
    mm = getattr(m, "modulation_matrix", None)
    if isinstance(mm, torch.Tensor) and st.grid is not None:
        published = modulation_matrix(st.grid, dtype=torch.float64)
        dense = mm.detach().to("cpu", torch.float64)
        if dense.shape[-2:] != published.shape or not torch.allclose(
                dense.reshape(published.shape), published, rtol=1e-5, atol=1e-6):
            st.native_modulation = mm.detach()


@dataclass(frozen=True)
class AttentionKind:
    """One row of the patch table: how to recognise a module type and what
    replaces its forward."""

    name: str
    description: str
    match: Callable[[nn.Module], bool]  # auto-detection
    check: Callable[[nn.Module], List[str]]  # reasons the module cannot be patched ([] = fine)
    forward: Callable  # replacement, bound to the module
    prepare: Optional[Callable[[nn.Module, _PatchState], None]] = None


ATTENTION_KINDS: Dict[str, AttentionKind] = {
    k.name: k for k in (
        AttentionKind("timm", "timm Attention (timm.layers / timm.models.vision_transformer; DiT, SiT)",
                      _match_timm, _check_timm, _timm_forward),
        AttentionKind("mdt", "MDT/MDTv2 Attention (rel_pos_bias + relative_position_index, forward(x, ids_keep))",
                      _match_mdt, _check_mdt, _mdt_forward),
        AttentionKind("edt", "EDT AttentionBlock (rel_pos_bias, local AMM flag, input_resolution)",
                      _match_edt, _check_edt, _edt_forward, _prepare_edt),
    )
}


def _supported_text() -> str:
    return "; ".join(f"{k.name!r}: {k.description}" for k in ATTENTION_KINDS.values())


def _detect(module: nn.Module) -> Optional[AttentionKind]:
    for kind in ATTENTION_KINDS.values():
        if kind.match(module):
            return kind
    return None


# ----------------------------------------------------------------------------- report

@dataclass
class PatchedModule:
    name: str
    kind: str
    cls: str
    module: nn.Module = field(repr=False, compare=False)
    state: _PatchState = field(repr=False, compare=False)


@dataclass
class PatchReport:
    """What :func:`patch_model` did.  ``undo()`` restores the original forwards."""

    patched: List[PatchedModule] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)  # (name, reason)

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
        return "\n".join(lines)


# ----------------------------------------------------------------------------- patch / unpatch

def _check_backend(backend: str) -> None:
    names = available_backends()  # also imports the optional backends now, not inside a compiled region
    if not isinstance(backend, str) or (backend != "auto" and backend not in names):
        raise ValueError(f"backend must be 'auto' or one of {names}, got {backend!r}")


def _check_amm_arg(amm, name: str = "amm") -> Union[None, bool, AMM]:
    if amm is None or amm is False:
        return amm
    if amm is True:
        return AMM()
    if isinstance(amm, AMM):
        return amm
    raise TypeError(f"{name} must be None, True/False or an edt_kernels.AMM(...) config, "
                    f"got {type(amm).__name__}")


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


def _patch_one(module: nn.Module, kind: AttentionKind, backend: str, amm) -> _PatchState:
    why = kind.check(module)
    if why:
        raise UnsupportedModuleError(
            f"cannot patch {type(module).__name__} as {kind.name!r}: " + "; ".join(why))
    had = "forward" in module.__dict__
    st = _PatchState(kind=kind.name, backend=backend, grid=_grid_of(module) if kind.name != "timm" else None,
                     had_instance_forward=had, instance_forward=module.__dict__.get("forward"),
                     amm=amm)
    if kind.prepare is not None:
        kind.prepare(module, st)
    module.__dict__[_STATE_ATTR] = st
    module.forward = types.MethodType(kind.forward, module)
    return st


def _restore_one(module: nn.Module) -> bool:
    st = _state(module)
    if st is None:
        return False
    if st.had_instance_forward:
        module.__dict__["forward"] = st.instance_forward
    else:
        module.__dict__.pop("forward", None)
    del module.__dict__[_STATE_ATTR]
    return True


def _verify(module: nn.Module, st: _PatchState, name: str) -> None:
    """Run the original and the patched forward on one random input; undo and
    raise when they differ."""
    p = next(module.parameters())
    C = module.qkv.in_features
    grid = st.grid or (4, 4)
    x = torch.randn(2, grid[0] * grid[1], C, device=p.device, dtype=p.dtype)
    original = st.instance_forward if st.had_instance_forward else types.MethodType(type(module).forward, module)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            want, got = original(x), module.forward(x)
    finally:
        module.train(was_training)
    tol = 1e-4 if p.dtype in (torch.float32, torch.float64) else 2e-2
    if not torch.allclose(got.float(), want.float(), rtol=tol, atol=tol):
        _restore_one(module)
        raise RuntimeError(f"patch_model(verify=True): the patched forward of {name or '<root>'} "
                           f"({type(module).__name__}, kind {st.kind!r}) differs from the original by "
                           f"{(got.float() - want.float()).abs().max().item():.3g}: not patched")


def patch_model(model: nn.Module, amm: AMMLike = None, *, targets=None, backend: str = "auto",
                verify: bool = False) -> PatchReport:
    """Route every supported attention module of ``model`` through ``amm_attention``, in place.

    Args:
        model: any ``nn.Module`` (the model itself may be an attention module).
        amm: ``None`` keeps each module's own behaviour (EDT: its ``local`` AMM in
            eval mode); ``True``/``AMM(...)`` applies the AMM in every patched
            attention (see :func:`apply_amm` for chosen blocks); ``False`` switches
            every AMM off.
        targets: ``None`` patches every module recognised in ``ATTENTION_KINDS``;
            a list of classes patches only those (each must be recognised, else
            :class:`UnsupportedModuleError` lists the supported types); a dict
            ``{cls: kind}`` declares a class of your own to compute what ``kind``
            computes.
        backend: ``amm_attention`` backend for the patched modules.
        verify: compare each patched forward with the original on a random input
            (eval mode, no grad) and refuse the patch if they differ.

    Returns a :class:`PatchReport`; modules already patched are listed as skipped.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_backend(backend)
    amm = _check_amm_arg(amm)
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


def unpatch_model(target: Union[nn.Module, PatchReport, "AMMHandle"]) -> int:
    """Restore the original forward of the modules patched by a report (or of
    every patched module inside a model).  Returns how many were restored."""
    if isinstance(target, AMMHandle):
        return target.undo()
    if isinstance(target, PatchReport):
        n = 0
        for p in target.patched:
            if _state(p.module) is p.state:
                n += _restore_one(p.module)
        return n
    if isinstance(target, nn.Module):
        return sum(_restore_one(m) for m in list(target.modules()))
    raise TypeError(f"unpatch_model takes a model, a PatchReport or an AMMHandle, got {type(target).__name__}")


# ----------------------------------------------------------------------------- training-free AMM

# Published placements of the training-free AMM (SPEC 3): preset -> (depth, block indices).
AMM_PRESETS: Dict[str, Tuple[int, Tuple[int, ...]]] = {
    "DiT-XL/2": (28, (15, 17, 19, 22, 24)),
    "DiT-S/2": (12, (8, 10)),
}


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
            st = _state(e.module)
            if e.patched_here is not None:
                n += unpatch_model(e.patched_here)
            elif st is not None:
                st.amm, st.amm_eval_only, st.amm_grid = e.previous
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


def _is_amm_attention(m: nn.Module) -> bool:
    from .nn import AMMAttention

    return isinstance(m, AMMAttention)


def _is_edt_models_attention(m: nn.Module) -> bool:
    """``edt.models`` attention (``RelPosAttention``): already calls ``amm_attention``,
    with the published AMM switched by the ``amm`` / ``amm_in_training`` flags."""
    return (type(m).__module__.split(".")[0] == "edt" and isinstance(getattr(m, "amm", None), bool)
            and isinstance(getattr(m, "amm_in_training", None), bool)
            and callable(getattr(m, "amm_active", None)))


def _native_kind(m: nn.Module) -> Optional[str]:
    """Modules that compute through ``amm_attention`` already (nothing to patch)."""
    if _is_amm_attention(m):
        return "AMMAttention"
    if _is_edt_models_attention(m):
        return "edt.models"
    return None


def _native_set_amm(m: nn.Module, amm, eval_only: bool, grid, label: str) -> Tuple:
    """Switch the AMM of a native module; returns what undo needs."""
    if _is_amm_attention(m):
        previous = (m.amm, m.amm_eval_only, m.grid)
        if grid is not None and m.grid is not None and tuple(grid) != tuple(m.grid):
            raise ValueError(f"{label}: grid {grid} differs from the module's grid {m.grid}")
        m.amm = amm if amm is not False else None
        m.amm_eval_only = eval_only
        if grid is not None:
            m.grid = grid
        return previous
    previous = (m.amm, m.amm_in_training)
    if amm is not False and amm != AMM():
        raise ValueError(f"{label} ({type(m).__name__}) supports only the published AMM (amm=True), "
                         f"got {amm}")
    own = getattr(m, "grid", None)
    if grid is not None and own is not None and tuple(grid) != tuple(normalize_grid(own)):
        raise ValueError(f"{label}: grid {grid} differs from the module's grid {own}")
    m.amm = amm is not False
    m.amm_in_training = not eval_only
    return previous


def _native_restore(m: nn.Module, previous: Tuple) -> None:
    if _is_amm_attention(m):
        m.amm, m.amm_eval_only, m.grid = previous
    else:
        m.amm, m.amm_in_training = previous


def _is_attention(m: nn.Module, tmap) -> bool:
    if is_patched(m) or _native_kind(m) is not None:
        return True
    if tmap is not None:
        return any(isinstance(m, c) for c in tmap)
    return _detect(m) is not None


def _attention_of(block: nn.Module, label: str, tmap) -> nn.Module:
    if _is_attention(block, tmap):
        return block
    attn = getattr(block, "attn", None)
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


def _resolve_blocks(model: nn.Module, blocks) -> List[Tuple[str, nn.Module]]:
    if isinstance(blocks, str):
        if blocks not in AMM_PRESETS:
            raise ValueError(f"unknown AMM preset {blocks!r}; presets: {sorted(AMM_PRESETS)} "
                             "(or pass a list of block indices / modules)")
        depth, idx = AMM_PRESETS[blocks]
        seq = getattr(model, "blocks", None)
        if seq is None or len(seq) != depth:
            raise ValueError(f"AMM preset {blocks!r} is for a model with {depth} blocks in model.blocks; "
                             f"this model has {len(seq) if seq is not None else 'no'} blocks")
        blocks = list(idx)
    if isinstance(blocks, (nn.Module, int)):
        blocks = [blocks]
    if not isinstance(blocks, Sequence) or not blocks:
        raise TypeError("blocks must be a preset name, or a non-empty list of indices into model.blocks "
                        f"or of modules, got {blocks!r}")
    out = []
    for b in blocks:
        if isinstance(b, bool):
            raise TypeError(f"blocks must hold ints or nn.Modules, got {b!r}")
        if isinstance(b, int):
            seq = getattr(model, "blocks", None)
            if not isinstance(seq, (nn.ModuleList, nn.Sequential)):
                raise ValueError("block indices need model.blocks (an nn.ModuleList); pass the modules instead")
            if not 0 <= b < len(seq):
                raise IndexError(f"block index {b} out of range for model.blocks of length {len(seq)}")
            out.append((f"blocks.{b}", seq[b]))
        elif isinstance(b, nn.Module):
            name = next((n for n, m in model.named_modules() if m is b), None)
            if name is None:
                raise ValueError(f"module {type(b).__name__} passed in blocks is not part of the model")
            out.append((name, b))
        else:
            raise TypeError(f"blocks must hold ints or nn.Modules, got {type(b).__name__}")
    return out


def apply_amm(model: nn.Module, blocks: Union[str, Sequence[Union[int, nn.Module]]],
              grid: Optional[GridLike] = None, amm: AMMLike = True, *, eval_only: bool = False,
              targets=None, backend: str = "auto") -> AMMHandle:
    """Training-free AMM (EDT, SPEC 3) in the attention of the given blocks.

    ``out = (softmax(q k^T scale [+ bias]) ⊙ M) v`` in those blocks only, with the
    module's own weights (DiT-with-AMM).

    Args:
        model: the model (e.g. a stock DiT built from timm's ``Attention``).
        blocks: a preset name (``AMM_PRESETS``: ``"DiT-XL/2"`` -> blocks 15, 17,
            19, 22, 24; ``"DiT-S/2"`` -> 8, 10), or a list of indices into
            ``model.blocks``, or of modules (blocks or their attention).
        grid: token grid ``n``/``(rows, cols)``; default: the module's own grid
            (MDT/EDT) or ``sqrt(N)`` at call time (N must be a square).
        amm: ``True`` (published), an ``AMM(...)`` config, or ``False`` to switch
            the AMM off in those blocks (EDT's own included).
        eval_only: apply it in eval mode only (as the published EDT does).
        targets, backend: as :func:`patch_model`, for attention not yet patched.

    Returns an :class:`AMMHandle`; ``handle.undo()`` restores the previous state.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if amm is None:
        raise TypeError("amm must be True/False or an edt_kernels.AMM(...) config, got None")
    amm = _check_amm_arg(amm)
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
                patched_here = patch_model(attn, targets=sub_targets, backend=backend)
            st = _state(attn)
            if grid is not None and st.grid is not None and tuple(grid) != tuple(st.grid):
                if patched_here is not None:
                    unpatch_model(patched_here)
                raise ValueError(f"{label}: grid {grid} differs from the module's own grid {st.grid}")
            entries.append(_AMMEntry(attn, patched_here, (st.amm, st.amm_eval_only, st.amm_grid)))
            st.amm, st.amm_eval_only, st.amm_grid = amm, eval_only, grid
    except Exception:
        AMMHandle(entries, []).undo()
        raise
    return AMMHandle(entries, [label for label, _ in resolved])
