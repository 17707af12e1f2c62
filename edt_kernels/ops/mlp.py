"""The MLP of a DiT block, ``fc2(GELU_tanh(fc1(x)))``, as one autograd
function that keeps for its backward the input ``x`` and the pre-activation
``h = fc1(x)`` only.

Autograd on the three ops keeps ``x``, ``h`` and ``GELU(h)`` (the input of
fc2): two ``[B, L, 4C]`` tensors.  Here ``GELU(h)`` is recomputed from ``h``
in the backward (one elementwise pass; no matmul is recomputed), and the
forward is the reference's, op for op, so outputs are bit-equal.

Backends: ``torch`` (``"auto"``'s choice on every device: the matmuls are
cuBLAS/MKL, the GELU and its derivative PyTorch's own) and ``eager`` (the
reference, ``edt_kernels.reference.adaln.reference_mlp_gelu_tanh``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import _validation as V
from ..backends import FunctionBackend, OpCall, register
from ..reference.adaln import reference_mlp_gelu_tanh
from ._triton_utils import dispatch

__all__ = ["mlp_gelu_tanh"]


# ============================================================================ autograd

class _MlpGeluTanh(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, w1, b1, w2, b2):
        h = F.linear(x, w1, b1)
        out = F.linear(F.gelu(h, approximate="tanh"), w2, b2)
        ctx.save_for_backward(x, w1, h, w2)
        ctx.has_b1, ctx.has_b2 = b1 is not None, b2 is not None
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dout):
        x, w1, h, w2 = ctx.saved_tensors
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad
        a = F.gelu(h, approximate="tanh")  # recomputed, not saved
        g2 = dout.reshape(-1, dout.shape[-1])
        dw2 = (g2.t() @ a.reshape(-1, a.shape[-1])).to(w2.dtype) if need_w2 else None
        db2 = g2.sum(0).to(w2.dtype) if (ctx.has_b2 and need_b2) else None
        dh = torch.ops.aten.gelu_backward(dout @ w2.to(dout.dtype), h, approximate="tanh")
        dh2 = dh.reshape(-1, dh.shape[-1])
        dw1 = (dh2.t() @ x.reshape(-1, x.shape[-1]).to(dh.dtype)).to(w1.dtype) if need_w1 else None
        db1 = dh2.sum(0).to(w1.dtype) if (ctx.has_b1 and need_b1) else None
        dx = (dh @ w1.to(dh.dtype)).to(x.dtype) if need_x else None
        return dx, dw1, db1, dw2, db2


def _mlp_torch(x, w1, b1, w2, b2):
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w1, b1, w2, b2)):
        return _MlpGeluTanh.apply(x, w1, b1, w2, b2)
    return reference_mlp_gelu_tanh(x, w1, b1, w2, b2)

# ============================================================================ public function

def mlp_gelu_tanh(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
                  b2: Optional[torch.Tensor], *, backend: str = "auto") -> torch.Tensor:
    """``linear(gelu_tanh(linear(x, w1, b1)), w2, b2)`` keeping ``x`` and the
    pre-activation for the backward (not the activation).

    Args:
        x: ``[..., C]``; w1: ``[H, C]``, b1: ``[H]`` or None; w2: ``[C_out, H]``,
            b2: ``[C_out]`` or None (``nn.Linear`` layouts).
        backend: ``"auto"``, ``"torch"`` or ``"eager"`` (the reference).

    Returns ``[..., C_out]``; differentiable in every input.
    """
    V.check_tensor("x", x, None, "[..., C]")
    if x.dim() < 1:
        raise ValueError(f"x must be [..., C] (at least one dimension), got shape {list(x.shape)}")
    V.check_tensor("w1", w1, 2, "[H, C]", device=x.device)
    V.check_tensor("w2", w2, 2, "[C_out, H]", device=x.device)
    if w1.shape[1] != x.shape[-1] or w2.shape[1] != w1.shape[0]:
        raise ValueError(f"w1 must be [H, C={x.shape[-1]}] and w2 [C_out, H], got w1 {list(w1.shape)}, "
                         f"w2 {list(w2.shape)}")
    for name, b, n in (("b1", b1, w1.shape[0]), ("b2", b2, w2.shape[0])):
        V.check_tensor(name, b, 1, f"[{n}]", device=x.device, allow_none=True)
        if b is not None and tuple(b.shape) != (n,):
            raise ValueError(f"{name} must be [{n}] or None, got {list(b.shape)}")
    for name, t in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):  # autocast casts them itself
        if t is not None and t.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"{name} must have the dtype of x ({x.dtype}), got {t.dtype}")
    return dispatch("mlp_gelu_tanh", backend, OpCall((x, w1, b1, w2, b2), x=x))

# ============================================================================ backends

register("mlp_gelu_tanh", FunctionBackend("torch", lambda c: _mlp_torch(*c.args)), auto_rank=100)
register("mlp_gelu_tanh", FunctionBackend("eager", lambda c: reference_mlp_gelu_tanh(*c.args)))
