"""Peak memory of one call: CUDA's allocator statistics, or the rise of the process's peak
resident set on Linux."""
from __future__ import annotations

import ctypes
import functools
import pathlib
import sys
from typing import Any, Callable, Optional, Sequence

import torch

from .device import DEVICE, synchronize

__all__ = ["cpu_peak_method", "peak_memory", "memory_note", "tensor_bytes"]

_LIBC = None


def _malloc_trim() -> None:
    global _LIBC
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _proc_status(key: str) -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _cpu_peak_supported() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _proc_status("VmHWM")
        return True
    except (OSError, KeyError):
        return False


@functools.lru_cache(maxsize=None)
def cpu_peak_method() -> Optional[str]:
    """How :func:`peak_memory` measures on the CPU, or None where it cannot."""
    if sys.platform.startswith("linux") and _cpu_peak_supported():
        return "rise of peak RSS (VmHWM after /proc/self/clear_refs reset and malloc_trim)"
    return None


def peak_memory(fn: Callable[..., Any], args: Sequence[Any], device: torch.device = DEVICE
                ) -> Optional[int]:
    """Bytes the call ``fn(*args)`` needs above what is live before it (its
    outputs, workspace and saved tensors), or ``None`` where it cannot be measured."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn(*args)
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del out
        return int(peak)
    if cpu_peak_method() is None:
        return None
    _malloc_trim()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _proc_status("VmRSS")
    out = fn(*args)
    peak = _proc_status("VmHWM") - before
    del out
    return max(0, int(peak))


def memory_note() -> str:
    if DEVICE.type == "cuda":
        return ("peak memory = torch.cuda.max_memory_allocated over one call minus what was "
                "allocated before it (outputs + workspace + saved tensors)")
    if cpu_peak_method():
        return f"peak memory (CPU) = {cpu_peak_method()} over one call; page granularity"
    return "peak memory: n/a on this platform (no CUDA, no /proc peak RSS)"


def tensor_bytes(*tensors) -> int:
    return int(sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor)))
