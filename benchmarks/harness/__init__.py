"""Shared benchmark machinery, one module per concern: ``device`` (device, shape set,
names), ``machine`` (run information, busy machine), ``timing``, ``memory``, ``rates``
(FLOP formula, copy bandwidth), ``results`` (sections and the results files) and ``cli``
(the ``main`` of every benchmark module).  Importing it measures nothing and changes no
setting: a run starts at :func:`start_run` (pytest's session start, a ``main``'s
argument parsing), which applies ``EDT_BENCH_THREADS`` and takes the machine snapshot
the busy-machine check compares against.

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

from .cli import base_parser, finish_main, parse_main_args  # noqa: F401
from .device import (CPU_NOTE, DEVICE, IS_CUDA, SHAPES, SMALL, configure_compile, cpu_name, default_dtype,  # noqa: F401
                     device_name, device_slug, slugify, synchronize)
from .machine import (BUSY_MARK, REPO_ROOT, busy_note, busy_reasons, busy_warning, git_commit, load_average, machine_load_since,  # noqa: F401
                      machine_snapshot, run_info, run_start, start_run)
from .memory import cpu_peak_method, memory_note, peak_memory, tensor_bytes  # noqa: F401
from .rates import attention_flops, copy_bandwidth  # noqa: F401
from .results import (LOCAL_RESULTS_DIR, RESULTS, RESULTS_DIR, UPDATE_ENV, Section, default_results_dir,  # noqa: F401
                      markdown_table, record, render_markdown, section, update_requested, write_results)
from .timing import Timing, measure, rotations  # noqa: F401
