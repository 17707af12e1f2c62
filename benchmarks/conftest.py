"""pytest set-up for ``pytest benchmarks/ --benchmark-only``.

* The header says which device runs and, on a CPU-only machine, that the shapes
  are small and the figures are not the GPU targets.
* At the end of the session every row recorded by the benchmark modules goes
  into ``benchmarks/results/local/<device-slug>.json`` and ``.md`` (untracked;
  merged by section with what is already there), the tables are printed, and
  the models chart is drawn when matplotlib is installed.  ``--update-results``
  (or ``EDT_BENCH_UPDATE=1``) writes the committed ``benchmarks/results/`` instead.
* A run on a busy machine (see ``benchmarks.harness.busy_reasons``) is marked
  "busy machine: ratios unreliable" in every table it writes and prints.

Unlike ``tests/conftest.py`` this does not set ``TRITON_INTERPRET``: timing
Triton's interpreter would mean nothing, so on the CPU the kernels run on the
compiled C++ or PyTorch paths.
"""
from __future__ import annotations

import os

from benchmarks import harness as U

_WRITTEN = []


def pytest_addoption(parser):
    parser.addoption("--update-results", action="store_true", default=False,
                     help=f"write the committed results in {U.RESULTS_DIR} (default: {U.LOCAL_RESULTS_DIR})")


def pytest_configure(config):
    if config.getoption("update_results", default=False):
        os.environ[U.UPDATE_ENV] = "1"
    U.start_run()


def pytest_report_header(config):
    lines = [f"edt-kernels benchmarks on {U.device_name()} (shapes: {U.SHAPES})"]
    if U.DEVICE.type == "cpu":
        lines.append("NO GPU: " + U.CPU_NOTE)
    busy = U.busy_warning()
    if busy:
        lines.append("WARNING: " + busy)
    return lines


def _benchmarks_disabled(config) -> bool:
    try:
        return bool(config.getoption("benchmark_disable"))
    except ValueError:
        return False


def pytest_sessionfinish(session, exitstatus):
    if _benchmarks_disabled(session.config) or not any(s.rows for s in U.RESULTS.values()):
        return
    json_path, md_path = U.write_results()
    _WRITTEN[:] = [json_path, md_path]
    try:
        from benchmarks import plot_results

        png, why = plot_results.plot(json_path)
        _WRITTEN.append(png if png is not None else f"(no chart: {why})")
    except ImportError as exc:  # pragma: no cover - plot module missing
        _WRITTEN.append(f"(no chart: {exc})")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _WRITTEN:
        return
    tr = terminalreporter
    tr.section("edt-kernels benchmark results")
    for sec in U.RESULTS.values():
        if not sec.rows:
            continue
        data = sec.to_json()
        tr.write_line(f"## {data['title']}")
        for table in data["tables"]:
            tr.write_line(f"### {table['title']}")
            if data["run"].get("busy"):
                tr.write_line(U.busy_note(data["run"]["busy"]))
            for line in U.markdown_table(table["columns"], table["rows"]).splitlines():
                tr.write_line(line)
        tr.write_line("")
    if U.DEVICE.type == "cpu":
        tr.write_line("NOTE: " + U.CPU_NOTE)
    for p in _WRITTEN:
        tr.write_line(f"written: {p}")
