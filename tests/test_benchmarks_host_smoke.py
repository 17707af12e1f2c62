"""Smoke test of ``benchmarks/test_bench_host.py`` on tiny shapes: the launch recorder skips
Triton kernels and counts them, the counter sees launches and host syncs as defined, and the
op and model rows (with Dynamo's graph count) have the promised shape.  Timings mean nothing here."""
import os
import pathlib
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `benchmarks` is a package at the repository root
    sys.path.insert(0, str(ROOT))

from benchmarks import harness as U  # noqa: E402
from benchmarks import test_bench_host as BH  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or torch.cuda.is_available(),
                                reason="the launch recorder is exercised under Triton's interpreter (CPU)")

MDT_TINY, EDT_TINY = BH.TINY_MODELS["MDTv2"], BH.TINY_MODELS["EDT"]


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_counter_definitions():
    x = torch.randn(4, 4)
    c = BH.count(lambda: (x.t(), x.reshape(16), torch.empty(3), x + 1, x.sum().item(), x.tolist(),
                          torch.nonzero(x > 0)))
    assert dict(c.launches) == {"aten.add": 1, "aten.sum": 1, "aten.gt": 1}  # views, allocations: none
    assert dict(c.syncs) == {"_local_scalar_dense": 1, "tolist": 1, "nonzero": 1}


def test_host_drawn_reads_are_counted_apart_from_syncs():
    x = torch.randn(4)

    def step():
        with BH.host_draws():
            int(5 * torch.rand(1))  # a value drawn on the host, read before the step
        return x.sum().item()  # a read inside the step

    c = BH.count(step)
    assert dict(c.host_reads) == {"_local_scalar_dense": 1}
    assert dict(c.syncs) == {"_local_scalar_dense": 1}


def test_triton_launches_are_recorded_not_run():
    import edt_kernels

    x, gate = torch.randn(2, 4, 8), torch.randn(2, 8)
    out = torch.full((2, 4, 8), float("nan"))
    edt_kernels.gated_residual(x, gate, x, backend="triton")  # compiles/warms the interpreter path
    c = BH.OpCounter()
    with c.active():
        out = edt_kernels.gated_residual(x, gate, x, backend="triton")
    assert c.launches["triton._gated_residual_fwd_kernel"] == 1
    ref = x + gate[:, None] * x
    assert not torch.equal(out, ref)  # the kernel did not run: its output is unwritten
    assert torch.equal(edt_kernels.gated_residual(x, gate, x, backend="triton"), ref)  # outside: it runs


def test_op_rows():
    cases = [c for c in BH.op_cases() if c[0] in ("amm_attention table+AMM", "sdpa", "gated_residual")
             and c[2] in ("triton (recorded)", "authors' eager", "float mask", "mask with grad")]
    rows = BH.run_ops(rounds=2, inner=1, record=False, cases=cases)
    by = {(r["case"], r["mode"], r["path"]): r for r in rows}
    tri = by[("amm_attention table+AMM", "fwd", "triton (recorded)")]
    assert tri["us"] > 0 and tri["vs_sdpa"] > 0 and "_amm_attn_fwd_kernel" in tri["detail"]
    assert by[("amm_attention table+AMM", "fwd+bwd", "triton (recorded)")]["launches"] > tri["launches"]
    assert by[("sdpa", "fwd", "float mask")]["launches"] == 1
    sec = U.Section(BH.SECTION_OPS, "t", BH.OP_COLUMNS, rows=rows)
    (targets,) = BH.summarize_ops(sec)
    assert {r["target"] for r in targets["rows"]} >= {"triton fwd device launches <= 2"}


def test_model_rows_and_compile_stats():
    rows = BH.run_models(["EDT"], ["S"], rounds=1, compile_steps=0, record=False, overrides={"EDT": EDT_TINY})
    rows += BH.run_models(["MDTv2"], ["S"], rounds=1, compile_steps=2, record=False,
                          overrides={"MDTv2": MDT_TINY})
    assert len(rows) == 8
    for r in rows:
        assert r["launches"] > 0 and r["ms"] > 0 and r["vs_eager"] > 0
        assert r["syncs"] == 0  # MDTv2's mask ratio is read from its host draw, not in the step
        masked_draw = r["model"].startswith("MDTv2") and r["step"] == "train"
        assert r["host_reads"] == (1 if masked_draw else 0)
        # the authors' EDT moves its AMM buffer from the host in every sampling forward; nothing else
        # reads or makes a host tensor inside a step
        authors_amm = r["model"].startswith("EDT") and r["step"] == "cfg sample" and r["path"] == "authors' eager"
        assert (r["host_tensors"] > 0) == authors_amm, r
        if r["path"] == "triton (recorded)":
            assert r["triton"] > 0
            if r["model"].startswith("MDTv2"):
                assert r["graphs"] >= 1 and r["recompiles"] >= 0 and r["graph_breaks"] >= 0
    sec = U.Section(BH.SECTION_MODELS, "t", BH.MODEL_COLUMNS, rows=rows)
    (targets,) = BH.summarize_models(sec)
    assert len(targets["rows"]) == 4 and all(t["met"] for t in targets["rows"][1:])


def test_compiled_rows():
    """The compiled section's rows on the tiny MDTv2 (its trace is the cheaper), Dynamo's eager
    backend standing in for Inductor (minutes here): compiled and eager steps agree, ratios and the
    targets are filled, the ops' backend choice is reported."""
    rows = BH.run_compiled(["MDTv2"], backends=("torch",), rounds=1, record=False, overrides=BH.TINY_MODELS,
                           compiler="eager")
    assert len(rows) == 2
    for r in rows:
        assert r["same"] and r["max_diff"] < 1e-4, r
        assert r["compile_s"] > 0 and r["eager_ms"] > 0 and r["compiled_ms"] > 0 and r["ratio"] > 0
        if r["backend"] == "torch":
            assert "layernorm_modulate: torch" in r["picked"], r["picked"]
    sec = U.Section(BH.SECTION_COMPILED, "t", BH.COMPILED_COLUMNS, rows=rows)
    (targets,) = BH.summarize_compiled(sec)
    assert [r["met"] for r in targets["rows"]][-1] is True and len(targets["rows"]) == 3


def test_compiled_notes_say_whether_inductor_cache_was_empty(tmp_path, monkeypatch):
    """The compiled section's first-call seconds are cold compiles only from an empty Inductor
    cache: the notes say which it was."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    assert "cold compiles" in BH.inductor_cache_state() and "may be" not in BH.inductor_cache_state()
    (tmp_path / "fxgraph").mkdir()
    assert "held 1 entry" in BH.inductor_cache_state() and "may be cache hits" in BH.inductor_cache_state()
    assert "held 1 entry" in " ".join(BH._compiled_notes(5, BH.TINY_MODELS, BH.inductor_cache_state()))


def test_compiled_part_runs_alone_and_without_the_interpreter():
    for argv in (["--parts", "compiled", "--no-write"], ["--parts", "ops", "compiled", "--no-write"]):
        with pytest.raises(SystemExit) as exc:
            BH.main(argv)
        assert exc.value.code == 2
