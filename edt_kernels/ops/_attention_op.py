"""What a backend of ``amm_attention`` is, and the plumbing that turns its
forward/backward kernels into ``torch.library`` custom ops.

:class:`AttentionInputs` (one validated call), :class:`AttentionBackend` and
:func:`register_backend` are what every backend module (``amm_attention``
Triton, ``amm_attention_cpp``, ``amm_attention_torch``) builds on; the public
``edt_kernels.attention`` above them validates and dispatches.

Every compiled backend (Triton, C++) exposes the same two entry points:

``fwd(q, k, v, table, positions, amm_table, bias, modulation, scale, rows, cols)
    -> (out [B, H, N, D] in q.dtype, lse [B, H, N] float32, natural log)``

``bwd(dout, q, k, v, out, lse, table, positions, amm_table, bias, modulation,
      scale, rows, cols, need_dtable, need_dbias)
    -> (dq, dk, dv, dtable (table's shape, float32 — float64 for float64 q — or empty),
        dbias (bias's shape, float32, or empty))``

A backend whose ``bwd`` also takes ``grads=(dq, dk, dv)`` (preallocated
``[B, H, N, D]`` tensors of any strides, written in place) gets the packed-qkv
ops too (:func:`register_attention_qkvpacked_op`).

where ``table`` is the learned ``[rows_t, H]`` bias table, ``positions`` int64
``[B, N]`` or ``[N]`` flat grid indices, ``amm_table`` the float32 AMM per grid
offset (``edt_kernels.amm.amm_offset_table``), ``bias``/``modulation`` dense
4-d tensors broadcastable to ``[B, H, N, N]``.  Optional tensors are ``None``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from .. import backends as _backends
from .._tracing import runs_eagerly
from ..amm import AMM, cached_amm_offset_table

__all__ = ["AttentionInputs", "AttentionBackend", "register_backend", "OP", "register_attention_op",
           "register_attention_qkvpacked_op"]

OP = "amm_attention"
_amm_tables: dict = {}  # (rows, cols, AMM, device, dtype) -> cached_amm_offset_table's (read-only) table


@dataclass
class AttentionInputs:
    """Validated, normalised arguments of one ``amm_attention`` call."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float
    rows: int
    cols: int
    table: Optional[torch.Tensor]  # [rows_t, H]
    positions: Optional[torch.Tensor]  # int64 [B, N] or [N]
    amm: Optional[AMM]
    bias: Optional[torch.Tensor]  # 4-d, broadcastable to [B, H, N, N]
    modulation: Optional[torch.Tensor]  # 4-d, broadcastable to [B, H, N, N]
    # amm_attention_qkvpacked: the [B, N, 3, H, D] tensor that q, k, v are views of
    qkv: Optional[torch.Tensor] = None

    @property
    def device(self) -> torch.device:
        return self.q.device

    def signature(self) -> tuple:
        """What the attention backends' reasons look at (``edt_kernels.backends``):
        the device type and the dtype."""
        q = self.q
        return q.device.type, q.dtype

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def head_dim(self) -> int:
        return self.q.shape[-1]

    def amm_table(self) -> Optional[torch.Tensor]:
        if self.amm is None:
            return None
        # float64 inputs get the float64 AMM; every other dtype computes with the float32 one
        dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        if torch.compiler.is_compiling():  # a constant of the graph, with no guard on this cache
            return cached_amm_offset_table((self.rows, self.cols), self.amm, device=self.device, dtype=dtype)
        key = (self.rows, self.cols, self.amm, self.q.device, dtype)
        table = _amm_tables.get(key)
        if table is None:
            table = _amm_tables[key] = cached_amm_offset_table((self.rows, self.cols), self.amm,
                                                               device=self.device, dtype=dtype)
        return table

    def kernel_args(self) -> Tuple:
        """Positional arguments of the backend custom ops (see ``ops/_attention_op``)."""
        return (self.q, self.k, self.v, self.table, self.positions, self.amm_table(),
                self.bias, self.modulation, self.scale, self.rows, self.cols)

    def packed_kernel_args(self) -> Tuple:
        """Positional arguments of the packed-qkv custom ops: ``kernel_args`` with
        ``qkv [B, N, 3, H, D]`` in place of ``q, k, v``."""
        return (self.qkv,) + self.kernel_args()[3:]


class AttentionBackend(_backends.Backend):
    """One way of computing ``amm_attention`` (see :mod:`edt_kernels.backends`)."""

    name: str = "?"

    def not_supported_reasons(self, inp: AttentionInputs) -> List[str]:
        raise NotImplementedError

    def apply(self, inp: AttentionInputs) -> torch.Tensor:
        raise NotImplementedError

    def apply_qkvpacked(self, inp: AttentionInputs) -> torch.Tensor:
        """``amm_attention_qkvpacked``: ``[B, N, H, D]`` from ``inp.qkv``.

        This default runs :meth:`apply` on ``inp.q/k/v``, the ``qkv.unbind(2)``
        views, so autograd stacks their three gradients into one new
        ``[B, N, 3, H, D]`` tensor (one copy); a backend whose kernels write
        through strides overrides it to write ``dqkv`` in place (triton)."""
        return self.apply(inp).transpose(1, 2)


def register_backend(backend: AttentionBackend, auto_rank: Optional[int] = None) -> None:
    """Add a backend of ``amm_attention``; ``auto_rank`` places it in the
    ``"auto"`` order (lower first), whatever the order in which backends register."""
    _backends.register(OP, backend, auto_rank)


def _dtable_dtype(q: torch.Tensor) -> torch.dtype:
    """Table gradients accumulate in float32, or float64 for float64 inputs."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _empty_like_out(q: torch.Tensor) -> torch.Tensor:
    B, H, N, D = q.shape
    # [B, N, H, D] memory so that out.transpose(1, 2).reshape(B, N, H * D) is free.
    return q.new_empty((B, N, H, D)).transpose(1, 2)


def _wants_grad(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether autograd records a call on these (differentiable) inputs."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _direct_function(name: str, fwd_impl: Callable, setup_context: Callable, backward: Callable):
    """The ``torch.autograd.Function`` an op's ``apply`` calls where it runs eagerly
    (``_tracing.runs_eagerly``): the custom op's implementation, context and backward
    without its dispatch (the same kernels and results for less host work per call).
    The context is set up inside ``forward`` (a separate ``setup_context`` would make
    every ``apply`` bind its arguments through ``inspect.signature``).  Returns the
    Function's autograd-level ``apply`` (the one below ``Function.apply``, whose own work,
    unwrapping functorch tensors, has nothing to do where no transform is active)."""

    def forward(ctx, *args):
        output = tuple(fwd_impl(*args))
        setup_context(ctx, args, output)
        return output

    def bwd(ctx, *grads):
        return backward(ctx, grads)

    fn = type(name, (torch.autograd.Function,), {"forward": staticmethod(forward), "backward": staticmethod(bwd)})
    return super(torch.autograd.Function, fn).apply


def register_attention_op(name: str, fwd_impl: Callable, bwd_impl: Callable,
                          device_types: Optional[Sequence[str]] = None):
    """Register ``edt_kernels::{name}_fwd`` / ``_bwd`` and return a callable
    ``apply(q, k, v, table, positions, amm_table, bias, modulation, scale, rows, cols) -> out``
    that is differentiable in q, k, v, table and bias."""
    fwd_name = f"edt_kernels::{name}_fwd"
    bwd_name = f"edt_kernels::{name}_bwd"

    @torch.library.custom_op(fwd_name, mutates_args=(), device_types=device_types)
    def fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            table: Optional[torch.Tensor], positions: Optional[torch.Tensor],
            amm_table: Optional[torch.Tensor], bias: Optional[torch.Tensor],
            modulation: Optional[torch.Tensor], scale: float, rows: int,
            cols: int) -> List[torch.Tensor]:
        out, lse = fwd_impl(q, k, v, table, positions, amm_table, bias, modulation, scale, rows, cols)
        return [out, lse]

    @fwd.register_fake
    def _(q, k, v, table, positions, amm_table, bias, modulation, scale, rows, cols):
        B, H, N, D = q.shape
        return [_empty_like_out(q), q.new_empty((B, H, N), dtype=torch.float32)]

    @torch.library.custom_op(bwd_name, mutates_args=(), device_types=device_types)
    def bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            out: torch.Tensor, lse: torch.Tensor, table: Optional[torch.Tensor],
            positions: Optional[torch.Tensor], amm_table: Optional[torch.Tensor],
            bias: Optional[torch.Tensor], modulation: Optional[torch.Tensor],
            scale: float, rows: int, cols: int, need_dtable: bool,
            need_dbias: bool) -> List[torch.Tensor]:
        return list(bwd_impl(dout, q, k, v, out, lse, table, positions, amm_table, bias,
                             modulation, scale, rows, cols, need_dtable, need_dbias))

    @bwd.register_fake
    def _(dout, q, k, v, out, lse, table, positions, amm_table, bias, modulation, scale,
          rows, cols, need_dtable, need_dbias):
        dtable = (table.new_empty(table.shape, dtype=_dtable_dtype(q)) if need_dtable
                  else q.new_empty((0,), dtype=torch.float32))
        dbias = (bias.new_empty(bias.shape, dtype=torch.float32) if need_dbias
                 else q.new_empty((0,), dtype=torch.float32))
        return [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dtable, dbias]

    def setup_context(ctx, inputs, output):
        q, k, v, table, positions, amm_table, bias, modulation, scale, rows, cols = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, table, positions, amm_table, bias, modulation)
        ctx.scale, ctx.rows, ctx.cols = scale, rows, cols
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)  # no zero gradient is made for the LSE

    def backward(ctx, grads):
        dout = grads[0]  # the LSE output is not differentiable
        if dout is None:
            return (None,) * 11
        q, k, v, out, lse, table, positions, amm_table, bias, modulation = ctx.saved_tensors
        need = ctx.needs_input_grad
        need_dtable = table is not None and bool(need[3])
        need_dbias = bias is not None and bool(need[6])
        run = bwd_impl if runs_eagerly(dout) else bwd
        dq, dk, dv, dtable, dbias = run(dout, q, k, v, out, lse, table, positions, amm_table,
                                        bias, modulation, ctx.scale, ctx.rows, ctx.cols,
                                        need_dtable, need_dbias)
        dtable = dtable.to(table.dtype) if need_dtable else None
        dbias = dbias.to(bias.dtype) if need_dbias else None
        return dq, dk, dv, dtable, None, None, dbias, None, None, None, None

    fwd.register_autograd(backward, setup_context=setup_context)
    direct = _direct_function(f"{name}_fwd", fwd_impl, setup_context, backward)

    def apply(q, k, v, table, positions, amm_table, bias, modulation, scale, rows, cols):
        args = (q, k, v, table, positions, amm_table, bias, modulation, float(scale), int(rows), int(cols))
        if not runs_eagerly(q):
            return fwd(*args)[0]
        if _wants_grad(q, k, v, table, bias):
            return direct(*args)[0]
        return fwd_impl(*args)[0]  # nothing to differentiate: no autograd node either

    apply.fwd_op = fwd
    apply.bwd_op = bwd
    return apply


def _new_dqkv(qkv: torch.Tensor) -> torch.Tensor:
    """The one gradient buffer of the packed backward, ``[B, N, 3, H, D]``
    contiguous (tests poison it)."""
    return torch.empty(qkv.shape, device=qkv.device, dtype=qkv.dtype)


def _qkv_views(qkv: torch.Tensor):
    """The ``[B, H, N, D]`` views q, k, v of ``qkv [B, N, 3, H, D]``."""
    return [t.transpose(1, 2) for t in qkv.unbind(2)]


def register_attention_qkvpacked_op(name: str, fwd_impl: Callable, bwd_impl: Callable,
                                    device_types: Optional[Sequence[str]] = None):
    """Register ``edt_kernels::{name}_qkvpacked_fwd`` / ``_bwd`` over one
    ``qkv [B, N, 3, H, D]`` tensor and return a callable
    ``apply(qkv, table, positions, amm_table, bias, modulation, scale, rows, cols) -> out [B, N, H, D]``
    that is differentiable in qkv, table and bias.

    The forward reads q, k, v as views of qkv; the backward allocates one
    ``dqkv [B, N, 3, H, D]``, lets ``bwd_impl`` write dq, dk, dv into its three
    views (``grads=``) and returns it: autograd receives dqkv itself."""
    fwd_name = f"edt_kernels::{name}_qkvpacked_fwd"
    bwd_name = f"edt_kernels::{name}_qkvpacked_bwd"

    def fwd_packed(qkv, table, positions, amm_table, bias, modulation, scale, rows, cols):
        q, k, v = _qkv_views(qkv)
        out, lse = fwd_impl(q, k, v, table, positions, amm_table, bias, modulation, scale, rows, cols)
        return [out.transpose(1, 2).contiguous(), lse]  # (B, N, H, D): a view of the kernel's output

    def bwd_packed(dout, qkv, out, lse, table, positions, amm_table, bias, modulation, scale, rows, cols,
                   need_dtable, need_dbias):
        dqkv = _new_dqkv(qkv)  # (B, N, 3, H, D)
        q, k, v = _qkv_views(qkv)
        _, _, _, dtable, dbias = bwd_impl(dout.transpose(1, 2), q, k, v, out.transpose(1, 2), lse, table,
                                          positions, amm_table, bias, modulation, scale, rows, cols,
                                          need_dtable, need_dbias, grads=_qkv_views(dqkv))
        return [dqkv, dtable, dbias]

    @torch.library.custom_op(fwd_name, mutates_args=(), device_types=device_types)
    def fwd(qkv: torch.Tensor, table: Optional[torch.Tensor], positions: Optional[torch.Tensor],
            amm_table: Optional[torch.Tensor], bias: Optional[torch.Tensor],
            modulation: Optional[torch.Tensor], scale: float, rows: int, cols: int) -> List[torch.Tensor]:
        return fwd_packed(qkv, table, positions, amm_table, bias, modulation, scale, rows, cols)

    @fwd.register_fake
    def _(qkv, table, positions, amm_table, bias, modulation, scale, rows, cols):
        B, N, _, H, D = qkv.shape
        return [qkv.new_empty((B, N, H, D)), qkv.new_empty((B, H, N), dtype=torch.float32)]

    @torch.library.custom_op(bwd_name, mutates_args=(), device_types=device_types)
    def bwd(dout: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
            table: Optional[torch.Tensor], positions: Optional[torch.Tensor],
            amm_table: Optional[torch.Tensor], bias: Optional[torch.Tensor],
            modulation: Optional[torch.Tensor], scale: float, rows: int, cols: int,
            need_dtable: bool, need_dbias: bool) -> List[torch.Tensor]:
        return bwd_packed(dout, qkv, out, lse, table, positions, amm_table, bias, modulation, scale, rows,
                          cols, need_dtable, need_dbias)

    @bwd.register_fake
    def _(dout, qkv, out, lse, table, positions, amm_table, bias, modulation, scale, rows, cols,
          need_dtable, need_dbias):
        dtable = (table.new_empty(table.shape, dtype=_dtable_dtype(qkv)) if need_dtable
                  else qkv.new_empty((0,), dtype=torch.float32))
        dbias = (bias.new_empty(bias.shape, dtype=torch.float32) if need_dbias
                 else qkv.new_empty((0,), dtype=torch.float32))
        return [qkv.new_empty(qkv.shape), dtable, dbias]

    def setup_context(ctx, inputs, output):
        qkv, table, positions, amm_table, bias, modulation, scale, rows, cols = inputs
        out, lse = output
        ctx.save_for_backward(qkv, out, lse, table, positions, amm_table, bias, modulation)
        ctx.scale, ctx.rows, ctx.cols = scale, rows, cols
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)  # no zero gradient is made for the LSE

    def backward(ctx, grads):
        dout = grads[0]  # the LSE output is not differentiable
        if dout is None:
            return (None,) * 9
        qkv, out, lse, table, positions, amm_table, bias, modulation = ctx.saved_tensors
        need = ctx.needs_input_grad
        need_dtable = table is not None and bool(need[1])
        need_dbias = bias is not None and bool(need[4])
        run = bwd_packed if runs_eagerly(dout) else bwd
        dqkv, dtable, dbias = run(dout, qkv, out, lse, table, positions, amm_table, bias, modulation,
                                  ctx.scale, ctx.rows, ctx.cols, need_dtable, need_dbias)
        dtable = dtable.to(table.dtype) if need_dtable else None
        dbias = dbias.to(bias.dtype) if need_dbias else None
        return (dqkv if need[0] else None), dtable, None, None, dbias, None, None, None, None

    fwd.register_autograd(backward, setup_context=setup_context)
    direct = _direct_function(f"{name}_qkvpacked_fwd", fwd_packed, setup_context, backward)

    def apply(qkv, table, positions, amm_table, bias, modulation, scale, rows, cols):
        args = (qkv, table, positions, amm_table, bias, modulation, float(scale), int(rows), int(cols))
        if not runs_eagerly(qkv):
            return fwd(*args)[0]
        if _wants_grad(qkv, table, bias):
            return direct(*args)[0]
        return fwd_packed(*args)[0]  # nothing to differentiate: no autograd node either

    apply.fwd_op = fwd
    apply.bwd_op = bwd
    return apply
