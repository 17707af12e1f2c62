"""The ``"cpp"`` backend of ``amm_attention``: the compiled CPU kernels of
``csrc/amm_attention_cpu.cpp`` (blocked, online softmax, in-kernel table gather
and tabulated AMM, OpenMP), behind the custom ops
``edt_kernels::amm_attention_cpp_fwd`` / ``_bwd`` (fake kernels and autograd
from :func:`edt_kernels.ops._attention_op.register_attention_op`).

It is the ``"auto"`` choice for CPU tensors.  Importing this module never
compiles anything; the extension is built (or a prebuilt one loaded) the first
time the backend is asked about a CPU input, and when that fails the backend
reports why and ``"auto"`` falls back to the PyTorch reference.

The extension's token kernels are the ``"cpp"`` backend of the token ops, in
:mod:`edt_kernels.ops.tokens_cpp`.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from .. import _ext
from ._attention_op import AttentionBackend, AttentionInputs, register_attention_op, register_backend

__all__ = ["CppBackend", "amm_attention_cpp"]


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

    def unavailable_reason(self) -> Optional[str]:
        return _ext.unavailable_reason("cpu")

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
