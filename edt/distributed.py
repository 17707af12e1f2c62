"""The process of a ``torchrun`` (or single-process) run: its device and process group, and
seeds mixed from integers, shared by ``edt.train``, ``edt.sample`` and ``edt.extract_features``."""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["Dist", "setup_distributed", "process_group", "mix_seed"]


@dataclass
class Dist:
    distributed: bool
    rank: int
    world: int
    device: torch.device


def setup_distributed(device_arg: str) -> Dist:
    """Device and process group from torchrun's environment (gloo on CPU, NCCL on CUDA)."""
    use_cuda = torch.cuda.is_available() if device_arg == "auto" else device_arg == "cuda"
    if device_arg == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked but no CUDA device is available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    distributed = world > 1
    if distributed and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", init_method="env://")
    return Dist(distributed, rank, world, device)


@contextmanager
def process_group(device_arg: str, barrier_on_exit: bool = False) -> Iterator[Dist]:
    """:func:`setup_distributed`, and the process group destroyed on the way out (after a
    barrier with ``barrier_on_exit``)."""
    d = setup_distributed(device_arg)
    try:
        yield d
    finally:
        if d.distributed and dist.is_initialized():
            if barrier_on_exit:
                dist.barrier()
            dist.destroy_process_group()


def mix_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (numpy SeedSequence)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint32)
               .astype(np.uint64).dot(np.array([1, 1 << 32], dtype=np.uint64)) & np.uint64((1 << 63) - 1))
