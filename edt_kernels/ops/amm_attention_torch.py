"""The ``"torch"`` and ``"eager"`` backends of ``amm_attention``: the
plain-PyTorch definitions of :mod:`edt_kernels.reference.attention`, any
device and dtype, every ``N x N`` tensor materialised.

``torch`` (``reference_attention``) is ``"auto"``'s last choice; ``eager``
(``eager_attention``, the authors' published code path op for op) runs only
when named.
"""
from __future__ import annotations

from ..reference.attention import eager_attention, reference_attention
from ._attention_op import AttentionBackend, register_backend

__all__ = ["TorchBackend", "EagerBackend"]


class TorchBackend(AttentionBackend):
    """The materialising PyTorch reference: any device/dtype, O(N^2) memory."""

    name = "torch"

    def not_supported_reasons(self, inp):
        return []

    def apply(self, inp):
        return reference_attention(inp.q, inp.k, inp.v, scale=inp.scale, rel_pos_bias=inp.table,
                                   grid=(inp.rows, inp.cols), positions=inp.positions,
                                   amm=inp.amm, bias=inp.bias, modulation=inp.modulation)


class EagerBackend(AttentionBackend):
    """The authors' published materialising code path (``eager_attention``):
    any device/dtype; chosen only when asked for by name."""

    name = "eager"

    def not_supported_reasons(self, inp):
        return []

    def auto_reasons(self, inp):
        return ["'auto' never picks the published eager path (ask backend='eager')"]

    def apply(self, inp):
        return eager_attention(inp.q, inp.k, inp.v, scale=inp.scale, rel_pos_bias=inp.table,
                               grid=(inp.rows, inp.cols), positions=inp.positions,
                               amm=inp.amm, bias=inp.bias, modulation=inp.modulation)


register_backend(TorchBackend(), auto_rank=100)
register_backend(EagerBackend())
