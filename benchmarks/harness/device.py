"""Which device the benchmarks run on, its names, the shape set, and the torch settings of a run."""
from __future__ import annotations

import os
import pathlib
import platform
import re

import torch

__all__ = ["IS_CUDA", "DEVICE", "SHAPES", "SMALL", "CPU_NOTE", "apply_thread_setting", "cpu_name", "device_name",
           "slugify", "device_slug", "synchronize", "default_dtype", "configure_compile"]

IS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if IS_CUDA else "cpu")
THREADS_ENV = "EDT_BENCH_THREADS"


def apply_thread_setting() -> None:
    """CPU threads for the benchmarks from ``EDT_BENCH_THREADS`` (e.g. 1 on a machine shared
    with other jobs, where OpenMP barriers across an oversubscribed core dominate small ops)."""
    if os.environ.get(THREADS_ENV):
        torch.set_num_threads(int(os.environ[THREADS_ENV]))


def _shape_set() -> str:
    env = os.environ.get("EDT_BENCH_SHAPES", "").strip().lower()
    if env in ("small", "full"):
        return env
    if env:
        raise ValueError(f"EDT_BENCH_SHAPES must be 'small' or 'full', got {env!r}")
    return "full" if IS_CUDA else "small"


SHAPES = _shape_set()
SMALL = SHAPES == "small"

CPU_NOTE = ("CPU-only run: small shapes, float32, reduced batch and steps. CPU figures are "
            "not the GPU targets or the paper's GPU claims; they show that the suite runs "
            "and how the paths compare on this CPU.")


def cpu_name() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: torch.device = DEVICE) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    n = torch.get_num_threads()
    return f"CPU: {cpu_name()} ({n} thread{'' if n == 1 else 's'})"


def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_slug(device: torch.device = DEVICE) -> str:
    if device.type == "cuda":
        return slugify(torch.cuda.get_device_name(device))
    return "cpu-" + slugify(cpu_name())


def synchronize(device: torch.device = DEVICE) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def default_dtype() -> torch.dtype:
    """bfloat16 on CUDA (the targets are stated for it), float32 on the CPU."""
    return torch.bfloat16 if DEVICE.type == "cuda" else torch.float32


def configure_compile() -> None:
    """torch.compile settings for benchmarks: many shapes/closures compile the
    same function, so allow more recompiles, and *fail* instead of silently
    falling back to eager when the limit is hit (a fallback would be timed as
    if it were compiled)."""
    import torch._dynamo.config as dcfg

    dcfg.recompile_limit = max(dcfg.recompile_limit, 64)
    dcfg.accumulated_recompile_limit = max(dcfg.accumulated_recompile_limit, 1024)
    dcfg.fail_on_recompile_limit_hit = True
