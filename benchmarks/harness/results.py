"""Results files: sections of rows, merged by section into ``<device-slug>.json`` and
rendered to ``.md``, in ``benchmarks/results/local/`` (untracked) or, when asked, the
committed ``benchmarks/results/``."""
from __future__ import annotations

import json
import math
import os
import pathlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from . import machine, rates
from .device import CPU_NOTE, DEVICE, device_name, device_slug
from .machine import BUSY_MARK, busy_note, busy_reasons, run_info, run_start

__all__ = ["RESULTS_DIR", "LOCAL_RESULTS_DIR", "UPDATE_ENV", "update_requested", "default_results_dir",
           "Section", "RESULTS", "section", "record", "markdown_table", "render_markdown", "write_results"]

RESULTS_DIR = pathlib.Path(__file__).resolve().parents[1] / "results"  # committed results
LOCAL_RESULTS_DIR = RESULTS_DIR / "local"  # untracked (.gitignore): where a plain run writes
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
        load = machine.machine_load_since(run_start())
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
            "method in `benchmarks/harness/`. Times are medians of rotated, warmed-up calls.", ""]
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
                      "copy_bandwidth_GBps": rates.copy_bandwidth()}
    data.setdefault("sections", {})
    for sec in sections:
        if sec.rows:
            data["sections"][sec.name] = sec.to_json()
    data["sections"] = dict(sorted(data["sections"].items()))
    jpath.write_text(json.dumps(data, indent=1, default=str) + "\n")
    mpath.write_text(render_markdown(data))
    return jpath, mpath
