"""The lock around the C++ extension's build and load (``edt_kernels._ext.build_lock``): an OS lock,
so that a process killed inside it (a preempted job, an OOM kill, a test runner's timeout) delays
nobody. Real processes, SIGKILL; no compiler needed (the build itself is tested in test_cpp_ext.py)."""
import os
import subprocess
import sys
import textwrap

from edt_kernels import _ext


_LOCK_CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from torch.utils.file_baton import FileBaton
    from edt_kernels import _ext
    build_dir, hold = Path(sys.argv[1]), sys.argv[2] == "hold"
    print("acquiring", flush=True)
    with _ext.build_lock(build_dir):
        # what torch's cpp_extension.load does first: take its own lock file (a build in progress
        # holds it; a killed build leaves it behind), or wait for it to go
        assert FileBaton(str(build_dir / "lock")).try_acquire(), "torch's lock file is still there"
        print("entered", flush=True)
        if hold:
            time.sleep(600)
""")


def _wait_for_line(proc, text: str, timeout: float) -> None:
    import select
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if ready:
            line = proc.stdout.readline()
            if line.strip() == text:
                return
            if not line:
                break
    proc.kill()
    raise AssertionError(f"no {text!r} from the child within {timeout} s: {proc.stderr.read()[-2000:]}")


def test_a_build_killed_inside_the_lock_does_not_block_the_next(tmp_path):
    """A process SIGKILLed inside the build lock (holding torch's lock file too, as a build does):
    a second process waits while it lives and goes in at once when it dies."""
    import signal
    import time

    env = {**os.environ, "EDT_KERNELS_BUILD_DIR": str(tmp_path)}
    args = [sys.executable, "-c", _LOCK_CHILD, str(tmp_path)]
    popen = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    holder = subprocess.Popen(args + ["hold"], **popen)
    waiter = None
    try:
        _wait_for_line(holder, "acquiring", 120)
        _wait_for_line(holder, "entered", 30)
        waiter = subprocess.Popen(args + ["pass"], **popen)
        _wait_for_line(waiter, "acquiring", 120)
        time.sleep(1.0)
        assert waiter.poll() is None, f"the second process did not wait for the lock: {waiter.stderr.read()}"
        holder.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        holder.wait(30)
        _wait_for_line(waiter, "entered", 30)
        assert waiter.wait(30) == 0, waiter.stderr.read()[-2000:]
        # "at once": a few seconds on a busy machine, against a build's minute (and torch's own
        # lock file, which would have made it wait for ever)
        assert time.monotonic() - killed < 10.0
        assert (tmp_path / _ext.BUILD_LOCK_NAME).exists()  # the lock is a file the OS locks, kept
    finally:
        for p in (holder, waiter):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
