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
    # the compiled-steps section: eager and compiled rows for EDT-S and MDTv2-S, none an error
    steps = secs["timing: compiled steps"]
    assert not steps.get("error") and not any("error" in r for r in steps["rows"]), steps
    assert {(r["model"], r["mode"]) for r in steps["rows"]} == {
        (m, mode) for m in ("EDT-S/2", "MDTv2-S/2") for mode in ("none", "default")}
    assert all(r["cudagraph_skips"] is None for r in steps["rows"])  # counted for reduce-overhead only
    assert proc.returncode in (0, 1), proc.stderr[-3000:]


def test_dry_run_where_the_interpreter_cannot_run_states_why_once(tmp_path):
    """triton 3.6 with numpy >= 2.4 (the GPU machines' software, simulated by the versions the
    package metadata reports): one error line with the reason, exit 2, nothing written."""
    code = (
        "import sys\n"
        "from importlib import metadata\n"
        "real = metadata.version\n"
        "metadata.version = lambda name: {'triton': '3.6.0', 'numpy': '2.5.0'}.get(name) or real(name)\n"
        "from benchmarks import gpu_check\n"
        "sys.exit(gpu_check.main(sys.argv[1:]))\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code, "--dry-run", "--out", str(tmp_path / "out")], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the Triton kernels cannot run here (--dry-run"), lines
    assert "numpy<2.4" in lines[0]
    assert not (tmp_path / "out").exists()


def test_results_are_on_disk_after_every_section(tmp_path):
    """A run cut short (a device call's time limit) keeps every finished section, and the rows of the
    one it was in, marked unfinished; the files are replaced whole."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import gpu_check

    c = gpu_check.Ctx(True, 60.0, tmp_path)
    c.section("first", 10, lambda rows, deadline: rows.append(dict(x=1)))
    assert json.loads((tmp_path / "gpu_check.json").read_text())["sections"]["first"]["rows"] == [{"x": 1}]
    seen = {}

    def inner(rows, deadline):
        rows.append(dict(y=2))
        c.flush()  # what a kill right here would leave
        seen.update(json.loads((tmp_path / "gpu_check.json").read_text())["sections"])

    c.section("second", 10, inner)
    assert seen["first"]["rows"] == [{"x": 1}]
    assert seen["second"]["rows"] == [{"y": 2}] and seen["second"]["error"].startswith("unfinished")
    final = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]["second"]
    assert final["rows"] == [{"y": 2}] and "error" not in final
    assert "second" in (tmp_path / "gpu_check.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.json", "gpu_check.md"]


def test_parts_runs_only_the_chosen_sections(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--parts", "correctness",
                           "--out", str(tmp_path)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    secs = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]
    assert set(secs) == {"correctness: attention", "correctness: token/adaLN"}
    assert all(r["ok"] for s in secs.values() for r in s["rows"])
    bad = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--parts", "speed",
                          "--out", str(tmp_path / "x")], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "--parts" in bad.stderr and not (tmp_path / "x").exists()
