"""Bar chart of the EDT/MDTv2 speed-ups measured vs the paper's.

    python -m benchmarks.plot_results benchmarks/results/<device>.json

Reads the ``models`` section of a results file and writes ``<device>-models.png``
beside it.  Needs matplotlib (optional: ``pip install matplotlib``); without it
the chart is skipped with a message and the tables stay the record.
"""
from __future__ import annotations

import json
import pathlib
import sys
from typing import Optional, Tuple


def plot(json_path, out_path=None) -> Tuple[Optional[pathlib.Path], str]:
    """Draw the chart; returns ``(path, "")`` or ``(None, why not)``."""
    json_path = pathlib.Path(json_path)
    data = json.loads(json_path.read_text())
    sec = data.get("sections", {}).get("models")
    if not sec:
        return None, "no models section in the results"
    table = next((t for t in sec.get("tables", []) if t.get("kind") == "ratios"), None)
    if table is None or not table.get("rows"):
        return None, "no EDT/MDTv2 ratio table in the models section"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None, "matplotlib is not installed (pip install matplotlib to draw it)"
    rows = table["rows"]
    series = [("paper", "paper"), ("eager", "measured, eager"), ("kernels", "measured, edt_kernels")]
    labels = [f"{r['size']} {r['metric']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows)), 4))
    width = 0.8 / len(series)
    for i, (key, name) in enumerate(series):
        vals = [r.get(key) if isinstance(r.get(key), (int, float)) else 0.0 for r in rows]
        ax.bar([x + (i - 1) * width for x in range(len(rows))], vals, width, label=name)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, rotation=30, ha="right")
    ax.set_ylabel("EDT / MDTv2 speed-up (x)")
    dev = data.get("device", {})
    title = f"EDT vs MDTv2 speed-up: {dev.get('name', '?')}"
    if dev.get("kind") == "cpu":
        title += "\n(CPU, reduced sizes: not comparable with the paper's GPU numbers)"
    if sec.get("run", {}).get("busy"):
        title += "\nbusy machine: ratios unreliable"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = pathlib.Path(out_path) if out_path else json_path.with_name(json_path.stem + "-models.png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out, ""


def main(argv=None) -> int:
    import argparse

    from benchmarks import harness as U

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", nargs="?", default=str(U.default_results_dir() / f"{U.device_slug()}.json"))
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    path, why = plot(args.json, args.out)
    if path is None:
        print(f"no chart: {why}")
        return 0
    print(f"chart written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
