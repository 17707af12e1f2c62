"""The rows of the patch table for timm, MDT and EDT attention: how each module
type is recognised, what can stop it from being patched, and the replacement
forward that computes what the module's own forward computes through
:func:`edt_kernels.amm_attention_qkvpacked` (``amm_attention`` where the module
norms q and k per head).  The table itself, the per-module state and
the patch / unpatch logic live in :mod:`edt_kernels.patch`.
"""
from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

from ._validation import infer_grid
from .amm import AMM, KEEP, AMMLike, modulation_matrix, normalize_grid, relative_position_index
from .attention import amm_attention, amm_attention_qkvpacked
from .reference.attention import eager_attention

STATE_ATTR = "_edt_kernels_patch"


# ----------------------------------------------------------------------------- per-module state

@dataclass
class PatchState:
    """Stored on a patched module (a plain attribute: not in ``state_dict``)."""

    kind: str
    backend: str
    grid: Optional[Tuple[int, int]]  # the module's own grid (mdt/edt), None for timm / diffusers
    had_instance_forward: bool = False
    instance_forward: object = None  # the instance-level ``forward`` that was there, if any
    # AMM override: KEEP = the module's own behaviour, None = off, AMM = on.
    amm: AMMLike = KEEP
    amm_eval_only: bool = False
    amm_grid: Optional[Tuple[int, int]] = None  # grid for the AMM override (timm: else from N)
    native_modulation: Optional[torch.Tensor] = field(default=None, repr=False)  # edt, non-published M
    original_processor: object = field(default=None, repr=False)  # diffusers: the processor replaced
    processor: object = field(default=None, repr=False)  # diffusers: the one installed
    warned_dropout: bool = False


def state_of(module: nn.Module) -> Optional[PatchState]:
    st = module.__dict__.get(STATE_ATTR)
    return st if isinstance(st, PatchState) else None


@dataclass(frozen=True)
class AttentionKind:
    """One row of the patch table: how to recognise a module type and what
    replaces its computation.

    The default installation binds ``forward`` as an instance attribute of the
    module; a kind may instead give ``install`` / ``restore`` (diffusers swaps
    the module's attention processor).  ``sync`` is called after ``apply_amm``
    changed the AMM fields of the state.  With ``skip_unsupported`` a module of
    this type that cannot be reproduced exactly is left alone and listed in the
    report instead of stopping the whole patch (diffusers' ``Attention`` is
    also used for cross-attention, which is not ours to compute).
    """

    name: str
    description: str
    match: Callable[[nn.Module], bool]  # auto-detection
    check: Callable[[nn.Module], List[str]]  # reasons the module cannot be patched ([] = fine)
    forward: Optional[Callable] = None  # replacement, bound to the module
    prepare: Optional[Callable[[nn.Module, PatchState], None]] = None
    install: Optional[Callable[[nn.Module, PatchState], None]] = None
    restore: Optional[Callable[[nn.Module, PatchState], None]] = None
    sync: Optional[Callable[[nn.Module, PatchState], None]] = None
    # (module, state) -> (x, original computation) for patch_model(verify=True)
    sample: Optional[Callable[[nn.Module, PatchState], Tuple[torch.Tensor, Callable]]] = None
    skip_unsupported: bool = False
    own_grid: bool = False  # the module knows its token grid (mdt / edt)


# ----------------------------------------------------------------------------- shared helpers

def square_grid(n_tokens: int) -> Tuple[int, int]:
    """The grid of ``n_tokens`` tokens when no grid is given: a square one."""
    try:
        side = infer_grid(n_tokens, "N")
    except ValueError:
        raise ValueError(f"AMM needs the token grid: N = {n_tokens} tokens is not a square; "
                         "pass grid=(rows, cols) to apply_amm / patch_model") from None
    return side, side


def override_amm(st: PatchState, training: bool):
    """(active, amm) for the patcher's AMM override; active False = use the module's own."""
    if st.amm is KEEP:
        return False, None
    if st.amm is None or (st.amm_eval_only and training):
        return True, None
    return True, st.amm


def attention_dropout(module: nn.Module) -> Optional[nn.Module]:
    """The module's attention-dropout layer when it is active (training, p > 0)."""
    drop = getattr(module, "attn_drop", None)
    if module.training and isinstance(drop, nn.Module) and getattr(drop, "p", 0.0):
        return drop
    return None


def _is_identity(m: Optional[nn.Module]) -> bool:
    return m is None or isinstance(m, nn.Identity)


def _attend(self, st: PatchState, qkv: torch.Tensor, q_norm: Optional[nn.Module] = None,
            k_norm: Optional[nn.Module] = None, **kw) -> torch.Tensor:
    """Attention of ``qkv [B, N, 3, H, D]`` (the fused projection's output
    reshaped) -> ``[B, N, H, D]``.

    ``amm_attention_qkvpacked`` (its gradient written straight into one dqkv
    buffer) when q and k are used as projected; with per-head ``q_norm`` /
    ``k_norm`` layers, ``amm_attention`` of the normed views; with active
    attention dropout, the eager path (warned once)."""
    drop = attention_dropout(self)
    if drop is None and _is_identity(q_norm) and _is_identity(k_norm):
        return amm_attention_qkvpacked(qkv, backend=st.backend, **kw)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # (B, H, N, D) views
    if not _is_identity(q_norm):
        q = q_norm(q)
    if not _is_identity(k_norm):
        k = k_norm(k)
    if drop is None:
        return amm_attention(q, k, v, backend=st.backend, **kw).transpose(1, 2)
    if not st.warned_dropout:
        st.warned_dropout = True
        warnings.warn(
            f"{type(self).__name__} has attention dropout p={drop.p} in training mode, which the fused "
            "attention does not implement: this module computes its attention eagerly (materialised "
            "N x N weights) while training; eval mode, or attn_drop.p = 0, uses amm_attention",
            UserWarning, stacklevel=3)
    out = eager_attention(q, k, v, dropout=drop, **kw)
    return out.transpose(1, 2)


# ----------------------------------------------------------------------------- replacement forwards

def timm_forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                 is_causal: bool = False) -> torch.Tensor:
    """timm ``Attention.forward`` through ``amm_attention``."""
    st: PatchState = getattr(self, STATE_ATTR)
    B, N, C = x.shape  # (B, N, C)
    H = self.num_heads
    D = self.qkv.out_features // (3 * H)
    gate_layer = getattr(self, "gate", None)
    gate = gate_layer(x).sigmoid() if gate_layer is not None else None
    qkv = self.qkv(x).reshape(B, N, 3, H, D)  # (B, N, 3, H, D), a view

    bias = None
    if is_causal:  # timm: is_causal takes precedence over attn_mask
        bias = torch.full((N, N), float("-inf"), device=x.device, dtype=qkv.dtype).triu(1)
    elif attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            bias = torch.zeros(attn_mask.shape, device=x.device, dtype=qkv.dtype).masked_fill(
                ~attn_mask, float("-inf"))
        else:
            bias = attn_mask

    active, amm = override_amm(st, self.training)
    grid = None
    if active and amm is not None:
        grid = st.amm_grid if st.amm_grid is not None else square_grid(N)
    out = _attend(self, st, qkv, getattr(self, "q_norm", None), getattr(self, "k_norm", None),
                  scale=self.scale, grid=grid, amm=amm, bias=bias)  # (B, N, H, D)
    x = out.reshape(B, N, H * D)
    norm = getattr(self, "norm", None)
    if norm is not None:
        x = norm(x)
    if gate is not None:
        x = x * gate
    x = self.proj(x)
    drop = getattr(self, "proj_drop", None)
    return drop(x) if drop is not None else x


def mdt_forward(self, x: torch.Tensor, ids_keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """MDT ``Attention.forward(x, ids_keep)``: bias gathered at ``ids_keep`` in-kernel."""
    st: PatchState = getattr(self, STATE_ATTR)
    B, N, C = x.shape  # (B, N, C); N = len(ids_keep[0]) when masked
    H = self.num_heads
    qkv = self.qkv(x).reshape(B, N, 3, H, C // H)  # (B, N, 3, H, D), a view
    _, amm = override_amm(st, self.training)
    out = _attend(self, st, qkv, scale=self.scale,
                  rel_pos_bias=self.rel_pos_bias.relative_position_bias_table,
                  grid=st.grid, positions=ids_keep, amm=amm)  # (B, N, H, D)
    x = out.reshape(B, N, C)
    return self.proj_drop(self.proj(x))


def edt_forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """EDT ``AttentionBlock.forward``: bias table + AMM (``local`` and eval mode)."""
    st: PatchState = getattr(self, STATE_ATTR)
    if mask is not None:
        raise NotImplementedError(
            "EDT attention: the published forward ignores its `mask` argument; the patched "
            "forward refuses it rather than ignore it silently (pass mask=None)")
    B, N, C = x.shape  # (B, N, C)
    H = self.num_heads
    qkv = self.qkv(x).reshape(B, N, 3, H, C // H)  # (B, N, 3, H, D), a view
    active, amm = override_amm(st, self.training)
    modulation = None
    if not active and getattr(self, "local", False) and not self.training:
        if st.native_modulation is None:
            amm = AMM()  # the published matrix, computed in-kernel from the grid
        else:  # a module whose stored matrix is not the published one: use it as is
            modulation = st.native_modulation.to(device=x.device, dtype=qkv.dtype)
    out = _attend(self, st, qkv, scale=self.scale,
                  rel_pos_bias=self.rel_pos_bias.relative_position_bias_table,
                  grid=st.grid, amm=amm, modulation=modulation)  # (B, N, H, D)
    x = out.reshape(B, N, C)
    return self.proj_drop(self.proj(x))


# ----------------------------------------------------------------------------- recognition

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


def _own_bias_module(module: nn.Module) -> bool:
    """Whether the module's ``rel_pos_bias`` is this package's own
    :class:`edt_kernels.nn.RelativePositionBias` (a module of this project, not
    an MDT/EDT checkpoint class: it is not patched as one)."""
    from .nn import RelativePositionBias

    return isinstance(getattr(module, "rel_pos_bias", None), RelativePositionBias)


def _table(module: nn.Module) -> Optional[torch.Tensor]:
    rpb = getattr(module, "rel_pos_bias", None)
    t = getattr(rpb, "relative_position_bias_table", None)
    return t if isinstance(t, torch.Tensor) else None


def match_timm(m: nn.Module) -> bool:
    cls = type(m)
    return (cls.__name__ == "Attention" and cls.__module__.split(".")[0] == "timm"
            and _has_common(m))


def check_timm(m: nn.Module) -> List[str]:
    why = []
    if not _has_common(m):
        why.append("needs qkv (nn.Linear), proj (nn.Linear), num_heads (int) and scale (float)")
        return why
    if m.qkv.out_features % (3 * m.num_heads):
        why.append(f"qkv.out_features = {m.qkv.out_features} is not a multiple of 3 * num_heads")
    if getattr(m, "rel_pos_bias", None) is not None:
        why.append("has a rel_pos_bias that timm's Attention does not use (an MDT/EDT module?)")
    return why


def grid_of(m: nn.Module) -> Optional[Tuple[int, int]]:
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
            why.append("rel_pos_bias.relative_position_index is not the BEiT/Swin layout "
                       "(r_i - r_j + rows - 1) * (2 cols - 1) + (c_i - c_j + cols - 1)")


def match_mdt(m: nn.Module) -> bool:
    return (_has_common(m) and _table(m) is not None and not _own_bias_module(m)
            and isinstance(getattr(m.rel_pos_bias, "relative_position_index", None), torch.Tensor)
            and "ids_keep" in _forward_params(m))


def check_mdt(m: nn.Module) -> List[str]:
    why = []
    if not _has_common(m) or _table(m) is None:
        return ["needs qkv, proj, num_heads, scale and rel_pos_bias.relative_position_bias_table"]
    if "ids_keep" not in _forward_params(m):
        why.append("forward has no ids_keep parameter")
    if m.qkv.out_features != 3 * m.qkv.in_features:
        why.append("qkv must map C -> 3C")
    _check_table_grid(m, grid_of(m), why)
    return why


def match_edt(m: nn.Module) -> bool:
    return (_has_common(m) and _table(m) is not None and not _own_bias_module(m) and hasattr(m, "local")
            and hasattr(m, "input_resolution") and "ids_keep" not in _forward_params(m))


def check_edt(m: nn.Module) -> List[str]:
    why = []
    if not _has_common(m) or _table(m) is None:
        return ["needs qkv, proj, num_heads, scale and rel_pos_bias.relative_position_bias_table"]
    if m.qkv.out_features != 3 * m.qkv.in_features:
        why.append("qkv must map C -> 3C")
    _check_table_grid(m, grid_of(m), why)
    return why


def prepare_edt(m: nn.Module, st: PatchState) -> None:
    mm = getattr(m, "modulation_matrix", None)
    if isinstance(mm, torch.Tensor) and st.grid is not None:
        published = modulation_matrix(st.grid, dtype=torch.float64)
        dense = mm.detach().to("cpu", torch.float64)
        if dense.shape[-2:] != published.shape or not torch.allclose(
                dense.reshape(published.shape), published, rtol=1e-5, atol=1e-6):
            st.native_modulation = mm.detach()


def sample_qkv_module(m: nn.Module, st: PatchState):
    """A random input for ``verify`` and the module's original forward."""
    import types

    p = next(m.parameters())
    grid = st.grid or (4, 4)
    x = torch.randn(2, grid[0] * grid[1], m.qkv.in_features, device=p.device, dtype=p.dtype)
    original = st.instance_forward if st.had_instance_forward else types.MethodType(type(m).forward, m)
    return x, original


KINDS = (
    AttentionKind("timm", "timm Attention (timm.layers / timm.models.vision_transformer; DiT, SiT)",
                  match_timm, check_timm, timm_forward, sample=sample_qkv_module),
    AttentionKind("mdt", "MDT/MDTv2 Attention (rel_pos_bias + relative_position_index, forward(x, ids_keep))",
                  match_mdt, check_mdt, mdt_forward, sample=sample_qkv_module, own_grid=True),
    AttentionKind("edt", "EDT AttentionBlock (rel_pos_bias, local AMM flag, input_resolution)",
                  match_edt, check_edt, edt_forward, prepare_edt, sample=sample_qkv_module, own_grid=True),
)
