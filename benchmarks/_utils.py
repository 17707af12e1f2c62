"""Shared benchmark machinery: device, timing, memory, rates and the results files.

Method (the same for every module, see ``/benchmarks/README`` in the module docstrings):

* **Device.** CUDA when ``torch.cuda.is_available()``, else the CPU.  On the CPU
  every module runs *small* shapes (``SMALL``) and every result says so; the
  environment variable ``EDT_BENCH_SHAPES=small|full`` overrides the choice.
* **Timing.** Warm-up calls first (compilation, autotuning and allocator
  growth stay out of the numbers), then ``repeats`` timed calls, each on the
  next of several input sets (rotation, so that a working set that fits in L2
  does not flatter a kernel), reported as the median.  On CUDA each call is
  bracketed by CUDA events and synchronised (the time is the device time of
  the call); on the CPU by ``time.perf_counter``.  Under pytest the calls are
  made by ``benchmark.pedantic`` so pytest-benchmark shows the same calls in its
  own table (its clock is the host clock around a synchronised call).
* **Memory.** CUDA: ``torch.cuda.max_memory_allocated`` over one extra call,
  minus what was allocated before it (outputs, workspace and saved tensors of
  the call).  CPU: tracemalloc does not see torch's allocator, so we reset the
  process's peak resident set (``/proc/self/clear_refs``), trim malloc's free
  lists and read how far ``VmHWM`` rises over the call (page granularity; it
  includes OpenMP and allocator effects).  Where neither works: ``None`` (n/a).
* **Rates.** TFLOP/s from an explicit FLOP formula (attention forward
  ``4 B H N^2 D``, backward 2.5x that); GB/s for memory-bound kernels from the
  fewest bytes the operation must move (each input read once, each output
  written once), compared with the device's *measured* copy bandwidth
  (``dst.copy_(src)`` on a large tensor, read + write bytes).
* **Results.** Rows recorded by any module during one run go to
  ``benchmarks/results/local/<device-slug>.json`` and ``.md`` (untracked);
  the committed ``benchmarks/results/`` files are rewritten only when asked
  (``EDT_BENCH_UPDATE=1``, ``pytest benchmarks/ --update-results`` or a
  module's ``main(["--update-results"])``).  A section produced by
  this run replaces the section of the same name in the file, other sections
  are kept (merge by section).  Each section carries its own run information
  (date, git commit, torch/triton versions, shape set).  Failures are never
  turned into numbers: a failing measurement raises (pytest) or is recorded
  with its error text and makes ``main()`` exit non-zero.
* **Busy machine.** A run is marked "busy machine: ratios unreliable" in every
  table of every section it writes when any of these holds (:func:`busy_reasons`):
  other processes used more than 25% of all cores' CPU time between the start
  of the run and the writing of the section (``/proc/stat`` busy time minus
  this process's own CPU time); CPU steal above 5% of that time (a VM whose
  host is oversubscribed); a 1-minute load average above 0.75 per core when the
  run started; or the section's timings are noisy (median over its rows of
  ``spread`` = (p80 - p20) / median above 0.2).
"""
from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import json
import math
import os
import pathlib
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"  # committed results
LOCAL_RESULTS_DIR = RESULTS_DIR / "local"  # untracked (.gitignore): where a plain run writes
REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
UPDATE_ENV = "EDT_BENCH_UPDATE"


def update_requested() -> bool:
    """Whether this run may rewrite the committed results (``EDT_BENCH_UPDATE=1``)."""
    value = os.environ.get(UPDATE_ENV, "0").strip().lower()
    if value in ("", "0", "false", "no"):
        return False
    if value in ("1", "true", "yes"):
        return True
    raise ValueError(f"{UPDATE_ENV} must be 0 or 1, got {value!r}")


def default_results_dir() -> pathlib.Path:
    """``benchmarks/results/`` when an update of the committed files is asked
    for, else the untracked ``benchmarks/results/local/``."""
    return RESULTS_DIR if update_requested() else LOCAL_RESULTS_DIR

# ----------------------------------------------------------------------------- device

IS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if IS_CUDA else "cpu")

if os.environ.get("EDT_BENCH_THREADS"):
    # CPU threads for the benchmarks (e.g. 1 on a machine shared with other jobs,
    # where OpenMP barriers across an oversubscribed core dominate small ops).
    torch.set_num_threads(int(os.environ["EDT_BENCH_THREADS"]))


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


# ----------------------------------------------------------------------------- run info

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


def _load_average() -> Optional[str]:
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


RUN_START = machine_snapshot()  # the run starts when the benchmark machinery is imported


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
        "load_average": _load_average(),
    }
    if DEVICE.type == "cuda":
        info["cuda"] = torch.version.cuda
    return info


# ----------------------------------------------------------------------------- timing

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


# ----------------------------------------------------------------------------- memory

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


CPU_PEAK_METHOD = ("rise of peak RSS (VmHWM after /proc/self/clear_refs reset and malloc_trim)"
                   if sys.platform.startswith("linux") and _cpu_peak_supported() else None)


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
    if CPU_PEAK_METHOD is None:
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
    if CPU_PEAK_METHOD:
        return f"peak memory (CPU) = {CPU_PEAK_METHOD} over one call; page granularity"
    return "peak memory: n/a on this platform (no CUDA, no /proc peak RSS)"


def tensor_bytes(*tensors) -> int:
    return int(sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor)))


# ----------------------------------------------------------------------------- rates

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


def configure_compile() -> None:
    """torch.compile settings for benchmarks: many shapes/closures compile the
    same function, so allow more recompiles, and *fail* instead of silently
    falling back to eager when the limit is hit (a fallback would be timed as
    if it were compiled)."""
    import torch._dynamo.config as dcfg

    dcfg.recompile_limit = max(dcfg.recompile_limit, 64)
    dcfg.accumulated_recompile_limit = max(dcfg.accumulated_recompile_limit, 1024)
    dcfg.fail_on_recompile_limit_hit = True


# ----------------------------------------------------------------------------- results

@dataclass
class Section:
    """One table of results (one benchmark family), plus derived summary tables."""

    name: str
    title: str
    columns: List[Tuple[str, str]]  # (row key, header)
    notes: List[str] = field(default_factory=list)
    rows: List[Dict[str, Any]] = field(default_factory=list)
    summarize: Optional[Callable[["Section"], List[Dict[str, Any]]]] = None

    def to_json(self) -> Dict[str, Any]:
        tables = self.summarize(self) if self.summarize is not None else []
        run = run_info()
        load = machine_load_since(RUN_START)
        busy = busy_reasons(load, [r.get("spread") for r in self.rows])
        run["machine_load"] = load
        run["busy"] = busy  # non-empty: every table of this section is marked unreliable
        if busy:
            note = busy_note(busy)
            tables = [dict(t, notes=[note] + [n for n in t.get("notes", []) if BUSY_MARK not in n])
                      for t in tables]
        return {"title": self.title, "notes": list(self.notes), "columns": [list(c) for c in self.columns],
                "rows": self.rows, "tables": tables, "run": run}


RESULTS: Dict[str, Section] = {}


def section(name: str, title: str, columns: Sequence[Tuple[str, str]], notes: Sequence[str] = (),
            summarize=None) -> Section:
    """The section ``name`` of this run (created on first use)."""
    if name not in RESULTS:
        RESULTS[name] = Section(name, title, list(columns), list(notes), summarize=summarize)
    sec = RESULTS[name]
    for n in notes:
        if n not in sec.notes:
            sec.notes.append(n)
    return sec


def record(name: str, row: Dict[str, Any]) -> None:
    """Add a row to section ``name`` (created with :func:`section` first); a row
    with the same identity (all non-metric keys listed in ``row['_key']``) is replaced."""
    sec = RESULTS[name]
    key = row.get("_key")
    if key is not None:
        sec.rows = [r for r in sec.rows if r.get("_key") != key]
    sec.rows.append(row)


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        a = abs(v)
        if a == 0:
            return "0"
        if a >= 1000:
            return f"{v:,.0f}"
        if a >= 100:
            return f"{v:.1f}"
        if a >= 1:
            return f"{v:.2f}"
        if a >= 0.01:
            return f"{v:.3f}"
        return f"{v:.2e}"
    return str(v).replace("|", "\\|")


def markdown_table(columns: Sequence[Sequence[str]], rows: Sequence[Dict[str, Any]]) -> str:
    head = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep] + body)


def render_markdown(data: Dict[str, Any]) -> str:
    dev = data.get("device", {})
    out = [f"# edt-kernels benchmarks: {dev.get('name', '?')}", ""]
    if dev.get("kind") == "cpu":
        out += [f"**{CPU_NOTE}**", ""]
    out += ["Made by `pytest benchmarks/ --benchmark-only` (or a module's `main()`); "
            "method in `benchmarks/_utils.py`. Times are medians of rotated, warmed-up calls.", ""]
    for name, sec in data.get("sections", {}).items():
        run = sec.get("run", {})
        out += [f"## {sec['title']}", ""]
        out += [f"_run: {run.get('date')}, commit {run.get('git_commit')}, torch {run.get('torch')}, "
                f"triton {run.get('triton')}, shapes: {run.get('shapes')}, device: {run.get('device')}, "
                f"load average {run.get('load_average')}_", ""]
        for note in sec.get("notes", []):
            out.append(f"- {note}")
        if sec.get("notes"):
            out.append("")
        busy = busy_note(run["busy"]) if run.get("busy") else None
        for table in sec.get("tables", []):
            out += [f"### {table['title']}", ""]
            if busy and not any(BUSY_MARK in n for n in table.get("notes", [])):
                out += [f"- {busy}", ""]
            for note in table.get("notes", []):
                out.append(f"- {note}")
            if table.get("notes"):
                out.append("")
            out += [markdown_table(table["columns"], table["rows"]), ""]
        if sec.get("rows"):
            if sec.get("tables"):
                out += ["### All measurements", ""]
            if busy:
                out += [f"- {busy}", ""]
            out += [markdown_table(sec["columns"], sec["rows"]), ""]
    return "\n".join(out).rstrip() + "\n"


def write_results(sections: Optional[Sequence[Section]] = None, out_dir: Optional[pathlib.Path] = None,
                  ) -> Tuple[pathlib.Path, pathlib.Path]:
    """Merge ``sections`` (default: everything recorded in this process) into
    ``<out_dir>/<device-slug>.json`` and re-render ``.md``; returns both paths.
    ``out_dir`` defaults to :func:`default_results_dir` (the untracked
    ``results/local/`` unless ``EDT_BENCH_UPDATE=1``)."""
    sections = list(RESULTS.values()) if sections is None else list(sections)
    out_dir = pathlib.Path(default_results_dir() if out_dir is None else out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = device_slug()
    jpath, mpath = out_dir / f"{slug}.json", out_dir / f"{slug}.md"
    data: Dict[str, Any] = {}
    if jpath.exists():
        try:
            data = json.loads(jpath.read_text())
        except json.JSONDecodeError as exc:
            raise RuntimeError(f"{jpath} is not valid JSON ({exc}); move it away and re-run") from exc
    data["device"] = {"name": device_name(), "slug": slug, "kind": DEVICE.type,
                      "copy_bandwidth_GBps": copy_bandwidth()}
    data.setdefault("sections", {})
    for sec in sections:
        if sec.rows:
            data["sections"][sec.name] = sec.to_json()
    data["sections"] = dict(sorted(data["sections"].items()))
    jpath.write_text(json.dumps(data, indent=1, default=str) + "\n")
    mpath.write_text(render_markdown(data))
    return jpath, mpath


# ----------------------------------------------------------------------------- CLI helpers

def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls (default: per module)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls (default: per module)")
    p.add_argument("--out-dir", type=pathlib.Path, default=None,
                   help=f"where <device>.json/.md go (default {LOCAL_RESULTS_DIR}, untracked; "
                        f"{RESULTS_DIR} with --update-results or {UPDATE_ENV}=1)")
    p.add_argument("--update-results", action="store_true",
                   help=f"rewrite the committed results in {RESULTS_DIR}")
    p.add_argument("--no-write", action="store_true", help="print only, write no results file")
    p.add_argument("--cases", nargs="*", default=None, help="case names to run (default: all)")
    return p


def finish_main(args, section_names: Sequence[str], errors: List[str]) -> int:
    """Print the tables, write the files, and return the exit status."""
    secs = [RESULTS[n] for n in section_names if n in RESULTS]
    data = {"device": {"name": device_name(), "kind": DEVICE.type},
            "sections": {s.name: s.to_json() for s in secs if s.rows}}
    print(render_markdown(data))
    if not args.no_write:
        out_dir = args.out_dir
        if out_dir is None and getattr(args, "update_results", False):
            out_dir = RESULTS_DIR
        j, m = write_results(secs, out_dir)
        print(f"results written to {j} and {m}")
    for e in errors:
        print(f"ERROR: {e}", file=sys.stderr)
    return 1 if errors else 0
