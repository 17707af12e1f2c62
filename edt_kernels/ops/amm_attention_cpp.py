"""The ``"cpp"`` backend of ``amm_attention``: the compiled CPU kernels of
``csrc/amm_attention_cpu.cpp`` (blocked, online softmax, in-kernel table gather
and tabulated AMM, OpenMP), behind the custom ops
``edt_kernels::amm_attention_cpp_fwd`` / ``_bwd`` (fake kernels and autograd
from :func:`edt_kernels.ops._attention_op.register_attention_op`).

It is the ``"auto"`` choice for CPU tensors.  Importing this module never
compiles anything; the extension is built (or a prebuilt one loaded) the first
time the backend is asked about a CPU input, and when that fails the backend
reports why and ``"auto"`` falls back to the PyTorch reference.

The extension's token kernels (``csrc/tokens_cpu.cpp``, ``csrc/tokens_cuda.cu``)
are the ``"cpp"`` backend of ``gather_tokens``, ``scatter_tokens`` and
``unshuffle_with_mask_token`` (:class:`CppTokenBackend`): used when asked by
name, and by ``"auto"`` for CUDA tensors when ``EDT_KERNELS_CUDA_TOKENS=1``.
"""
from __future__ import annotations

import os
from typing import List

import torch
from .. import _ext
from .. import backends as _backends
from ..backends import cpp_unavailable_reason
from ..attention import AttentionBackend, AttentionInputs, register_backend
from ._attention_op import register_attention_op

__all__ = ["CppBackend", "CppTokenBackend", "amm_attention_cpp", "register_token_kernels", "token_backend",
           "TOKEN_OP_SCHEMAS"]


def _fwd(q, k, v, table, positions, amm_table, bias, modulation, scale, rows, cols):
    _ext.require_cpu()
    out, lse = torch.ops.edt_kernels_cpp.amm_attention_fwd(
        q, k, v, table, positions, amm_table, bias, modulation, scale, rows, cols)
    return out, lse


def _bwd(dout, q, k, v, out, lse, table, positions, amm_table, bias, modulation, scale, rows, cols,
         need_dtable, need_dbias):
    _ext.require_cpu()
    return tuple(torch.ops.edt_kernels_cpp.amm_attention_bwd(
        dout, q, k, v, out, lse, table, positions, amm_table, bias, modulation, scale, rows, cols,
        need_dtable, need_dbias))


#: ``amm_attention_cpp(q, k, v, table, positions, amm_table, bias, modulation, scale, rows, cols) -> out``
#: (differentiable in q, k, v, table and bias); ``.fwd_op`` / ``.bwd_op`` are the custom ops.
amm_attention_cpp = register_attention_op("amm_attention_cpp", _fwd, _bwd, device_types=("cpu",))


class CppBackend(AttentionBackend):
    """Compiled C++ kernels for CPU tensors (float16/bfloat16 computed in float32, float32, float64)."""

    name = "cpp"
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

    def unavailable_reason(self):
        return cpp_unavailable_reason("cpu")

    def not_supported_reasons(self, inp: AttentionInputs) -> List[str]:
        why = []
        if inp.device.type != "cpu":
            why.append(f"the cpp backend runs on CPU tensors only, got device {inp.device.type!r}")
            return why  # never build the extension for inputs it cannot take
        if inp.dtype not in self.dtypes:
            why.append(f"dtype {inp.dtype} is not supported by the cpp backend")
        reason = _ext.cpu_extension_error()
        if reason is not None:
            why.append(f"C++ extension unavailable ({reason})")
        return why

    def apply(self, inp: AttentionInputs) -> torch.Tensor:
        return amm_attention_cpp(*inp.kernel_args())


register_backend(CppBackend(), auto_rank=1)


# ------------------------------------------------------------------ token kernels

#: Schemas of the token ops in csrc/ops.cpp (argument lists and returns); they
#: equal those of the Triton custom ops of ``edt_kernels.ops.tokens``.
TOKEN_OP_SCHEMAS = {
    "gather_tokens": "(Tensor x, Tensor ids) -> Tensor",
    "scatter_tokens": "(Tensor y, Tensor ids, SymInt length) -> Tensor",
    "unshuffle_with_mask_token":
        "(Tensor x_kept, Tensor ids_restore, Tensor mask_token, Tensor? pos_embed) -> Tensor",
    "unshuffle_with_mask_token_backward":
        "(Tensor dout, Tensor ids_restore, SymInt len_keep, bool need_dpos) -> (Tensor, Tensor, Tensor)",
}

_TOKEN_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: Device types on which ``"auto"`` takes the compiled token kernels.  CUDA:
#: opt-in (EDT_KERNELS_CUDA_TOKENS=1), since they have not yet been measured
#: against the Triton kernels on a GPU and the first call builds them with nvcc;
#: CPU: only by name (there the token ops run the Triton kernels in the
#: interpreter in CI, or the PyTorch reference).
_AUTO_DEVICE_TYPES = set()


def _cuda_tokens_opted_in() -> bool:
    return "cuda" in _AUTO_DEVICE_TYPES or os.environ.get("EDT_KERNELS_CUDA_TOKENS", "0") == "1"


def _kernels():
    return torch.ops.edt_kernels_cpp


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ids):
        ctx.save_for_backward(ids)
        ctx.length = x.shape[1]
        return _kernels().gather_tokens(x, ids)

    @staticmethod
    def backward(ctx, dout):
        (ids,) = ctx.saved_tensors
        return _Scatter.apply(dout.contiguous(), ids, ctx.length), None


class _Scatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, ids, length):
        ctx.save_for_backward(ids)
        return _kernels().scatter_tokens(y, ids, length)

    @staticmethod
    def backward(ctx, dout):
        (ids,) = ctx.saved_tensors
        return _Gather.apply(dout.contiguous(), ids), None, None


class _Unshuffle(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_kept, ids_restore, mask_token, pos_embed):
        ctx.save_for_backward(ids_restore)
        ctx.len_keep = x_kept.shape[1]
        ctx.meta = (x_kept.dtype, mask_token.dtype, mask_token.shape,
                    None if pos_embed is None else (pos_embed.dtype, pos_embed.shape))
        return _kernels().unshuffle_with_mask_token(x_kept, ids_restore, mask_token, pos_embed)

    @staticmethod
    def backward(ctx, dout):
        (ids_restore,) = ctx.saved_tensors
        x_dtype, mt_dtype, mt_shape, pos = ctx.meta
        need_dpos = pos is not None and bool(ctx.needs_input_grad[3])
        dx, dmt, dpos = _kernels().unshuffle_with_mask_token_backward(
            dout.contiguous(), ids_restore, ctx.len_keep, need_dpos)
        dpos = dpos.reshape(pos[1]).to(pos[0]) if need_dpos else None
        return dx.to(x_dtype), None, dmt.reshape(mt_shape).to(mt_dtype), dpos


_TOKEN_FUNCTIONS = {"gather_tokens": _Gather.apply, "scatter_tokens": _Scatter.apply,
                    "unshuffle_with_mask_token": _Unshuffle.apply}


class CppTokenBackend(_backends.Backend):
    """The compiled token kernels (``csrc/tokens_cpu.cpp`` for CPU tensors,
    ``csrc/tokens_cuda.cu`` for CUDA tensors) of one token op, with autograd."""

    name = "cpp"

    def __init__(self, op: str):
        self.op = op
        self._fn = _TOKEN_FUNCTIONS[op]

    def unavailable_reason(self):
        return cpp_unavailable_reason("cpu")

    def not_supported_reasons(self, call) -> List[str]:
        device = call.device
        if device.type not in ("cpu", "cuda"):
            return [f"the cpp token kernels run on CPU or CUDA tensors, got device {device.type!r}"]
        why = [f"{n} is {t.dtype} (the cpp token kernels take float16, bfloat16, float32, float64)"
               for n, t in call.tensors.items()
               if t is not None and t.is_floating_point() and t.dtype not in _TOKEN_DTYPES]
        reason = _ext.cuda_extension_error() if device.type == "cuda" else _ext.cpu_extension_error()
        if reason is not None:
            why.append(f"C++ extension unavailable ({reason})")
        return why

    def auto_reasons(self, call) -> List[str]:
        device = call.device.type
        if device == "cuda" and not _cuda_tokens_opted_in():
            return ["'auto' uses the CUDA token kernels only with EDT_KERNELS_CUDA_TOKENS=1 "
                    "(or ask backend='cpp')"]
        if device == "cpu" and "cpu" not in _AUTO_DEVICE_TYPES:
            return ["'auto' does not pick the CPU token kernels (ask backend='cpp')"]
        return self.not_supported_reasons(call)

    def apply(self, call):
        return self._fn(*call.args)


def token_backend(op: str) -> CppTokenBackend:
    """The ``cpp`` backend of the token op ``op`` (one of ``TOKEN_FUNCTIONS``)."""
    return CppTokenBackend(op)


def register_token_kernels(device_type: str = "cuda") -> List[str]:
    """Deprecated: make ``"auto"`` take the ``cpp`` backend of the token ops
    (gather, scatter, unshuffle) on ``device_type`` ("cpu" or "cuda").  Ask for
    it with ``backend="cpp"`` (or ``EDT_KERNELS_CUDA_TOKENS=1`` for CUDA)
    instead.  Returns the op names that now prefer it."""
    import warnings

    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"device_type must be 'cpu' or 'cuda', got {device_type!r}")
    warnings.warn("register_token_kernels is deprecated: pass backend='cpp' to the token ops "
                  "(or set EDT_KERNELS_CUDA_TOKENS=1)", DeprecationWarning, stacklevel=2)
    _AUTO_DEVICE_TYPES.add(device_type)
    return list(_TOKEN_FUNCTIONS)
