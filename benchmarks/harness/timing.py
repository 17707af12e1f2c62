"""Timing of a call: warm-up, rotated input sets, median (CUDA events on a GPU)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from .device import DEVICE, synchronize

__all__ = ["Timing", "rotations", "measure"]


@dataclass
class Timing:
    """Seconds per call over ``repeats`` rotated calls (warm-up excluded)."""

    times: List[float]

    @property
    def median(self) -> float:
        s = sorted(self.times)
        n = len(s)
        return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])

    @property
    def min(self) -> float:
        return min(self.times)

    def quantile(self, q: float) -> float:
        s = sorted(self.times)
        return s[min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))]

    @property
    def spread(self) -> float:
        """(p80 - p20) / median: how noisy the median is."""
        return (self.quantile(0.8) - self.quantile(0.2)) / self.median

    def summary(self) -> Dict[str, float]:
        return {"ms": self.median * 1e3, "ms_min": self.min * 1e3, "spread": self.spread,
                "repeats": len(self.times)}


def rotations(set_bytes: int, device: torch.device = DEVICE, cap: int = 8) -> int:
    """How many input sets to rotate through so that together they overflow the
    last-level cache (L2 of a GPU ~50 MB, L3 of a CPU ~32 MB): 2..cap."""
    target = 256 * 2**20 if device.type == "cuda" else 64 * 2**20
    return int(min(cap, max(2, math.ceil(target / max(1, set_bytes)))))


def measure(fn: Callable[..., Any], input_sets: Sequence[Sequence[Any]], *, warmup: int,
            repeats: int, benchmark=None, device: torch.device = DEVICE) -> Optional[Timing]:
    """Time ``fn(*input_sets[i])`` over rotated input sets.

    With a pytest-benchmark fixture the calls are made by ``benchmark.pedantic``
    (its table then shows them too).  Returns ``None`` when pytest-benchmark is
    disabled (``--benchmark-disable``: one call, nothing timed).
    """
    if not input_sets:
        raise ValueError("measure needs at least one input set")
    times: List[float] = []
    counter = [0]
    cuda = device.type == "cuda"

    def next_args():
        args = input_sets[counter[0] % len(input_sets)]
        counter[0] += 1
        return tuple(args)

    def target(*args):
        if cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e-3)
        else:
            t0 = time.perf_counter()
            fn(*args)
            times.append(time.perf_counter() - t0)

    synchronize(device)
    if benchmark is not None:
        if getattr(benchmark, "disabled", False):
            target(*next_args())
            return None
        benchmark.pedantic(target, setup=lambda: (next_args(), {}), rounds=repeats,
                           warmup_rounds=warmup, iterations=1)
    else:
        for _ in range(warmup + repeats):
            target(*next_args())
    if len(times) < repeats:
        raise RuntimeError(f"expected {repeats} timed calls, got {len(times)}")
    return Timing(times[-repeats:])
