"""The UCI digits data path, its judge, ``--preset digits`` and a smoke run of ``benchmarks.quality``."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn", reason="scikit-learn is not installed (the [test] or [digits] extra)")

from edt import digits as D  # noqa: E402
from edt import train  # noqa: E402
from edt.data import LatentFolder  # noqa: E402
from edt.utils import build_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `benchmarks` is a package at the repository root
    sys.path.insert(0, str(REPO))

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private cache folder, and a judge trained for one epoch (the test needs a judge, not a good one)."""
    monkeypatch.setenv("EDT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(D, "JUDGE_EPOCHS", 1)
    return tmp_path / "cache"


def test_split_is_fixed_by_seed_disjoint_and_scaled():
    a, b, c = D.load_digits_split(0), D.load_digits_split(0), D.load_digits_split(1)
    assert a["train_x"].shape == (1438, 1, 16, 16) and a["test_x"].shape == (359, 1, 16, 16)
    assert torch.equal(a["test_x"], b["test_x"]) and not torch.equal(a["test_y"], c["test_y"])
    assert a["train_x"].min() == -1 and a["train_x"].max() == 1
    counts = torch.bincount(a["test_y"], minlength=10).float() / torch.bincount(
        torch.cat([a["train_y"], a["test_y"]]), minlength=10).float()
    assert ((counts - D.HELDOUT_FRACTION).abs() < 0.01).all()
    # no image is in both splits
    flat_train = {x.numpy().tobytes() for x in a["train_x"]}
    assert sum(x.numpy().tobytes() in flat_train for x in a["test_x"]) < 5  # the digits hold a few duplicates


def test_folder_is_read_by_the_training_loader(cache):
    path = D.prepare_digits_folder("train")
    ds = LatentFolder(path, (1, 16, 16), 10)
    assert ds.validate(check_values=True) == [] and len(ds) == 1438
    x, y = ds[5]
    assert torch.equal(x, D.load_digits_split(0)["train_x"][5]) and int(y) == int(D.load_digits_split(0)["train_y"][5])
    assert D.prepare_digits_folder("train") == path  # reused
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left
    with pytest.raises(ValueError, match="split"):
        D.prepare_digits_folder("val")


def test_matched_models_fit_the_digits():
    sizes = {}
    for key, (name, kwargs) in D.DIGITS_MODELS.items():
        model = build_model(name, input_size=D.DIGITS_SIZE, num_classes=10, **kwargs)
        sizes[key] = sum(p.numel() for p in model.parameters())
        out = model(torch.zeros(2, 1, 16, 16), torch.tensor([1, 500]), torch.tensor([3, 10]))
        assert out.shape == (2, 2, 16, 16)
    assert abs(sizes["EDT"] / sizes["MDTv2"] - 1) < 0.10, sizes


def test_preset_digits(cache):
    args = train.parse_args(["--preset", "digits"])
    assert not args.synthetic and Path(args.data_path) == D.prepare_digits_folder("train")
    assert args.image_size // train.VAE_DOWNSAMPLE == D.DIGITS_SIZE and args.model_kwargs["in_channels"] == 1
    assert args.recipe == "edt" and args.optimizer == "adan" and args.schedule_sampler == "loss-second-moment"


def test_judge_is_cached_and_fd_uses_the_fid_code(cache, monkeypatch):
    data = D.load_digits_split(0)
    judge = D.load_judge(0, data=data)
    files = list((cache / "digits-judge").glob("*.pt"))
    assert len(files) == 1 and files[0].name.startswith("seed0-")

    def refuse(*a, **k):
        raise AssertionError("the cached judge was trained again")

    monkeypatch.setattr(D, "train_judge", refuse)
    again = D.load_judge(0)
    for p, q in zip(judge.parameters(), again.parameters()):
        assert torch.equal(p, q)
    x = data["test_x"][:60]
    assert D.fd_digits(judge, x, x) == pytest.approx(0.0, abs=1e-6)
    assert D.fd_digits(judge, x, data["train_x"][:60]) > 0
    report = D.judge_report(judge, data, n=100)
    assert report["fd_real_n_min"] <= report["fd_real_n"] <= report["fd_real_n_max"] and report["n_real"] == 100
    assert report["fd_real_n_min"] > 0
    with pytest.raises(ValueError, match="n must be"):
        D.judge_report(judge, data, n=1)
    acc = D.class_accuracy(judge, x, data["test_y"][:60])
    assert 0.0 <= acc <= 1.0
    with pytest.raises(ValueError, match="shape"):
        judge.features(torch.zeros(2, 3, 16, 16))


def test_time_to_reach_interpolates():
    from benchmarks.quality import time_to_reach

    evals = [{"seconds": 10, "fd": 100.0}, {"seconds": 20, "fd": 50.0}, {"seconds": 30, "fd": 10.0}]
    assert time_to_reach(evals, 75.0) == pytest.approx(15.0)
    assert time_to_reach(evals, 200.0) == 10
    assert time_to_reach(evals, 5.0) is None


def test_speedup_is_a_lower_bound_when_edt_starts_below_the_target():
    from benchmarks.quality import speedups

    def run(model, *points):
        return {"model": model, "seed": 0, "evals": [{"seconds": s, "fd": f} for s, f in points]}

    mdt = run("MDTv2", (10, 300.0), (20, 150.0))
    early = speedups([run("EDT", (10, 100.0), (20, 50.0)), mdt])
    assert early["per_seed"][0]["speedup"] == pytest.approx(2.0) and early["per_seed"][0]["speedup_is_lower_bound"]
    assert early["lower_bounds"] == 1
    crossing = speedups([run("EDT", (10, 200.0), (20, 50.0)), mdt])
    assert crossing["per_seed"][0]["speedup"] == pytest.approx(1.5)
    assert not crossing["per_seed"][0]["speedup_is_lower_bound"] and crossing["lower_bounds"] == 0
    # three seeds, the largest speed-up a bound: the median and the minimum stand, the maximum is a bound
    def seeds(*edts):
        return [dict(r, seed=k) for k, e in enumerate(edts) for r in (e, mdt)]

    crossing, late = run("EDT", (10, 200.0), (20, 50.0)), run("EDT", (10, 250.0), (20, 50.0))
    s = speedups(seeds(crossing, run("EDT", (5, 100.0)), late))
    assert [s["per_seed"][k]["speedup"] for k in range(3)] == [pytest.approx(v) for v in (1.5, 4.0, 20 / 15)]
    assert s["median"] == pytest.approx(1.5) and not s["median_is_lower_bound"]
    assert not s["min_is_lower_bound"] and s["max_is_lower_bound"] and s["lower_bounds"] == 1
    # the bound the smallest (EDT at 20 s at the latest): it moves every summary
    s = speedups(seeds(crossing, run("EDT", (20, 100.0)), late))
    assert s["per_seed"][1]["speedup"] == pytest.approx(1.0) and s["per_seed"][1]["speedup_is_lower_bound"]
    assert s["median_is_lower_bound"] and s["min_is_lower_bound"] and s["max_is_lower_bound"]


def test_speedup_range_comes_from_the_bracket_around_the_crossing():
    from benchmarks.quality import speedups

    edt = {"model": "EDT", "seed": 0, "evals": [{"seconds": 40, "fd": 100.0}, {"seconds": 80, "fd": 50.0}],
           "probes": [{"seconds": 10, "fd": 300.0}, {"seconds": 20, "fd": 100.0}, {"seconds": 30}]}
    mdt = {"model": "MDTv2", "seed": 0, "evals": [{"seconds": 40, "fd": 190.0}, {"seconds": 80, "fd": 200.0}]}
    v = speedups([edt, mdt])["per_seed"][0]
    # MDTv2 first reached its final FD at 40 s; EDT between its probes at 10 s (300) and 20 s (100)
    assert v["mdtv2_seconds"] == 40 and v["edt_bracket"] == [10, 20]
    assert v["edt_seconds_to_reach"] == pytest.approx(15.0) and v["speedup"] == pytest.approx(40 / 15)
    assert v["speedup_range"] == [pytest.approx(2.0), pytest.approx(4.0)] and not v["speedup_is_lower_bound"]


def test_next_probe_bisects_in_log_time():
    from benchmarks.quality import next_probe

    evals = [{"seconds": 80.0, "fd": 50.0}, {"seconds": 160.0, "fd": 20.0}]
    probes = [{"seconds": 10.0 * k} for k in range(1, 8)]
    # the bracket (0, 80]: the earliest point (10 s) stands in for 0; sqrt(10 * 80) = 28 s -> 30 s
    assert probes[next_probe(evals, probes, 100.0)]["seconds"] == 30.0
    probes[2]["fd"] = 150.0  # 30 s is above the target: (30, 80], sqrt(30 * 80) = 49 s -> 50 s
    assert probes[next_probe(evals, probes, 100.0)]["seconds"] == 50.0
    probes[4]["fd"] = 90.0  # (30, 50]: 40 s is the only point left
    assert probes[next_probe(evals, probes, 100.0)]["seconds"] == 40.0
    probes[3]["fd"] = 120.0  # (40, 50]: nothing between
    assert next_probe(evals, probes, 100.0) is None
    assert next_probe(evals, probes, 10.0) is None  # never reached: nothing to bisect


def test_run_all_bisects_to_the_crossing(monkeypatch):
    """The benchmark's bisection rounds, on runs whose FD falls with training time as a known
    curve: every probe lands inside the bracket left by the points before it, and enough
    probes close it to two neighbouring probe points around the true crossing."""
    import argparse

    from benchmarks import quality

    def fd(model, t):
        return (400.0 if model == "EDT" else 900.0) * np.exp(-t / 150.0)

    def fake_train(key, seed, args, data_dir, workdir, probe=False):
        marks = [180.0 * (i + 1) for i in range(args.evals)]
        grid = [22.5 * k + 1.0 for k in range(1, 8 * args.evals) if k % 8] if probe else []
        point = lambda t: {"step": int(t), "seconds": t, "loss": 0.1}  # noqa: E731
        return {"model": key, "seed": seed, "steps_per_second": 1.0, "evals": [point(t) for t in marks],
                "snapshots": [(key, t) for t in marks], "probes": [point(t) for t in grid],
                "probe_snapshots": [(key, t) for t in grid]}

    asked = []

    def fake_evaluate(pool, args, judge, reference, tasks):
        asked.append(sorted(tasks))
        return {k: {"fd": fd(*snap), "class_accuracy": 0.5, "images": torch.zeros(1), "labels": torch.zeros(1),
                    "eval_seconds": 1.0} for k, (snap, seed, speed) in tasks.items()}

    monkeypatch.setattr(quality, "train", fake_train)
    monkeypatch.setattr(quality, "evaluate", fake_evaluate)
    target = fd("MDTv2", 540.0)  # 24.6: EDT crosses it at 150 * ln(400 / 24.6) = 418 s
    crossing = 150.0 * np.log(400.0 / target)
    for probes, width in ((2, None), (6, 22.5)):
        asked.clear()
        args = argparse.Namespace(models=["EDT", "MDTv2"], seeds=[0], evals=3, probes=probes, jobs=1)
        runs = quality.run_all(args, "", None, None, Path("."))
        edt = runs[0]
        assert len(asked) == 1 + min(probes, 3) and all(len(a) == 1 for a in asked[1:])
        v = quality.speedups(runs)["per_seed"][0]
        lo, hi = v["edt_bracket"]
        assert lo < crossing <= hi and v["mdtv2_seconds"] == 540.0
        assert len(edt["probes"]) == min(probes, 3) and edt["probe_points"] == 21
        if width:  # the bisection closed: neighbouring probe points
            assert hi - lo == pytest.approx(width)
        assert not runs[1]["probes"] and runs[1]["probe_points"] == 0


def test_training_keeps_probe_copies_between_the_marks(cache, monkeypatch):
    """``train`` with ``probe``: an EMA copy at the first step past every grid time that is not a
    mark, one per grid time at most; without ``probe`` none."""
    import argparse

    from benchmarks import quality

    clock = {"t": 0.0}
    monkeypatch.setattr(quality.time, "perf_counter", lambda: clock["t"])

    def fake_loop(run):  # 10 steps in 7 fake seconds
        clock["t"] += 7.0
        run.step = run.max_steps
        run.history.append({"loss": 0.5})

    monkeypatch.setattr(quality.T, "train_loop", fake_loop)
    data_dir = str(D.prepare_digits_folder("train", 0))
    args = argparse.Namespace(minutes=2.0, evals=2, batch_size=8, threads=1)  # marks at 60 and 120 s
    r = quality.train("EDT", 0, args, data_dir, Path(cache), probe=True)
    assert [e["seconds"] for e in r["evals"]] == [63.0, 126.0]
    # the grid every 60 / PROBES_PER_MARK = 7.5 s; a chunk ends every 7 s
    grid = 60.0 / quality.PROBES_PER_MARK
    times = [p["seconds"] for p in r["probes"]]
    assert times == sorted(set(times)) and len(r["probe_snapshots"]) == len(times)
    assert len({int(t // grid) for t in times}) == len(times) and not set(times) & {63.0, 126.0}
    expected = [t for t in np.arange(7.0, 126.0, 7.0) if int(t // grid) > int((t - 7.0) // grid) and t != 63.0]
    assert times == pytest.approx(expected)
    assert all(isinstance(s, torch.nn.Module) and not s.training for s in r["probe_snapshots"])
    clock["t"] = 0.0
    plain = quality.train("MDTv2", 0, args, data_dir, Path(cache))
    assert plain["probes"] == [] and plain["probe_snapshots"] == []


def test_quality_smoke(cache, tmp_path, capsys):
    from benchmarks import quality

    out = tmp_path / "out"
    result = quality.main(["--minutes", "0.001", "--evals", "1", "--num-samples", "10", "--sampling-steps", "2",
                           "--batch-size", "8", "--threads", "1", "--out", str(out)])
    saved = json.loads((out / "quality.json").read_text())
    assert [r["model"] for r in saved["runs"]] == ["EDT", "MDTv2"]
    for r in saved["runs"]:
        assert len(r["evals"]) == 1 and r["evals"][0]["step"] == quality.CHUNK_STEPS
        assert np.isfinite(r["evals"][0]["fd"]) and r["optimizer"] == "adan"
    assert saved["runs"][0]["mask_strategy"] == "edt" and saved["runs"][1]["mask_strategy"] == "mdt"
    assert set(saved["claim"]["per_seed"]) == {"0"} and result["judge"]["n_heldout"] == 359
    for name in ("quality.md", "curves.png", "samples-EDT-seed0.png", "samples-MDTv2-seed0.png"):
        assert (out / name).stat().st_size > 0
    # one run after the other in this process, another seed: the same result layout, and the two
    # runs merge into one report over both seeds
    alone = quality.main(["--minutes", "0.001", "--evals", "1", "--num-samples", "10", "--sampling-steps", "2",
                          "--batch-size", "8", "--threads", "1", "--jobs", "1", "--seeds", "1",
                          "--out", str(tmp_path / "alone")])
    assert alone["settings"]["jobs"] == 1 and [r["model"] for r in alone["runs"]] == ["EDT", "MDTv2"]
    assert alone["runs"][0]["evals"][0]["step"] == quality.CHUNK_STEPS
    both = quality.main(["--combine", str(out), str(tmp_path / "alone"), "--out", str(tmp_path / "both")])
    assert set(json.loads((tmp_path / "both" / "quality.json").read_text())["claim"]["per_seed"]) == {"0", "1"}
    assert [(r["model"], r["seed"]) for r in both["runs"]] == [("EDT", 0), ("MDTv2", 0), ("EDT", 1), ("MDTv2", 1)]
    assert "Seeds [1]:" in (tmp_path / "both" / "quality.md").read_text()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        quality.main(["--combine", str(out), str(out), "--out", str(tmp_path / "again")])
    assert e.value.code == 2 and "repeats seed" in capsys.readouterr().err


def test_samples_drawn_in_parts_are_the_samples_drawn_at_once():
    """The benchmark's workers draw an evaluation's chunks in parts: the joined parts are the
    samples (and labels) of one call."""
    from benchmarks import quality
    from edt.models import create_model

    name, kwargs = D.DIGITS_MODELS["EDT"]
    torch.manual_seed(0)
    model = create_model(name, input_size=D.DIGITS_SIZE, num_classes=D.NUM_CLASSES, learn_sigma=True, **kwargs)
    whole, labels = quality.draw_samples(model, 25, 2, 2.0, seed=3, batch=10)
    parts = [quality.draw_samples(model, 25, 2, 2.0, seed=3, batch=10, chunks=c) for c in ((0, 1), (1, 3))]
    assert torch.equal(torch.cat([p[0] for p in parts]), whole) and whole.shape[0] == 25
    assert torch.equal(torch.cat([p[1] for p in parts]), labels)
    assert parts[1][0].shape[0] == 15 and parts[1][1].tolist() == [k % 10 for k in range(10, 25)]


def _children(pid: int):
    """Live (not zombie) processes whose parent is ``pid``, from /proc."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")
def test_quality_workers_end_when_the_benchmark_is_killed(cache, tmp_path):
    """SIGKILL the benchmark while its workers train: no worker is left running or blocked."""
    import os
    import signal
    import subprocess
    import time

    script = ("import sys; from edt import digits as D; D.JUDGE_EPOCHS = 1; from benchmarks import quality; "
              "quality.main(sys.argv[1:])")
    proc = subprocess.Popen([sys.executable, "-c", script, "--minutes", "5", "--evals", "1", "--num-samples", "10",
                             "--sampling-steps", "2", "--batch-size", "8", "--out", str(tmp_path / "out")],
                            cwd=REPO, env=dict(os.environ, EDT_CACHE_DIR=str(cache)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    workers = []
    try:
        started = set()
        deadline = time.monotonic() + 240
        while started != {"EDT", "MDTv2"} and time.monotonic() < deadline:  # the workers' first lines
            line = proc.stdout.readline()
            assert line, "the benchmark ended before its workers started training"
            started |= {m for m in ("EDT", "MDTv2") if line.startswith(f"{m} seed 0:")}
        assert started == {"EDT", "MDTv2"}
        workers += _children(proc.pid)
        assert len(workers) >= 2
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [w for w in workers if _alive(w)]
    finally:
        proc.kill()
        for w in workers:
            if _alive(w):
                os.kill(w, signal.SIGKILL)


def test_quality_bad_input(capsys):
    from benchmarks import quality

    with pytest.raises(SystemExit) as e:
        quality.main(["--minutes", "0"])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: --minutes")
    with pytest.raises(SystemExit) as e:
        quality.main(["--jobs", "0"])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: --jobs")


def test_guidance_covers_a_single_image_channel():
    """edt.sample guides the first 3 output channels of 4-channel latents; a 1-channel model
    has its one image channel guided, not its variance channel."""
    import argparse

    from edt.diffusion import create_diffusion
    from edt.sample import model_steps, sample_chunk

    seen = []

    class Stub(torch.nn.Module):
        def forward(self, x, t, y):
            return torch.zeros(len(x), 2 * x.shape[1], *x.shape[2:])

        def forward_with_cfg(self, x, t, y, cfg_scale, cfg_channels=3):
            seen.append(cfg_channels)
            return self.forward(x, t, y)

    sargs = argparse.Namespace(seed=0, cfg_scale=2.0, ddim=False, eta=0.0, mixed_precision="no")
    for channels, expected in ((1, 1), (4, 3)):
        seen.clear()
        steps = model_steps(Stub(), "none", torch.device("cpu"))
        sample_chunk(steps, create_diffusion("2"), lambda z: z, sargs, torch.tensor([0, 1]), 0, channels, 4, 10,
                     torch.device("cpu"))
        assert seen and set(seen) == {expected}
