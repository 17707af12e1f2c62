"""Smoke test of ``benchmarks/``: every benchmark's core function runs on tiny
shapes, its peers compute the same function, and the results writer merges by
section, so that ``pytest benchmarks/ --benchmark-only`` cannot rot unnoticed.

Timings here mean nothing (one call, no warm-up); what is checked is that the
code paths run, that every implementation agrees with the reference on what it
claims to compute, and that the numbers and files have the promised shape.
"""
import json
import math
import pathlib
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `benchmarks` is a package at the repository root
    sys.path.insert(0, str(ROOT))

from benchmarks import _membound as MB  # noqa: E402
from benchmarks import harness as U  # noqa: E402
from benchmarks import plot_results  # noqa: E402
from benchmarks import test_bench_adaln as BA  # noqa: E402
from benchmarks import test_bench_attention as BATT  # noqa: E402
from benchmarks import test_bench_cpu_attention as BCPU  # noqa: E402
from benchmarks import test_bench_models as BM  # noqa: E402
from benchmarks import test_bench_tokens as BT  # noqa: E402

CPU = torch.device("cpu")
FAST = dict(warmup=0, repeats=1, n_sets=1, record=False)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny shapes gain nothing from threads, and on a busy 2-core machine an
    OpenMP barrier across an oversubscribed core costs more than the op."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- utils

def test_timing_and_rates():
    t = U.Timing([3.0, 1.0, 2.0, 10.0])
    assert t.median == 2.5 and t.min == 1.0
    assert U.attention_flops(2, 3, 4, 5, "fwd") == 4 * 2 * 3 * 16 * 5
    assert U.attention_flops(2, 3, 4, 5, "fwd+bwd") == 3.5 * 4 * 2 * 3 * 16 * 5
    with pytest.raises(ValueError, match="mode"):
        U.attention_flops(1, 1, 1, 1, "bwd")
    assert 2 <= U.rotations(1, CPU) <= 8 and U.rotations(1 << 40, CPU) == 2
    calls = []
    timing = U.measure(lambda a: calls.append(a), [(0,), (1,), (2,)], warmup=2, repeats=4, device=CPU)
    assert calls == [0, 1, 2, 0, 1, 2]  # rotated, warm-up calls first
    assert len(timing.times) == 4 and all(x >= 0 for x in timing.times)
    assert U.slugify("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_peak_memory_sees_torch_allocations():
    peak = U.peak_memory(lambda: torch.ones(8 << 20), (), CPU)  # 32 MiB, touched
    if U.cpu_peak_method() is None:
        assert peak is None
    else:
        assert peak >= 24 << 20


def test_results_merge_by_section(tmp_path, monkeypatch):
    monkeypatch.setattr(U.rates, "copy_bandwidth", lambda device=U.DEVICE: 12.5)
    cols = [("a", "A"), ("b", "B")]
    s1 = U.Section("one", "Section one", cols, ["note one"], rows=[{"a": 1, "b": 2.5}])
    s2 = U.Section("two", "Section two", cols, rows=[{"a": "x", "b": None}])
    j, m = U.write_results([s1, s2], tmp_path)
    assert j.name == f"{U.device_slug()}.json" and m.suffix == ".md"
    s1b = U.Section("one", "Section one", cols, rows=[{"a": 7, "b": 8.0}])
    U.write_results([s1b], tmp_path)
    data = json.loads(j.read_text())
    assert set(data["sections"]) == {"one", "two"}
    assert data["sections"]["one"]["rows"] == [{"a": 7, "b": 8.0}]  # replaced
    assert data["sections"]["two"]["rows"] == [{"a": "x", "b": None}]  # kept
    run = data["sections"]["one"]["run"]
    assert {"date", "git_commit", "torch", "triton", "device", "shapes"} <= set(run)
    md = m.read_text()
    assert U.device_name() in md and "| A | B |" in md and "| x | n/a |" in md
    if U.DEVICE.type == "cpu":
        assert "CPU-only run" in md
    png, why = plot_results.plot(j)
    assert png is None and "models" in why  # no models section in this file


# ----------------------------------------------------------------------------- where results go, busy runs

def test_results_go_to_the_untracked_folder_unless_an_update_is_asked(tmp_path, monkeypatch):
    monkeypatch.delenv(U.UPDATE_ENV, raising=False)
    assert U.default_results_dir() == U.LOCAL_RESULTS_DIR == U.RESULTS_DIR / "local"
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert "/benchmarks/results/local/" in ignored
    monkeypatch.setenv(U.UPDATE_ENV, "1")
    assert U.default_results_dir() == U.RESULTS_DIR
    monkeypatch.setenv(U.UPDATE_ENV, "maybe")
    with pytest.raises(ValueError, match=U.UPDATE_ENV):
        U.default_results_dir()
    # write_results() and main() without --out-dir: the default folder (redirected to tmp here)
    monkeypatch.delenv(U.UPDATE_ENV)
    monkeypatch.setattr(U.rates, "copy_bandwidth", lambda device=U.DEVICE: 12.5)
    monkeypatch.setattr(U.results, "LOCAL_RESULTS_DIR", tmp_path / "local")
    monkeypatch.setattr(U.results, "RESULTS_DIR", tmp_path / "committed")
    sec = U.Section("one", "Section one", [("a", "A")], rows=[{"a": 1}])
    j, _ = U.write_results([sec])
    assert j.parent == tmp_path / "local"
    args = U.base_parser("t").parse_args(["--update-results"])
    U.finish_main(args, [], [])  # nothing recorded: the files are still written where asked
    assert (tmp_path / "committed" / j.name).exists()
    monkeypatch.setenv(U.UPDATE_ENV, "1")
    j2, _ = U.write_results([sec])
    assert j2.parent == tmp_path / "committed"


def _snap(busy, steal, total, own, load1=0.1, cores=2):
    return {"stat": (busy, steal, total), "own": own, "load1": load1, "cores": cores}


def test_busy_reasons():
    quiet = U.machine_load_since(_snap(0, 0, 0, 0), _snap(90, 0, 100, 80))  # others: 10%
    assert abs(quiet["others_share"] - 0.10) < 1e-9 and U.busy_reasons(quiet, [0.05, 0.1]) == []
    others = U.machine_load_since(_snap(0, 0, 0, 0), _snap(90, 0, 100, 40))  # others: 50%
    assert any("other processes used 50%" in w for w in U.busy_reasons(others))
    steal = U.machine_load_since(_snap(0, 0, 0, 0), _snap(50, 10, 100, 50))
    assert any("steal 10%" in w for w in U.busy_reasons(steal))
    loaded = U.machine_load_since(_snap(0, 0, 0, 0, load1=3.0), _snap(50, 0, 100, 50))
    assert any("load average 3.0 on 2 cores" in w for w in U.busy_reasons(loaded))
    assert any("noisy timings" in w for w in U.busy_reasons(quiet, [0.3, 0.5, 0.1]))
    assert U.busy_reasons({"others_share": None, "steal_share": None, "load1_at_start": None}) == []


@pytest.mark.parametrize("busy", [False, True], ids=["quiet", "busy"])
def test_busy_run_is_marked_in_every_table(tmp_path, monkeypatch, busy):
    monkeypatch.setattr(U.rates, "copy_bandwidth", lambda device=U.DEVICE: 12.5)
    share = 0.6 if busy else 0.0
    monkeypatch.setattr(U.machine, "machine_load_since", lambda start, now=None: {
        "others_share": share, "steal_share": 0.0, "load1_at_start": 0.0, "cores": 2})
    tables = [{"title": f"ratios {i}", "kind": "ratios", "notes": ["n"], "columns": [["x", "X"]],
               "rows": [{"x": 1.0, "size": "S", "metric": "train", "paper": 3.9, "eager": 1, "kernels": 2}]}
              for i in range(2)]
    sec = U.Section("models", "Models", [("x", "X"), ("spread", "spread")],
                    rows=[{"x": 1.0, "spread": 0.01}], summarize=lambda s: tables)
    j, m = U.write_results([sec], tmp_path)
    data = json.loads(j.read_text())["sections"]["models"]
    md = m.read_text()
    n_tables = 3  # two summary tables and "All measurements"
    if busy:
        assert data["run"]["busy"] and all(U.BUSY_MARK in t["notes"][0] for t in data["tables"])
        assert md.count(U.BUSY_MARK) == n_tables and "other processes used 60%" in md
    else:
        assert data["run"]["busy"] == [] and U.BUSY_MARK not in md


# ----------------------------------------------------------------------------- attention

TINY_ATTN = [
    BATT.AttnCase("t-table", 2, 2, 16, 8, 4),
    BATT.AttnCase("t-table-amm", 2, 2, 16, 8, 4, amm=True),
    BATT.AttnCase("t-masked", 2, 2, 10, 8, 4, extra_rows=3, masked=True),
    BATT.AttnCase("t-amm-only", 1, 2, 16, 8, 4, table=False, amm=True),
]


@pytest.mark.parametrize("case", TINY_ATTN, ids=lambda c: c.name)
def test_attention_peers_agree(case, monkeypatch, kernels_env):
    kernels_env("EDT_KERNELS_BACKEND", "torch")  # no extension build inside this smoke test
    for mode in case.modes:
        for impl in BATT.IMPLS:
            kw = dict(FAST, compiled=False, device=CPU, dtype=torch.float32)
            if impl == "sdpa_mask" and not case.table or impl == "flex" and mode == "fwd+bwd":
                with pytest.raises(BATT.NotApplicable):
                    BATT.run_one(case, impl, mode, **kw)
                continue
            row = BATT.run_one(case, impl, mode, **kw)
            assert row["rel_err"] < 1e-5, (case.name, mode, impl, row)
            assert row["ms"] > 0 and row["tflops"] > 0 and math.isfinite(row["tflops"])
            if U.cpu_peak_method() is not None:
                assert row["mem_mib"] is not None


def test_flex_compiled_amm_is_refused_on_cpu():
    case = TINY_ATTN[1]
    prob = BATT.make_problem(case, "fwd", device=CPU, dtype=torch.float32, n_sets=1)
    with pytest.raises(BATT.NotApplicable, match="LSE"):
        BATT.build_impl("flex", prob, compiled=True)


def test_published_eager_path_matches_reference_float64():
    g = torch.Generator().manual_seed(0)
    B, H, N, D, n = 2, 3, 11, 8, 4
    q, k, v = (torch.randn(B, H, N, D, generator=g, dtype=torch.float64) for _ in range(3))
    table = torch.randn((2 * n - 1) ** 2 + 3, H, generator=g, dtype=torch.float64)
    pos = torch.stack([torch.randperm(n * n, generator=g)[:N] for _ in range(B)])
    case = BATT.AttnCase("t-eager", B, H, N, D, n, extra_rows=3, masked=True, amm=True)
    out = BATT.published_eager(case, table, pos)(q, k, v)
    import edt_kernels

    ref = edt_kernels.reference_attention(q, k, v, rel_pos_bias=table, grid=n, positions=pos, amm=True)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)


def test_attention_summary_and_targets():
    rows = [{"case": "edt-xl-s0", "mode": "fwd", "impl": "edt_kernels", "ms": 1.0, "tflops": 10.0,
             "label": "amm_attention[triton]"},
            {"case": "edt-xl-s0", "mode": "fwd", "impl": "eager", "ms": 4.0},
            {"case": "edt-xl-s0", "mode": "fwd", "impl": "flex", "ms": 1.2}]
    sec = U.Section("attention", "t", BATT.COLUMNS, rows=rows)
    pivot, targets = BATT.summarize(sec)
    assert pivot["rows"][0]["eager"] == 4.0 and pivot["rows"][0]["flex"] == pytest.approx(1.2)
    met = {r["target"]: r["met"] for r in targets["rows"]}
    assert met["edt-xl-s0 fwd >= 3x eager"] is True
    assert met["edt-xl-s0 fwd >= 1.5x flex"] is False
    assert met["long-4096 fwd table+AMM >= 300 TFLOP/s"] is None  # not measured


def test_attention_main_runs(tmp_path, monkeypatch, kernels_env, capsys):
    kernels_env("EDT_KERNELS_BACKEND", "torch")
    monkeypatch.setattr(BATT, "CASE_BY_NAME", {c.name: c for c in TINY_ATTN})
    monkeypatch.setattr(U.results, "RESULTS", {})
    monkeypatch.setattr(U.rates, "copy_bandwidth", lambda device=U.DEVICE: 12.5)
    rc = BATT.main(["--cases", "t-table", "--impls", "edt_kernels", "eager", "--modes", "fwd",
                    "--warmup", "0", "--repeats", "1", "--out-dir", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / f"{U.device_slug()}.json").read_text())
    rows = data["sections"]["attention"]["rows"]
    assert {r["impl"] for r in rows} == {"edt_kernels", "eager"}
    assert "edt_kernels speed-up" in capsys.readouterr().out


# ----------------------------------------------------------------------------- tokens / adaLN

@pytest.mark.parametrize("module", [BT, BA], ids=["tokens", "adaln"])
def test_membound_ops_run_and_agree(module):
    for spec in module.specs(B=2, tiny=True):
        for mode in spec.modes:
            for impl in ("edt_kernels", "eager"):
                row = MB.run_one(spec, impl, mode, module.SECTION, device=CPU, dtype=torch.float32, **FAST)
                assert row["rel_err"] < 1e-5, (spec.name, mode, impl, row)
                assert row["GBps"] > 0 and row["bytes"] > 0 and row["pct_copy"] > 0


def test_membound_compiled_column():
    spec = next(s for s in BA.specs(B=2, tiny=True) if s.op == "gated_residual")
    row = MB.run_one(spec, "compiled", "fwd", BA.SECTION, device=CPU, dtype=torch.float32, **FAST)
    assert row["rel_err"] < 1e-6 and row["path"] == "torch.compile"


# ----------------------------------------------------------------------------- C++ CPU attention

def test_cpu_attention_bench():
    case = BATT.AttnCase("t-masked", 2, 2, 10, 8, 4, extra_rows=3, masked=True)
    row = BCPU.run_one(case, "torch", "fwd+bwd", **FAST)
    assert row["rel_err"] < 1e-6 and row["ms"] > 0
    why = BCPU.cpp_unavailable_reason()
    if why is None:
        row = BCPU.run_one(case, "cpp", "fwd+bwd", **FAST)
        assert row["rel_err"] < 1e-5
    else:
        with pytest.raises(BATT.NotApplicable):
            BCPU.run_one(case, "cpp", "fwd", **FAST)
    # main()'s interleaved timing and the per-target summary
    res = BCPU.run_interleaved(case, "fwd+bwd", ["torch", "sdpa"], warmup=0, repeats=2, rounds=2, record=False,
                               n_sets=1)
    assert all(res[i]["ms"] > 0 and len(res[i]) > 0 for i in ("torch", "sdpa"))
    sec = U.Section("cpu_attention", "t", BCPU.COLUMNS, rows=[res["torch"], res["sdpa"]])
    (table,) = BCPU.summarize(sec)
    (summary,) = table["rows"]
    assert summary["fwd_sdpa_met"] == "n/a" and summary["met"] is False  # no fwd / cpp rows here
    # % of sgemm: against the median sgemm of the same rounds, the run's best shown beside it
    r = res["torch"]
    assert r["sgemm_window"] > 0
    assert r["sgemm_pct"] == pytest.approx(100.0 * r["gflops"] / r["sgemm_window"])
    assert r["sgemm_best_pct"] == pytest.approx(100.0 * r["gflops"] / BCPU.sgemm_gflops())


# ----------------------------------------------------------------------------- models

EDT_TINY = dict(input_size=8, hidden_size=16, dims=(16, 24, 32, 24, 16), num_heads=(2, 2, 2, 2, 2),
                stages_depth=(1, 1, 1, 1, 1), depth=5, amm_blocks=(4,), num_classes=10)
MDT_TINY = dict(input_size=8, hidden_size=16, depth=4, num_heads=2, decode_layer=2, num_classes=10)


def test_models_bench_runs_and_summarizes(monkeypatch, kernels_env):
    kernels_env("EDT_KERNELS_BACKEND", "torch")
    rows = []
    for col in BM.columns(compile_=False):
        ov = EDT_TINY if col.family == "EDT" else MDT_TINY
        for metric in BM.METRICS:
            row = BM.run_one("S", metric, col, warmup=0, repeats=1, overrides=ov, sample_steps=2,
                             record=False, device=CPU)
            assert row["images_per_s"] > 0 and row["params_M"] > 0
            assert row["gflops_authors"] > 0 and row["gflops_measured"] > 0
            rows.append(row)
    BM._CACHE.clear()
    sec = U.Section("models", "t", BM.ROW_COLUMNS, rows=rows)
    ratios, gains, models = BM.summarize(sec)
    assert ratios["kind"] == "ratios" and len(ratios["rows"]) == 3
    for r in ratios["rows"]:
        assert r["paper"] in (3.93, 2.29) and r["eager"] > 0 and r["kernels"] > 0
    assert len(gains["rows"]) == 6 and len(models["rows"]) == 2


def test_models_chart(tmp_path, monkeypatch):
    monkeypatch.setattr(U.rates, "copy_bandwidth", lambda device=U.DEVICE: 12.5)
    table = {"title": "r", "kind": "ratios", "columns": [], "rows": [
        {"size": "S", "metric": "train", "paper": 3.93, "eager": 1.5, "kernels": 1.7}]}
    sec = U.Section("models", "Models", [("size", "size")], rows=[{"size": "S"}],
                    summarize=lambda s: [table])
    j, _ = U.write_results([sec], tmp_path)
    png, why = plot_results.plot(j)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert png is None and "matplotlib" in why
    else:
        assert png is not None and png.exists() and png.stat().st_size > 1000


# ----------------------------------------------------------------------------- training memory

def test_memory_bench_tiny_models(monkeypatch):
    """Every column on tiny models: bytes > 0, checkpointing keeps fewer, the
    fake-tensor count equals the real step's, the summary ratios."""
    from benchmarks import test_bench_memory as BMEM

    monkeypatch.setenv("EDT_KERNELS_BACKEND", "torch")
    rows = []
    for family, ov in (("EDT", EDT_TINY), ("MDTv2", MDT_TINY)):
        got = {}
        for col in BMEM.columns(False):
            row = BMEM.measure_one(family, "S", col, device=CPU, overrides=ov)
            assert row["act_mib"] > 0 and row["ms"] > 0
            # a checkpointed column is timed in turn with its unchecked twin, and its ratio is to it
            assert ("twin_ms" in row) == (col.checkpoint is not None)
            if col.checkpoint is not None:
                assert row["twin_ms"] > 0 and row["time_ratio"] == pytest.approx(row["ms"] / row["twin_ms"])
            got[col.name] = row["act_mib"]
            rows.append(row)
        assert got["kernels ckpt=all"] < got["kernels ckpt=2"] < got["kernels"] < got["eager"]
        assert got["kernels ckpt=selective"] < got["kernels"]
        fake = BMEM.measure_one(family, "S", BMEM.Column("kernels", "all"), overrides=ov, bytes_only=True)
        assert fake["act_mib"] == got["kernels ckpt=all"]
    targets, table = BMEM.summarize(U.Section("memory", "t", BMEM.ROW_COLUMNS, rows=rows))
    assert all(r["act_ratio"] > 0 and r["time_ratio"] > 0 for r in table["rows"])
    by_row = {(r["model"], r["column"]): r for r in rows}
    for r in table["rows"]:  # the twin's ratio is kept, not replaced by one to the kernels row
        assert r["time_ratio"] == by_row[(r["model"], r["column"])].get("time_ratio", r["time_ratio"])
    times = [r for r in targets["rows"] if "step time" in r["target"]]  # no XL rows here: the time targets only
    assert targets["kind"] == "targets" and len(times) == len(targets["rows"]) == 2
    assert all(r["met"] == (r["value"] <= BMEM.TARGET_TIME_CKPT) for r in times)


def test_memory_bench_counts_what_selective_checkpointing_caches(monkeypatch):
    """The outputs selective checkpointing keeps (matmuls, attention) live in its own cache, not in
    autograd's saved tensors: the instrument adds them, whatever container the installed torch keeps
    them in."""
    import contextlib

    from benchmarks import test_bench_memory as BMEM
    from test_checkpointing import _model
    from test_models import EAGER

    model = _model("EDT", "selective", EAGER, torch.float32)
    x = torch.randn(2, model.in_channels, model.input_size, model.input_size)
    t, y = torch.tensor([1, 2]), torch.tensor([0, 1])
    params = list(model.parameters())
    _, counted = BMEM.saved_activation_bytes(lambda: model(x, t, y), params)
    monkeypatch.setattr(BMEM, "_selective_caches", lambda: contextlib.nullcontext([]))
    _, autograd_only = BMEM.saved_activation_bytes(lambda: model(x, t, y), params)
    assert counted > autograd_only > 0


def test_memory_budget_is_computed_from_the_rows():
    """The EDT-XL batch-32 budget: parameters' training state + kept activations + the recomputed
    first-stage block and its gradients, from the measured MiB per image."""
    from benchmarks import test_bench_memory as BMEM

    by = {("EDT-XL/2", "kernels"): {"act_mib_per_image": 460.0},
          ("EDT-XL/2", "kernels ckpt=all"): {"act_mib_per_image": 50.0}}
    b = BMEM.xl_budget(by)
    mib = BMEM.MIB / 1e9
    assert b["params"] > 600e6 and 0.05 < b["block_share"] < 0.07
    want = 20 * b["params"] / 1e9 + 32 * 50 * mib + 2 * 32 * b["block_share"] * 410 * mib
    assert b["total_gb"] == pytest.approx(want)
    assert BMEM.xl_budget({}) is None


@pytest.mark.parametrize("family", ["EDT", "MDTv2"])
def test_memory_bench_compiled_step(monkeypatch, family):
    """The compiled column on a tiny model: its step gives the uncompiled step's
    losses and gradients; the hooks see exactly the tensors the partitioned
    backward graph takes from the forward; the row has bytes and no time."""
    from collections import Counter

    from benchmarks import test_bench_memory as BMEM
    from tests.tolerances import GRAD_TOL, assert_close

    monkeypatch.setenv("EDT_KERNELS_BACKEND", "torch")
    ov = EDT_TINY if family == "EDT" else MDT_TINY
    model, _, loss_mod, inputs = BMEM._train_parts(family, "S", BMEM.Column("kernels"), CPU, ov)
    saved, packed = [], []
    compiled = torch.compile(loss_mod, backend=BMEM.partition_backend(saved), fullgraph=True)

    def step(fn, **kw):
        torch.manual_seed(1)
        model.zero_grad(set_to_none=True)
        out = fn(*inputs, **kw)
        out[0].backward()
        return out.detach(), {n: p.grad for n, p in model.named_parameters()}

    want = step(loss_mod)
    with torch.no_grad():  # fill the diffusion's device tables before tracing
        loss_mod(*inputs, draws=loss_mod.draw_ahead(BMEM.BATCH, None, CPU))
    step(lambda *a: compiled(*a, draws=loss_mod.draw_ahead(BMEM.BATCH, None, CPU)))  # compiles
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append((tuple(t.shape), t.dtype)) or t,
                                                  lambda t: t):
        got = step(lambda *a: compiled(*a, draws=loss_mod.draw_ahead(BMEM.BATCH, None, CPU)))
    assert_close(got[0], want[0], torch.float32)
    assert got[1].keys() == want[1].keys()
    for n, g in want[1].items():
        assert (g is None) == (got[1][n] is None), n
        if g is not None:
            assert_close(got[1][n], g, torch.float32, GRAD_TOL, n)
    assert len(saved) == 1 and Counter(packed) == Counter(saved[0])


def test_memory_bench_compiled_column_fake_equals_real(monkeypatch):
    """The compiled column's row: bytes and no time; on fake tensors (how the
    B and XL rows are made) the same bytes as the step run for real."""
    from benchmarks import test_bench_memory as BMEM

    monkeypatch.setenv("EDT_KERNELS_BACKEND", "torch")
    row = BMEM.measure_one("EDT", "S", BMEM.Column("compile"), device=CPU, overrides=EDT_TINY)
    assert row["act_mib"] > 0 and row.get("ms") is None and "Inductor" in row["note"]
    fake = BMEM.measure_one("EDT", "S", BMEM.Column("compile"), overrides=EDT_TINY, bytes_only=True)
    assert fake["act_mib"] == row["act_mib"]
