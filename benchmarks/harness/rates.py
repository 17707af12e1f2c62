"""Rates: the FLOP formula of attention and the device's measured copy bandwidth."""
from __future__ import annotations

from typing import Dict

import torch

from .device import DEVICE
from .timing import measure

__all__ = ["attention_flops", "copy_bandwidth"]


def attention_flops(B: int, H: int, N: int, D: int, mode: str) -> float:
    """Matmul FLOPs of attention: forward ``4 B H N^2 D`` (QK^T and PV), the
    backward 2.5x the forward (five matmuls instead of two); ``mode`` is
    ``"fwd"`` or ``"fwd+bwd"``."""
    fwd = 4.0 * B * H * N * N * D
    if mode == "fwd":
        return fwd
    if mode == "fwd+bwd":
        return fwd * 3.5
    raise ValueError(f"mode must be 'fwd' or 'fwd+bwd', got {mode!r}")


_COPY_BW: Dict[str, float] = {}


def copy_bandwidth(device: torch.device = DEVICE) -> float:
    """Measured device copy bandwidth in GB/s: ``dst.copy_(src)`` of a large
    float32 tensor, counting bytes read plus bytes written; median of repeats."""
    key = str(device)
    if key in _COPY_BW:
        return _COPY_BW[key]
    nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), [()], warmup=3, repeats=10 if device.type == "cuda" else 5,
                device=device)
    _COPY_BW[key] = 2 * nbytes / t.median / 1e9
    del src, dst
    return _COPY_BW[key]
