"""The ``"cpp"`` backend of ``amm_attention``: the compiled CPU kernels of
``csrc/amm_attention_cpu.cpp`` (blocked, online softmax, in-kernel table gather
and tabulated AMM, OpenMP), behind the custom ops
``edt_kernels::amm_attention_cpp_fwd`` / ``_bwd`` (fake kernels and autograd
from :func:`edt_kernels.ops._attention_op.register_attention_op`).

It is the ``"auto"`` choice for CPU tensors.  Importing this module never
compiles anything; the extension is built (or a prebuilt one loaded) the first
time the backend is asked about a CPU input, and when that fails the backend
reports why and ``"auto"`` falls back to the PyTorch reference.

:func:`register_token_kernels` makes the extension's token kernels
(``csrc/tokens_cpu.cpp``, ``csrc/tokens_cuda.cu``) the implementation of the
``edt_kernels::`` token ops of :mod:`edt_kernels.ops.tokens` on one device
type, for the ops whose schema matches.  Importing this module does that for
``"cuda"`` when ``EDT_KERNELS_CUDA_TOKENS=1`` and torch has a CUDA device
(never for ``"cpu"``: there the token ops are the Triton kernels run by the
interpreter in CI).
"""
from __future__ import annotations

import os
from typing import List

import torch
from torch._library import custom_ops as _custom_ops

from .. import _ext
from ..attention import AttentionBackend, AttentionInputs, register_backend
from ._attention_op import register_attention_op

__all__ = ["CppBackend", "amm_attention_cpp", "register_token_kernels", "TOKEN_OP_SCHEMAS"]


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

#: Schemas of the token ops in csrc/ops.cpp (argument lists and returns), which
#: must equal those of ``edt_kernels.ops.tokens`` for a kernel to be registered.
TOKEN_OP_SCHEMAS = {
    "gather_tokens": "(Tensor x, Tensor ids) -> Tensor",
    "scatter_tokens": "(Tensor y, Tensor ids, SymInt length) -> Tensor",
    "unshuffle_with_mask_token":
        "(Tensor x_kept, Tensor ids_restore, Tensor mask_token, Tensor? pos_embed) -> Tensor",
    "unshuffle_with_mask_token_backward":
        "(Tensor dout, Tensor ids_restore, SymInt len_keep, bool need_dpos) -> (Tensor, Tensor, Tensor)",
}


def _token_impl(name: str, device_type: str, fallback):
    def impl(*args):
        reason = _ext.cuda_extension_error() if device_type == "cuda" else _ext.cpu_extension_error()
        if reason is None:
            return getattr(torch.ops.edt_kernels_cpp, name)(*args)
        return fallback(*args)  # the op's own (Triton) implementation

    impl.__name__ = f"{name}_{device_type}_compiled"
    return impl


def register_token_kernels(device_type: str = "cuda") -> List[str]:
    """Register the compiled token kernels as the ``device_type`` ("cpu" or
    "cuda") implementation of ``edt_kernels::{gather_tokens, scatter_tokens,
    unshuffle_with_mask_token, unshuffle_with_mask_token_backward}``, for each
    op whose schema equals ours; returns the names registered.  The extension
    is loaded on the first call of a registered kernel; if it is unavailable
    then, the op's own implementation runs."""
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"device_type must be 'cpu' or 'cuda', got {device_type!r}")
    from . import tokens  # noqa: F401  (defines the edt_kernels:: token ops)

    done = []
    for name, schema in TOKEN_OP_SCHEMAS.items():
        opdef = _custom_ops.OPDEFS.get(f"edt_kernels::{name}")
        if opdef is None or str(opdef._opoverload._schema) != f"edt_kernels::{name}{schema}":
            continue
        torch.library.register_kernel(f"edt_kernels::{name}", device_type,
                                      _token_impl(name, device_type, opdef._init_fn))
        done.append(name)
    return done


# The CUDA token kernels compile here but have not yet run on a GPU, and the
# first call would build them with nvcc: until they are measured against the
# Triton kernels they are opt-in (EDT_KERNELS_CUDA_TOKENS=1, or call
# register_token_kernels("cuda")).
if torch.cuda.is_available() and os.environ.get("EDT_KERNELS_CUDA_TOKENS", "0") == "1":
    try:
        register_token_kernels("cuda")
    except ImportError:  # the token ops need triton
        pass
