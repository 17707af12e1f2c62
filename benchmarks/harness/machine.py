"""What a results section records about the run: versions, commit, load, and whether
the machine was too busy for its timings to mean much (:func:`busy_reasons`)."""
from __future__ import annotations

import datetime as _dt
import math
import os
import pathlib
import platform
import subprocess
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .device import DEVICE, SHAPES, apply_thread_setting, device_name

__all__ = ["REPO_ROOT", "git_commit", "load_average", "busy_warning", "machine_snapshot", "start_run", "run_start",
           "machine_load_since", "BUSY_MARK", "busy_reasons", "busy_note", "run_info"]

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def _pkg_version(name: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001 - not installed
        return None


def git_commit() -> Optional[str]:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("+dirty" if dirty else "")) if sha else None
    except (OSError, subprocess.SubprocessError):
        return None


def load_average() -> Optional[str]:
    """1/5/15-minute load average and core count: a busy machine makes CPU timings noisy."""
    try:
        a, b, c = os.getloadavg()
        return f"{a:.1f}/{b:.1f}/{c:.1f} on {os.cpu_count()} cores"
    except OSError:
        return None


def busy_warning() -> Optional[str]:
    """A warning when other work competes for the CPU (timings then mean little)."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return None
    cores = os.cpu_count() or 1
    if load <= 0.75 * cores:
        return None
    return (f"the machine is busy (load average {load:.1f} on {cores} cores): CPU timings will be noisy"
            + ("; with several torch threads an oversubscribed core stalls every OpenMP barrier, "
               "EDT_BENCH_THREADS=1 gives steadier numbers" if torch.get_num_threads() > 1 else ""))


def _proc_stat_cpu() -> Optional[Tuple[float, float, float]]:
    """(busy, steal, total) seconds of all cores since boot from ``/proc/stat``."""
    try:
        fields = pathlib.Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    if fields[0] != "cpu" or len(fields) < 5:
        return None
    v = [int(x) for x in fields[1:]]
    hz = float(os.sysconf("SC_CLK_TCK")) if hasattr(os, "sysconf") else 100.0
    user, nice, system, idle = v[:4]
    iowait, irq, softirq, steal = (v[4:8] + [0, 0, 0, 0])[:4]
    total = user + nice + system + idle + iowait + irq + softirq + steal  # guest is inside user
    return (user + nice + system + irq + softirq) / hz, steal / hz, total / hz


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def machine_snapshot() -> Dict[str, Any]:
    """What :func:`machine_load_since` compares: /proc/stat, own CPU time, load."""
    try:
        load1 = os.getloadavg()[0]
    except OSError:
        load1 = None
    return {"stat": _proc_stat_cpu(), "own": _own_cpu(), "load1": load1, "cores": os.cpu_count() or 1}


_RUN_START: List[Dict[str, Any]] = []


def start_run() -> None:
    """Mark the start of a run (a benchmark ``main`` or a pytest session): the machine
    snapshot :func:`run_start` returns, and the thread setting of
    :func:`~benchmarks.harness.device.apply_thread_setting`."""
    apply_thread_setting()
    _RUN_START[:] = [machine_snapshot()]


def run_start() -> Dict[str, Any]:
    """The snapshot of :func:`start_run` (taken now if the run was not marked)."""
    if not _RUN_START:
        _RUN_START.append(machine_snapshot())
    return _RUN_START[0]


def machine_load_since(start: Dict[str, Any], now: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Share of all cores' time used by *other* processes, and the steal share,
    between two snapshots (None where /proc/stat is unreadable)."""
    now = machine_snapshot() if now is None else now
    out = {"others_share": None, "steal_share": None, "load1_at_start": start.get("load1"),
           "cores": start.get("cores") or 1}
    if start.get("stat") and now.get("stat"):
        busy = now["stat"][0] - start["stat"][0]
        steal = now["stat"][1] - start["stat"][1]
        total = now["stat"][2] - start["stat"][2]
        own = now["own"] - start["own"]
        if total > 0:
            out["others_share"] = max(0.0, busy - own) / total
            out["steal_share"] = max(0.0, steal) / total
    return out


BUSY_OTHERS_SHARE = 0.25
BUSY_STEAL_SHARE = 0.05
BUSY_LOAD_PER_CORE = 0.75
BUSY_SPREAD = 0.2
BUSY_MARK = "busy machine: ratios unreliable"


def busy_reasons(load: Dict[str, Any], spreads: Sequence[float] = ()) -> List[str]:
    """Why the timings of a run are unreliable (empty: they are not), from
    :func:`machine_load_since` and the ``spread`` of each timed row."""
    why = []
    cores = load.get("cores") or 1
    if load.get("others_share") is not None and load["others_share"] > BUSY_OTHERS_SHARE:
        why.append(f"other processes used {100 * load['others_share']:.0f}% of the {cores} cores' time "
                   f"during the run (limit {100 * BUSY_OTHERS_SHARE:.0f}%)")
    if load.get("steal_share") is not None and load["steal_share"] > BUSY_STEAL_SHARE:
        why.append(f"CPU steal {100 * load['steal_share']:.0f}% (limit {100 * BUSY_STEAL_SHARE:.0f}%)")
    if load.get("load1_at_start") is not None and load["load1_at_start"] > BUSY_LOAD_PER_CORE * cores:
        why.append(f"load average {load['load1_at_start']:.1f} on {cores} cores when the run started "
                   f"(limit {BUSY_LOAD_PER_CORE * cores:.1f})")
    spreads = sorted(float(x) for x in spreads if isinstance(x, (int, float)) and math.isfinite(x))
    if spreads:
        med = spreads[len(spreads) // 2] if len(spreads) % 2 else 0.5 * (
            spreads[len(spreads) // 2 - 1] + spreads[len(spreads) // 2])
        if med > BUSY_SPREAD:
            why.append(f"noisy timings: median spread (p80-p20)/median {med:.2f} (limit {BUSY_SPREAD})")
    return why


def busy_note(reasons: Sequence[str]) -> str:
    return f"**{BUSY_MARK}** ({'; '.join(reasons)})"


def run_info() -> Dict[str, Any]:
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "git_commit": git_commit(),
        "torch": torch.__version__,
        "triton": _pkg_version("triton"),
        "python": platform.python_version(),
        "device": device_name(),
        "shapes": SHAPES,
        "threads": torch.get_num_threads(),
        "load_average": load_average(),
    }
    if DEVICE.type == "cuda":
        info["cuda"] = torch.version.cuda
    return info
