"""The ``"cpp"`` backend of ``gather_tokens``, ``scatter_tokens`` and
``unshuffle_with_mask_token``: the compiled token kernels of the extension
(``csrc/tokens_cpu.cpp`` for CPU tensors, ``csrc/tokens_cuda.cu`` for CUDA
tensors, operators ``torch.ops.edt_kernels_cpp.*``), behind custom ops with
fake kernels and autograd::

    edt_kernels::gather_tokens_cpp(Tensor x, Tensor ids) -> Tensor
    edt_kernels::scatter_tokens_cpp(Tensor y, Tensor ids, SymInt length) -> Tensor
    edt_kernels::unshuffle_with_mask_token_cpp(Tensor x_kept, Tensor ids_restore, Tensor mask_token,
                                               Tensor? pos_embed) -> Tensor
    edt_kernels::unshuffle_with_mask_token_cpp_backward(Tensor dout, Tensor ids_restore, SymInt len_keep,
                                                        bool need_dpos) -> (Tensor, Tensor, Tensor)

Shapes and dtypes are those of the Triton custom ops of the same names without
``_cpp`` (:mod:`edt_kernels.ops.tokens`), and so is their autograd (one
definition per op family, in ``gather_scatter`` / ``unshuffle``).  The backend runs when asked by name,
and ``"auto"`` takes it for CUDA tensors when ``EDT_KERNELS_CUDA_TOKENS=1``
(the CUDA kernels are built with nvcc on first use and have not yet been
measured against the Triton ones on a GPU); on CPU tensors ``"auto"`` keeps the
Triton kernels (interpreter) or the PyTorch reference.  Importing this module
compiles nothing: the extension is built or loaded when the backend is first
asked about an input.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .. import _ext
from ..backends import Backend, OpCall, cuda_tokens_opted_in, register
from .gather_scatter import register_gather_scatter_autograd
from .unshuffle import register_unshuffle_autograd

__all__ = ["CppTokenBackend", "gather_tokens_cpp", "scatter_tokens_cpp", "unshuffle_with_mask_token_cpp",
           "unshuffle_with_mask_token_cpp_backward", "TOKEN_DTYPES"]

TOKEN_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _kernels(t: torch.Tensor):
    """The extension's operators, loaded for ``t``'s device."""
    if t.device.type == "cuda":
        _ext.require_cuda()
    else:
        _ext.require_cpu()
    return torch.ops.edt_kernels_cpp


def _promote(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


# ============================================================================ custom ops

@torch.library.custom_op("edt_kernels::gather_tokens_cpp", mutates_args=(), device_types=("cpu", "cuda"))
def gather_tokens_cpp(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return _kernels(x).gather_tokens(x, ids)


@gather_tokens_cpp.register_fake
def _(x, ids):
    return x.new_empty((x.shape[0], ids.shape[1], x.shape[2]))


@torch.library.custom_op("edt_kernels::scatter_tokens_cpp", mutates_args=(), device_types=("cpu", "cuda"))
def scatter_tokens_cpp(y: torch.Tensor, ids: torch.Tensor, length: int) -> torch.Tensor:
    return _kernels(y).scatter_tokens(y, ids, length)


@scatter_tokens_cpp.register_fake
def _(y, ids, length):
    return y.new_empty((y.shape[0], length, y.shape[2]))


register_gather_scatter_autograd(gather_tokens_cpp, scatter_tokens_cpp)


@torch.library.custom_op("edt_kernels::unshuffle_with_mask_token_cpp", mutates_args=(),
                         device_types=("cpu", "cuda"))
def unshuffle_with_mask_token_cpp(x_kept: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor,
                                  pos_embed: Optional[torch.Tensor]) -> torch.Tensor:
    return _kernels(x_kept).unshuffle_with_mask_token(x_kept, ids_restore, mask_token, pos_embed)


@unshuffle_with_mask_token_cpp.register_fake
def _(x_kept, ids_restore, mask_token, pos_embed):
    return x_kept.new_empty((x_kept.shape[0], ids_restore.shape[1], x_kept.shape[2]),
                            dtype=_promote(x_kept, mask_token, pos_embed))


@torch.library.custom_op("edt_kernels::unshuffle_with_mask_token_cpp_backward", mutates_args=(),
                         device_types=("cpu", "cuda"))
def unshuffle_with_mask_token_cpp_backward(dout: torch.Tensor, ids_restore: torch.Tensor, len_keep: int,
                                           need_dpos: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dmt, dpos = _kernels(dout).unshuffle_with_mask_token_backward(dout, ids_restore, len_keep, need_dpos)
    return dx, dmt, dpos


@unshuffle_with_mask_token_cpp_backward.register_fake
def _(dout, ids_restore, len_keep, need_dpos):
    B, L, C = dout.shape
    dpos = dout.new_empty((1, L, C) if need_dpos else (0,), dtype=torch.float32)
    return dout.new_empty((B, len_keep, C)), dout.new_empty((1, 1, C), dtype=torch.float32), dpos


register_unshuffle_autograd(unshuffle_with_mask_token_cpp, unshuffle_with_mask_token_cpp_backward)

# ============================================================================ backend

_OPS = {"gather_tokens": gather_tokens_cpp, "scatter_tokens": scatter_tokens_cpp,
        "unshuffle_with_mask_token": unshuffle_with_mask_token_cpp}


class CppTokenBackend(Backend):
    """The compiled token kernels of one token op (``gather_tokens``,
    ``scatter_tokens`` or ``unshuffle_with_mask_token``), with autograd."""

    name = "cpp"

    def __init__(self, op: str):
        if op not in _OPS:
            raise ValueError(f"op must be one of {sorted(_OPS)}, got {op!r}")
        self.op = op
        self._fn = _OPS[op]

    def unavailable_reason(self) -> Optional[str]:
        return _ext.unavailable_reason("cpu")

    def not_supported_reasons(self, call: OpCall) -> List[str]:
        device = call.device
        if device.type not in ("cpu", "cuda"):
            return [f"the cpp token kernels run on CPU or CUDA tensors, got device {device.type!r}"]
        why = [f"{n} is {t.dtype} (the cpp token kernels take float16, bfloat16, float32, float64)"
               for n, t in call.tensors.items()
               if t is not None and t.is_floating_point() and t.dtype not in TOKEN_DTYPES]
        reason = _ext.cuda_extension_error() if device.type == "cuda" else _ext.cpu_extension_error()
        if reason is not None:
            why.append(f"C++ extension unavailable ({reason})")
        return why

    def auto_reasons(self, call: OpCall) -> List[str]:
        device = call.device.type
        if device == "cuda" and not cuda_tokens_opted_in():
            return ["'auto' uses the CUDA token kernels only with EDT_KERNELS_CUDA_TOKENS=1 "
                    "(or ask backend='cpp')"]
        if device == "cpu":
            return ["'auto' does not pick the CPU token kernels (ask backend='cpp')"]
        return self.not_supported_reasons(call)

    def apply(self, call: OpCall) -> torch.Tensor:
        return self._fn(*call.args)


for _op in _OPS:
    register(_op, CppTokenBackend(_op), auto_rank=-1)  # where "auto" may take it (opt-in), it comes first
