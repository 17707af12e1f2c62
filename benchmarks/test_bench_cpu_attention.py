"""The C++ CPU attention (``backend="cpp"``, csrc/) vs the PyTorch reference
(``backend="torch"``) on CPU tensors (issue 3).

    pytest benchmarks/test_bench_cpu_attention.py --benchmark-only
    python -m benchmarks.test_bench_cpu_attention

Always CPU tensors in float32, whatever device the rest of the suite uses, at
N=256 (16x16 grid): EDT-S stage 0 (H=6, D=52) with the table, with table + AMM
(forward: EDT applies AMM at inference), and MDT-S masked (179 of 256 tokens,
H=6, D=64, positions).  Reported: median time, peak memory of one call (rise
of the process's peak RSS, see ``_utils``), relative error against the float64
reference, and the speed-up of cpp over torch.  Target (issue 3): the C++
kernel faster than the reference at N=256 and with lower peak memory.  Where
the extension is not built (no compiler, or csrc not landed), the cpp rows are
skipped with the reason ``edt_kernels`` gives.
"""
from __future__ import annotations

import sys
from typing import Dict, List, Optional, Sequence

import pytest
import torch

import edt_kernels

from benchmarks import _utils as U
from benchmarks.test_bench_attention import AttnCase, Impl, NotApplicable, check_error, make_problem, _call

SECTION = "cpu_attention"
IMPLS = ("cpp", "torch")
CPU = torch.device("cpu")
B = 4
CASES = (
    AttnCase("edt-s0", B, 6, 256, 52, 16, about="EDT-S stage 0, table"),
    AttnCase("edt-s0-amm", B, 6, 256, 52, 16, amm=True, modes=("fwd",), about="EDT-S AMM block"),
    AttnCase("mdt-s-masked", B, 6, 179, 64, 16, extra_rows=3, masked=True, about="MDT-S, 179 of 256"),
)

COLUMNS = [("case", "case"), ("mode", "mode"), ("impl", "backend"), ("shape", "B,H,N,D"),
           ("computes", "computes"), ("ms", "ms"), ("mem_mib", "peak MiB"), ("rel_err", "rel err"),
           ("speedup", "cpp speed-up"), ("mem_ratio", "mem / cpp mem"), ("spread", "spread"), ("note", "note")]


def cpp_unavailable_reason() -> Optional[str]:
    """Why backend="cpp" cannot run here, or None."""
    from edt_kernels import attention as A

    if "cpp" in A.available_backends():
        return None
    errs = getattr(A, "_IMPORT_ERRORS", {})
    return "backend 'cpp' is not available" + (f" ({errs['amm_attention_cpp']})" if "amm_attention_cpp" in errs else "")


def summarize(sec: U.Section) -> List[Dict]:
    base = {(r["case"], r["mode"]): r for r in sec.rows if r["impl"] == "cpp" and r.get("ms")}
    rows = []
    for r in sec.rows:
        b = base.get((r["case"], r["mode"]))
        r["speedup"] = r["ms"] / b["ms"] if (b and r.get("ms")) else None
        r["mem_ratio"] = (r["mem_mib"] / b["mem_mib"] if (b and r.get("mem_mib") and b.get("mem_mib"))
                          else None)
        if r["impl"] == "torch" and r["speedup"] is not None:
            rows.append({"case": r["case"], "mode": r["mode"], "speedup": r["speedup"],
                         "mem_ratio": r["mem_ratio"],
                         "met": bool(r["speedup"] > 1 and (r["mem_ratio"] or 0) > 1)})
    cols = [["case", "case"], ["mode", "mode"], ["speedup", "cpp speed-up over torch"],
            ["mem_ratio", "torch peak / cpp peak"], ["met", "faster and leaner"]]
    return [{"title": "C++ CPU attention vs the PyTorch reference (target: faster, lower peak memory)",
             "notes": [] if base else ["the cpp backend did not run in this run (see the skipped rows)"],
             "columns": cols, "rows": rows}]


def _section():
    notes = [f"{U.device_name(torch.device('cpu'))}, float32, CPU tensors even on a GPU "
             "machine",
             f"peak memory = {U.CPU_PEAK_METHOD or 'n/a (no /proc peak RSS on this platform)'} over one call",
             "cpp speed-up = time of this backend / time of cpp; mem / cpp mem likewise"]
    return U.section(SECTION, "C++ CPU attention vs PyTorch reference (issue 3)", COLUMNS, notes,
                     summarize=summarize)


def run_one(case: AttnCase, impl: str, mode: str, *, warmup: Optional[int] = None,
            repeats: Optional[int] = None, benchmark=None, record: bool = True, n_sets: Optional[int] = None
            ) -> Dict:
    warmup = 2 if warmup is None else warmup
    repeats = 10 if repeats is None else repeats
    if record:
        _section()
    row = {"_key": [case.name, mode, impl], "case": case.name, "mode": mode, "impl": impl,
           "shape": f"{case.B},{case.H},{case.N},{case.D}", "computes": case.computes}
    if impl == "cpp":
        why = cpp_unavailable_reason()
        if why:
            row["note"] = f"skipped: {why}"
            if record:
                U.record(SECTION, row)
            raise NotApplicable(why)
    prob = make_problem(case, mode, device=CPU, dtype=torch.float32, n_sets=n_sets)
    kw = dict(rel_pos_bias=prob.table, grid=case.grid, positions=prob.positions, amm=case.amm or None)

    def fwd(q, k, v):
        return edt_kernels.amm_attention(q, k, v, backend=impl, **kw)
    im = Impl(impl, fwd, case.computes, kw)
    fn = _call(im, prob)
    row["rel_err"] = check_error(im, prob)
    timing = U.measure(fn, prob.sets, warmup=warmup, repeats=repeats, benchmark=benchmark, device=CPU)
    if timing is None:
        return row
    row.update(timing.summary())
    mem = U.peak_memory(fn, prob.sets[0], CPU)
    row["mem_mib"] = None if mem is None else mem / 2**20
    row["note"] = ""
    if benchmark is not None:
        benchmark.extra_info.update({k: v for k, v in row.items() if not k.startswith("_")})
    if record:
        U.record(SECTION, row)
    return row


PARAMS = [pytest.param(c, m, i, id=f"{c.name}-{m}-{i}") for c in CASES for m in c.modes for i in IMPLS]


@pytest.mark.parametrize("case,mode,impl", PARAMS)
def test_cpu_attention(benchmark, case, mode, impl):
    benchmark.group = f"cpu attention {case.name} {mode}"
    try:
        row = run_one(case, impl, mode, benchmark=benchmark)
    except NotApplicable as exc:
        pytest.skip(str(exc))
    if "rel_err" in row:
        assert row["rel_err"] < 1e-4, row


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = U.base_parser("C++ CPU attention vs the PyTorch reference (issue 3)")
    p.add_argument("--impls", nargs="*", default=list(IMPLS), choices=IMPLS)
    args = p.parse_args(argv)
    errors = []
    for case in CASES:
        if args.cases and case.name not in args.cases:
            continue
        for mode in case.modes:
            for impl in args.impls:
                try:
                    row = run_one(case, impl, mode, warmup=args.warmup, repeats=args.repeats)
                    print(f"{case.name:14s} {mode:8s} {impl:6s} {row.get('ms', float('nan')):9.3f} ms", flush=True)
                except NotApplicable as exc:
                    print(f"{case.name:14s} {mode:8s} {impl:6s} skipped: {exc}", flush=True)
                except Exception as exc:  # noqa: BLE001 - reported, exit status non-zero
                    errors.append(f"{case.name} {mode} {impl}: {type(exc).__name__}: {exc}")
                    U.record(SECTION, {"_key": [case.name, mode, impl], "case": case.name, "mode": mode,
                                       "impl": impl, "note": f"ERROR: {type(exc).__name__}: {exc}"})
    return U.finish_main(args, [SECTION], errors)


if __name__ == "__main__":
    sys.exit(main())
