"""Run a command, SIGKILL it at random moments, run it again: the kill tests of edt.train and edt.sample.

``run_killed`` starts the command, kills it after a random delay, and starts the SAME command
again, ``kills`` times, then lets the last start run to the end. Half of the kills (chosen at
random) fall anywhere from the start (imports, set-up, loading the C++ extension), the others
after the process has printed ``ready`` (its set-up line), inside the work itself (steps,
checkpoint writes). The delays scale with the timings of an uninterrupted run of the command
(``time_run``), so that on a slow machine the kills still land before the end.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

REPO = Path(__file__).resolve().parents[2]


def child_env(build_dir: Path) -> dict:
    """The environment of the children: this checkout first on the path, one thread, and a build
    directory of their own for the C++ extension (never the user's cache)."""
    return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                OMP_NUM_THREADS="1", EDT_KERNELS_BUILD_DIR=str(build_dir))


class Child:
    """A started command whose stdout is read by a thread (lines kept, ``ready`` line noticed)."""

    def __init__(self, cmd: List[str], env: dict, ready: Optional[str]):
        self.start = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.lines: List[str] = []
        self.ready_at: Optional[float] = None
        self._ready = ready
        self.ready_event = threading.Event()
        self._err: List[str] = []
        self._threads = [threading.Thread(target=self._read_out, daemon=True),
                         threading.Thread(target=self._read_err, daemon=True)]
        for t in self._threads:
            t.start()

    def _read_out(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            if self._ready is not None and self.ready_at is None and self._ready in line:
                self.ready_at = time.monotonic()
                self.ready_event.set()
        self.ready_event.set()  # the end: nobody waits for a line that will not come

    def _read_err(self):
        for line in self.proc.stderr:
            self._err.append(line)

    def wait(self, timeout: float) -> int:
        rc = self.proc.wait(timeout)
        for t in self._threads:
            t.join(10)
        return rc

    @property
    def stderr(self) -> str:
        return "".join(self._err)


@dataclass
class Timing:
    ready_s: float  # from the start to the ready line (or the end when there is none)
    total_s: float


@dataclass
class KillLog:
    kills: List[str] = field(default_factory=list)  # "start+1.23s" / "ready+0.45s" per kill
    final_rc: Optional[int] = None
    final_stdout: str = ""


def time_run(cmd: List[str], env: dict, ready: Optional[str], timeout: float = 600) -> Timing:
    """Run the command to the end (exit 0 asserted) and time it."""
    child = Child(cmd, env, ready)
    rc = child.wait(timeout)
    end = time.monotonic()
    assert rc == 0, child.stderr[-3000:]
    ready_s = (child.ready_at or end) - child.start
    return Timing(ready_s=ready_s, total_s=end - child.start)


class EndedBeforeKill(AssertionError):
    """The command finished before the moment chosen for a kill."""


def run_killed(cmd: List[str], env: dict, *, kills: int, timing: Timing, ready: Optional[str], seed: int,
               remaining: Callable[[], float] = lambda: 1.0, timeout: float = 600,
               reset: Optional[Callable[[], None]] = None, attempts: int = 4) -> KillLog:
    """Kill the command ``kills`` times at random moments, then run it to the end.

    ``remaining()``: the fraction of the work still to do (e.g. steps left / steps), which
    scales the delays of the kills that fall after the ready line.  The work of one run varies
    (a busy machine, a warm cache): when the command ends before a kill and ``reset`` (which
    removes what the killed runs wrote) is given, the whole scenario starts again with the
    delays after the ready line halved, up to ``attempts`` times."""
    scale = 1.0
    for attempt in range(attempts):
        try:
            return _run_killed_once(cmd, env, kills, timing, ready, random.Random(seed + attempt), remaining,
                                    timeout, scale)
        except EndedBeforeKill:
            if reset is None or attempt == attempts - 1:
                raise
            reset()
            scale /= 2
    raise AssertionError("unreachable")


def _run_killed_once(cmd: List[str], env: dict, kills: int, timing: Timing, ready: Optional[str],
                     rng: random.Random, remaining: Callable[[], float], timeout: float, scale: float) -> KillLog:
    log = KillLog()
    while len(log.kills) < kills:
        child = Child(cmd, env, ready)
        if ready is None or rng.random() < 0.5:
            delay = rng.uniform(0.0, 0.8 * timing.ready_s)
            if child.proc.poll() is None:
                time.sleep(max(0.0, child.start + delay - time.monotonic()))
            where = f"start+{delay:.2f}s"
        else:
            work = (timing.total_s - timing.ready_s) * remaining() * scale
            child.ready_event.wait(timeout)
            delay = rng.uniform(0.0, 0.9 * work)
            time.sleep(delay)
            where = f"ready+{delay:.2f}s"
        if child.proc.poll() is not None:  # it finished first: the work is done, no kill to make
            child.wait(timeout)
            raise EndedBeforeKill(f"the command ended before kill {len(log.kills) + 1} ({where}); "
                                 f"kills so far: {log.kills}")
        child.proc.send_signal(signal.SIGKILL)
        assert child.wait(timeout) == -signal.SIGKILL
        log.kills.append(where)
    child = Child(cmd, env, ready)
    log.final_rc = child.wait(timeout)
    log.final_stdout = "".join(child.lines)
    assert log.final_rc == 0, child.stderr[-3000:]
    return log


def python_module(module: str, *args: str) -> List[str]:
    return [sys.executable, "-m", module, *args]
