"""CI checks on the static sm_90 profile (benchmarks/profiling/sm90_profile.py, reduced matrix).

The kernels are compiled for sm_90 through their real launchers on the CPU
(no GPU needed) and their SASS is read with the cuobjdump/nvdisasm that Triton
ships.  At the production specialisations (bf16, q/k/v as views of one qkv
tensor, table + AMM, the tile the launcher runs first) no attention kernel may
spill registers to local memory, and no q/k/v/dO tile may be read with 2-byte
scalar loads at D = 52, 64, 72.  The token and adaLN kernels (bf16, C = 1152
and 936) may not spill either, and read a width that is a multiple of 8 but
not of 16 with no more 2-byte loads than a multiple of 16.
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
ATTENTION = {"_amm_attn_fwd_kernel", "_amm_attn_bwd_dkdv_kernel", "_amm_attn_bwd_dq_kernel",
             "_amm_attn_bwd_delta_kernel", "_amm_attn_bwd_dtable_kernel"}


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out = tmp_path_factory.mktemp("sm90")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.profiling.sm90_profile", "--out", str(out), "--reduced"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=3000)
    if proc.returncode == 2 and "ships no nvdisasm" in proc.stderr:
        pytest.skip(proc.stderr.strip())
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads((out / "sm90_profile.json").read_text())
    assert (out / "sm90_profile.md").read_text().count("static estimate") >= 1
    for r in data["records"]:
        assert (out / r["cubin"]).is_file()
    loc = data["gather_locality"]  # MDT masked: table lines per warp-load, random vs sorted kept positions
    assert loc["label"] == "static estimate" and loc["layout_source"].startswith("TTGIR")
    assert loc["cases"]["sorted"]["table_lines_per_warp_load"] < loc["cases"]["random"]["table_lines_per_warp_load"]
    return data["records"]


@pytest.fixture(scope="module")
def profile(records):
    return [r for r in records if r["kernel"] in ATTENTION and not r["rejected_over_shared_limit"]]


@pytest.fixture(scope="module")
def token_profile(records):
    return [r for r in records if r.get("feature", "").startswith("C=")]


@pytest.mark.slow
def test_profile_covers_the_attention_kernels(profile):
    got = {(r["kernel"], r["head_dim"]) for r in profile}
    for d in (52, 64, 72):
        for k in ATTENTION:
            assert (k, d) in got, (k, d)
    for r in profile:
        assert r["label"] == "static estimate"
        assert r["registers"] > 0 and r["sass"]["total"] > 0
        if r["kernel"] != "_amm_attn_bwd_delta_kernel":
            assert r["sass"].get("mma", 0) > 0, r["cubin"]  # tensor cores, not FMA loops
            assert r["loop_model"]["instr_per_score"] > 0


@pytest.mark.slow
def test_no_attention_kernel_spills(profile):
    spilling = [(r["cubin"], r["stack_bytes"], r["sass"].get("local", 0)) for r in profile if r["spills"]]
    assert not spilling, spilling


@pytest.mark.slow
def test_no_scalar_tile_loads(profile):
    scalar = [(r["cubin"], r["sass"].get("LDG.16", 0)) for r in profile
              if r["head_dim"] in (52, 64, 72) and r["sass"].get("LDG.16", 0)]
    assert not scalar, scalar


@pytest.mark.slow
def test_no_token_kernel_spills(token_profile):
    assert {r["feature"] for r in token_profile} == {"C=1152", "C=936"}
    spilling = [(r["cubin"], r["stack_bytes"], r["sass"].get("local", 0)) for r in token_profile if r["spills"]]
    assert not spilling, spilling


@pytest.mark.slow
def test_token_kernels_read_a_width_of_eight_as_vectors(token_profile):
    """C = 936 is a multiple of 8, not of 16: the launchers' alignment hints let every token and adaLN
    kernel read its rows as 16-byte vectors, with no more 2-byte loads (per-row mask values) than at 1152."""
    by = {(r["kernel"], r["feature"]): r["sass"] for r in token_profile}
    kernels = sorted({k for k, _ in by})
    assert len(kernels) >= 10, kernels
    worse = [(k, by[k, "C=936"].get("LDG.16", 0), by[k, "C=1152"].get("LDG.16", 0)) for k in kernels
             if by[k, "C=936"].get("LDG.16", 0) > by[k, "C=1152"].get("LDG.16", 0)]
    assert not worse, worse
