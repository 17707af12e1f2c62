"""Plain-PyTorch definitions of the adaLN pieces of a DiT block.

    layernorm_modulate(x, shift, scale) = LayerNorm(x) * (1 + scale[:, None]) + shift[:, None]
    gated_residual(x, gate, y)           = x + gate[:, None] * y
    mlp_gelu_tanh(x, w1, b1, w2, b2)     = Linear2(GELU_tanh(Linear1(x)))

``LayerNorm`` has no affine parameters and eps 1e-6 (DiT, MDT and EDT all use
``nn.LayerNorm(C, elementwise_affine=False, eps=1e-6)``); ``shift``, ``scale``
and ``gate`` are per-sample ``[B, C]`` rows broadcast over the tokens.  The
Triton kernels in ``edt_kernels.ops.adaln`` are tested against these; mixed
dtypes follow PyTorch's type promotion, exactly as these expressions do.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["reference_layernorm_modulate", "reference_gated_residual", "reference_mlp_gelu_tanh"]


def reference_layernorm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                                 eps: float = 1e-6) -> torch.Tensor:
    """``[B, L, C]``: no-affine LayerNorm over C, then ``* (1 + scale) + shift``."""
    normed = F.layer_norm(x, (x.shape[-1],), eps=eps)
    return normed * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def reference_gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x + gate[:, None] * y`` for ``x, y`` ``[B, L, C]`` and ``gate`` ``[B, C]``."""
    return x + gate.unsqueeze(1) * y


def reference_mlp_gelu_tanh(x: torch.Tensor, w1: torch.Tensor, b1, w2: torch.Tensor, b2) -> torch.Tensor:
    """The block's MLP (timm ``Mlp`` with ``GELU(approximate="tanh")``):
    ``linear(gelu_tanh(linear(x, w1, b1)), w2, b2)``; biases may be None."""
    return F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2)
