"""benchmarks.gpu_check --dry-run: the one-shot GPU check's code path on the CPU (interpreter, tiny shapes)."""
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out", str(tmp_path)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert data["info"]["dry_run"] is True and "device" in data["info"] and "commit" in data["info"]
    assert (tmp_path / "gpu_check.md").is_file()
    secs = data["sections"]
    for name in ("correctness: attention", "correctness: token/adaLN", "timing: attention forward",
                 "timing: attention backward", "timing: MDT masked", "timing: token/adaLN bandwidth"):
        assert not secs[name].get("error"), (name, secs[name].get("traceback"))
        assert secs[name]["rows"], name
    rows = secs["correctness: attention"]["rows"]
    assert {r["tensor"] for r in rows} >= {"out", "dqkv", "dtable", "dbias"}
    assert all(r["ok"] for r in rows + secs["correctness: token/adaLN"]["rows"]), rows
    # models are another module's: an error there is recorded as text, never as a number
    m = secs["timing: models"]
    assert m.get("error") or all(r["ms"] > 0 for r in m["rows"])
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
