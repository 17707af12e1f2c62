"""The process of a ``torchrun`` (or single-process) run: its device and process group, and
seeds mixed from integers, shared by ``edt.train``, ``edt.sample`` and ``edt.extract_features``."""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["Dist", "setup_distributed", "process_group", "mix_seed", "process_group_timeout",
           "peer_failure_message", "exit_status_of_peer_failure"]


@dataclass
class Dist:
    distributed: bool
    rank: int
    world: int
    device: torch.device


def setup_distributed(device_arg: str) -> Dist:
    """Device and process group from torchrun's environment (gloo on CPU, NCCL on CUDA); a
    collective waits at most ``EDT_DIST_TIMEOUT_S`` (600 s) for a rank that died or hangs."""
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
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", init_method="env://",
                                timeout=process_group_timeout())
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


#: Seconds a collective waits for the other ranks before the process group gives up (a rank that
#: died or hangs): ``EDT_DIST_TIMEOUT_S``, default 600 (NCCL's own default; gloo's is 1800).
DIST_TIMEOUT_ENV = "EDT_DIST_TIMEOUT_S"
DIST_TIMEOUT_DEFAULT_S = 600.0

#: Words of the errors a collective raises when another rank is gone (gloo: the peer closed its
#: connection; NCCL: the watchdog's timeout or a remote error).
_PEER_FAILURE = ("connection closed by peer", "connection reset by peer", "broken pipe", "timed out",
                 "timeout", "nccl")


def process_group_timeout():
    """The ``timeout`` of ``init_process_group`` (a ``timedelta``), from ``EDT_DIST_TIMEOUT_S``."""
    import datetime

    raw = os.environ.get(DIST_TIMEOUT_ENV, "")
    try:
        seconds = float(raw) if raw else DIST_TIMEOUT_DEFAULT_S
    except ValueError:
        raise ValueError(f"{DIST_TIMEOUT_ENV} must be a number of seconds, got {raw!r}") from None
    if not seconds > 0:
        raise ValueError(f"{DIST_TIMEOUT_ENV} must be > 0, got {raw!r}")
    return datetime.timedelta(seconds=seconds)


def exit_status_of_peer_failure(exc: RuntimeError) -> int:
    """For the command lines' ``except RuntimeError``: the one ``error:`` line of
    ``peer_failure_message`` on stderr and exit status 1; any other error is raised again."""
    why = peer_failure_message(exc)
    if why is None:
        raise exc
    print(f"error: {why}", file=sys.stderr)
    return 1


def peer_failure_message(exc: BaseException) -> Optional[str]:
    """In a process of a distributed job (torchrun's ``WORLD_SIZE`` > 1): one line for an error a
    collective raised because another rank died or stopped answering; else None (any other
    error is not this one's to explain)."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return None
    rank = os.environ.get("RANK", "?")
    try:
        from torch.distributed import DistError
    except ImportError:  # torch built without distributed
        DistError = ()
    text = str(exc)
    if not (isinstance(exc, DistError) or any(w in text.lower() for w in _PEER_FAILURE)):
        return None
    first = (text.strip().splitlines() or [type(exc).__name__])[0][:300]
    return (f"rank {rank}: another process of this distributed job died or stopped answering ({first}); "
            f"restart the job with the same command and --resume auto")
