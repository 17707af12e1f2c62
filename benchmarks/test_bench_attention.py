"""AMM attention: ``edt_kernels.amm_attention`` against its peers.

    pytest benchmarks/test_bench_attention.py --benchmark-only
    python -m benchmarks.test_bench_attention --cases edt-xl-s0 --impls edt_kernels eager

Implementations, all on the same rotated inputs in one process:

* ``edt_kernels``: ``amm_attention(..., backend="auto")`` (Triton on CUDA; on the
  CPU the compiled C++ kernel when built, else the PyTorch reference; the
  backend that ran is in the ``impl`` label).  On the CPU the Triton path would
  be the *interpreter*, far too slow to time meaningfully, so it is not timed.
* ``eager``: the published code path of MDT/EDT, ``amm_attention(...,
  backend="eager")``: gather the learned table through the precomputed
  ``relative_position_index`` into a dense ``[H, L, L]`` bias every call, for
  masked tokens two more gathers to ``[B, H, N, N]``, add to ``q k^T * scale``,
  softmax, multiply by the dense AMM buffer, matmul with v.  With bfloat16 q and
  a float32 table the bias add, softmax and AMM multiply run in float32 and the
  product with v in bfloat16, as under the authors' autocast.
* ``sdpa_mask``: ``F.scaled_dot_product_attention`` with the bias materialised
  as a float mask every call.  SDPA cannot apply a *post-softmax* multiplier,
  so for AMM cases it computes the bias-only attention (stated in ``computes``);
  its time is then a lower bound for an SDPA route to AMM.
* ``flex``: ``torch.compile(flex_attention)`` with a ``score_mod`` that gathers
  the table from the token positions.  Post-softmax AMM needs two passes:
  pass 1 (bias only) gives ``lse``; pass 2 adds ``log M`` (``-inf`` outside the
  radius) to the scores and gives ``o2, lse2``; then ``out = o2 * exp(lse2 - lse)``
  = ``sum_j softmax(s)_ij M_ij v_j`` exactly (M > 0 on the diagonal, so lse2 is
  finite).  On the CPU, flex has no backward and compiled flex cannot return
  the LSE: those rows are skipped with that reason (CPU only).
* ``sdpa_nobias``: SDPA with no bias and no AMM (flash backend where the head
  dim allows it, i.e. D % 8 == 0 on CUDA): the speed-of-light reference for
  the long-sequence target.

Reported: median time, TFLOP/s (forward ``4 B H N^2 D``, backward 2.5x),
memory above the inputs during one call, ``(q,k,v + that) / (q,k,v,out)``,
relative error of the forward against a float32 (CUDA) / float64 (CPU)
reference of what the row computes, and the speed-up of ``edt_kernels`` over
each peer.  Targets (H100, bf16): forward at EDT-XL shapes >= 3x eager
and >= 1.5x flex, fwd+bwd with table gradient >= 2x eager; MDT-XL masked >= 4x
eager with peak within 1.2x of q,k,v,out; N=4096 D=64 table+AMM forward >= 300
TFLOP/s and within 1.3x of SDPA flash without bias.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import pytest
import torch
import torch.nn.functional as F

import edt_kernels
from edt_kernels.amm import amm_offset_table
from edt_kernels.reference.attention import eager_rel_pos_bias

from benchmarks import harness as U

SECTION = "attention"
IMPLS = ("edt_kernels", "eager", "sdpa_mask", "flex", "sdpa_nobias")
MODES = ("fwd", "fwd+bwd")


class NotApplicable(Exception):
    """This implementation cannot run this case here; the message says why."""


@dataclass(frozen=True)
class AttnCase:
    name: str
    B: int
    H: int
    N: int
    D: int
    grid: int
    table: bool = True
    extra_rows: int = 0  # MDT tables have 3 unused rows
    masked: bool = False  # positions = a random subset of the grid per sample (MDT ids_keep)
    amm: bool = False
    modes: Tuple[str, ...] = MODES
    about: str = ""

    @property
    def computes(self) -> str:
        parts = (["table"] if self.table else []) + (["positions"] if self.masked else []) + \
                (["AMM"] if self.amm else [])
        return "+".join(parts) or "plain"


# EDT-XL: heads 18/24/30 at grids 16/8/4, head dim 52; AMM is applied at inference
# (eval) only in EDT, so its AMM case is forward only.
FULL_CASES = (
    AttnCase("edt-xl-s0", 32, 18, 256, 52, 16, about="EDT-XL stage 0/4 (16x16 grid)"),
    AttnCase("edt-xl-s1", 32, 24, 64, 52, 8, about="EDT-XL stage 1/3 (8x8 grid)"),
    AttnCase("edt-xl-s2", 32, 30, 16, 52, 4, about="EDT-XL stage 2 (4x4 grid)"),
    AttnCase("edt-xl-s0-amm", 32, 18, 256, 52, 16, amm=True, modes=("fwd",),
             about="EDT-XL AMM block (inference)"),
    AttnCase("mdt-xl-masked", 32, 16, 179, 72, 16, extra_rows=3, masked=True,
             about="MDT-XL encoder, 179 of 256 tokens kept"),
    AttnCase("dit-xl-amm", 32, 16, 256, 72, 16, table=False, amm=True,
             about="DiT-XL with training-free AMM (no table)"),
    AttnCase("long-1024", 8, 16, 1024, 64, 32, amm=True, about="long sequence, table + AMM"),
    AttnCase("long-4096", 2, 16, 4096, 64, 64, amm=True, about="long sequence, table + AMM"),
)
SMALL_CASES = (
    AttnCase("edt-s0-tiny", 2, 4, 256, 52, 16, about="EDT stage-0 grid, tiny batch (CPU)"),
    AttnCase("edt-s1-tiny", 2, 4, 64, 52, 8, about="EDT stage-1 grid, tiny batch (CPU)"),
    AttnCase("edt-s0-amm-tiny", 2, 4, 256, 52, 16, amm=True, modes=("fwd",),
             about="EDT AMM block, tiny batch (CPU)"),
    AttnCase("mdt-masked-tiny", 2, 2, 179, 72, 16, extra_rows=3, masked=True,
             about="MDT masked, 179 of 256, tiny batch (CPU)"),
    AttnCase("dit-amm-tiny", 2, 2, 256, 72, 16, table=False, amm=True, modes=("fwd",),
             about="DiT with AMM, tiny batch (CPU)"),
    AttnCase("long-1024-tiny", 1, 2, 1024, 64, 32, amm=True, modes=("fwd",),
             about="long sequence, table + AMM, one sample (CPU)"),
)
CASES = SMALL_CASES if U.SMALL else FULL_CASES
CASE_BY_NAME = {c.name: c for c in FULL_CASES + SMALL_CASES}


def default_iters() -> Tuple[int, int]:
    return (5, 30) if U.DEVICE.type == "cuda" else (2, 7)


# ----------------------------------------------------------------------------- inputs

@dataclass
class Problem:
    case: AttnCase
    mode: str
    table: Optional[torch.Tensor]
    positions: Optional[torch.Tensor]
    sets: List[Tuple[torch.Tensor, ...]]  # (q, k, v) or (q, k, v, dout)


def make_problem(case: AttnCase, mode: str, *, device=None, dtype=None, n_sets: Optional[int] = None,
                 seed: int = 0) -> Problem:
    device = U.DEVICE if device is None else torch.device(device)
    dtype = U.default_dtype() if dtype is None else dtype
    g = torch.Generator(device="cpu").manual_seed(seed)
    grad = mode == "fwd+bwd"
    L = case.grid * case.grid
    table = None
    if case.table:
        # float32, like a model parameter under autocast; std 1 so that errors in the
        # gather would show in the checks (values do not change the speed).
        table = torch.randn((2 * case.grid - 1) ** 2 + case.extra_rows, case.H, generator=g)
        table = table.to(device).requires_grad_(grad)
    positions = None
    if case.masked:
        positions = torch.stack([torch.randperm(L, generator=g)[:case.N] for _ in range(case.B)])
        positions = positions.to(device)
    elif case.N != L:
        raise ValueError(f"case {case.name}: N={case.N} != grid^2={L} without masking")
    set_bytes = (4 if grad else 3) * case.B * case.H * case.N * case.D * torch.tensor([], dtype=dtype).element_size()
    n = U.rotations(set_bytes, device) if n_sets is None else n_sets
    sets = []
    for _ in range(n):
        qkv = [torch.randn(case.B, case.H, case.N, case.D, generator=g).to(device, dtype).requires_grad_(grad)
               for _ in range(3)]
        if grad:
            qkv.append(torch.randn(case.B, case.H, case.N, case.D, generator=g).to(device, dtype))
        sets.append(tuple(qkv))
    return Problem(case, mode, table, positions, sets)


# ----------------------------------------------------------------------------- the published eager path

def published_eager(case: AttnCase, table, positions) -> Callable:
    """The authors' per-forward attention: ``amm_attention(..., backend="eager")``
    (``edt_kernels.reference.eager_attention``), the bias gathered from the
    table into ``[B, H, N, N]`` on every call."""
    def fwd(q, k, v):
        return edt_kernels.amm_attention(q, k, v, rel_pos_bias=table, grid=case.grid, positions=positions,
                                         amm=case.amm or None, backend="eager")
    return fwd


# ----------------------------------------------------------------------------- flex

def _flex_api():
    from torch.nn.attention import flex_attention as fa

    return fa.flex_attention, getattr(fa, "AuxRequest", None)


_FLEX_COMPILED = {}


def make_flex(case: AttnCase, table, positions, device, compiled: bool = True) -> Callable:
    """flex_attention with a table-gathering score_mod; AMM by two passes + LSE."""
    flex_attention, AuxRequest = _flex_api()
    if compiled:
        U.configure_compile()
        if "fn" not in _FLEX_COMPILED:
            _FLEX_COMPILED["fn"] = torch.compile(flex_attention, dynamic=False)
        flex = _FLEX_COMPILED["fn"]
    else:
        flex = flex_attention
    n = case.grid
    W = 2 * n - 1
    pos = positions if positions is not None else torch.arange(case.N, device=device)
    batched = positions is not None
    logm = amm_offset_table(n, device=device).log() if case.amm else None  # -inf outside the radius

    def offset(b, qi, kj):
        pi = pos[b, qi] if batched else pos[qi]
        pj = pos[b, kj] if batched else pos[kj]
        return (pi // n - pj // n + n - 1) * W + (pi % n - pj % n + n - 1)

    def bias_mod(score, b, h, qi, kj):
        return score + table[offset(b, qi, kj), h]

    def amm_mod(score, b, h, qi, kj):
        idx = offset(b, qi, kj)
        s = score + logm[idx]
        return s + table[idx, h] if table is not None else s

    def with_lse(q, k, v, mod):
        if AuxRequest is not None:
            o, aux = flex(q, k, v, score_mod=mod, return_aux=AuxRequest(lse=True))
            return o, aux.lse
        return flex(q, k, v, score_mod=mod, return_lse=True)

    first = bias_mod if table is not None else None

    def run(q, k, v):
        if not case.amm:
            return flex(q, k, v, score_mod=first)
        _, lse = with_lse(q, k, v, first)  # pass 1: LSE of the unmodulated scores
        o2, lse2 = with_lse(q, k, v, amm_mod)  # pass 2: softmax(s + log M)
        return o2 * torch.exp(lse2 - lse).unsqueeze(-1).to(o2.dtype)

    return run


# ----------------------------------------------------------------------------- implementations

@dataclass
class Impl:
    label: str
    forward: Callable  # (q, k, v) -> out
    computes: str  # what it computes ("table+AMM", "table only: ...")
    reference: Dict  # reference_attention kwargs of what it computes


def kernel_backend_name(case: AttnCase, prob: Problem) -> str:
    from edt_kernels import attention as A

    q, k, v = prob.sets[0][:3]
    try:
        inp = A.validate_inputs(q, k, v, rel_pos_bias=prob.table, grid=case.grid,
                                positions=prob.positions, amm=case.amm or None)
        return A.select_backend(inp, "auto").name
    except Exception as exc:  # noqa: BLE001 - only the label depends on it
        return f"auto ({type(exc).__name__})"


def build_impl(impl: str, prob: Problem, *, compiled: bool = True) -> Impl:
    case, table, positions = prob.case, prob.table, prob.positions
    device = prob.sets[0][0].device
    full = dict(rel_pos_bias=table, grid=case.grid, positions=positions, amm=case.amm or None)
    if impl == "edt_kernels":
        backend = kernel_backend_name(case, prob)
        if device.type == "cpu" and backend == "triton":
            raise NotApplicable("the Triton backend on CPU is the interpreter: far too slow to time")

        def fwd(q, k, v):
            return edt_kernels.amm_attention(q, k, v, rel_pos_bias=table, grid=case.grid,
                                             positions=positions, amm=case.amm or None, backend="auto")
        return Impl(f"amm_attention[{backend}]", fwd, case.computes, full)
    if impl == "eager":
        return Impl("published eager", published_eager(case, table, positions), case.computes, full)
    if impl == "sdpa_mask":
        if table is None:
            raise NotApplicable("no table: there is no bias to materialise (see sdpa_nobias)")
        def fwd(q, k, v):
            mask = eager_rel_pos_bias(table, case.grid, positions)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype))
        what = "table only (SDPA cannot apply post-softmax AMM)" if case.amm else case.computes
        ref = dict(full, amm=None)
        return Impl("SDPA + float mask", fwd, what, ref)
    if impl == "flex":
        if device.type == "cpu" and prob.mode == "fwd+bwd":
            raise NotApplicable("FlexAttention has no backward on CPU (torch raises); CPU only")
        if device.type == "cpu" and case.amm and compiled:
            raise NotApplicable("compiled FlexAttention on CPU cannot return the LSE that post-softmax "
                                "AMM needs (inference-only CPU lowering); CPU only")
        fwd = make_flex(case, table, positions, device, compiled=compiled)
        return Impl("flex_attention" + ("" if compiled else " (eager)"), fwd, case.computes, full)
    if impl == "sdpa_nobias":
        use_flash = device.type == "cuda" and case.D % 8 == 0

        def fwd(q, k, v):
            if use_flash:
                from torch.nn.attention import SDPBackend, sdpa_kernel

                with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                    return F.scaled_dot_product_attention(q, k, v)
            return F.scaled_dot_product_attention(q, k, v)
        return Impl("SDPA no bias" + (" [flash]" if use_flash else " [auto]"), fwd,
                    "no bias, no AMM (speed-of-light reference)", dict(grid=case.grid))
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def _call(impl: Impl, prob: Problem) -> Callable:
    uses_table = impl.reference.get("rel_pos_bias") is not None
    params = [prob.table] if uses_table else []
    if prob.mode == "fwd":
        def fn(q, k, v):
            with torch.no_grad():
                return impl.forward(q, k, v)
        return fn

    def fn(q, k, v, dout):
        out = impl.forward(q, k, v)
        return torch.autograd.grad(out, [q, k, v] + params, dout)
    return fn


def check_error(impl: Impl, prob: Problem) -> float:
    """Relative L2 error of the forward against the reference of what ``impl``
    computes, in float64 on the CPU and float32 on CUDA."""
    q, k, v = (t.detach() for t in prob.sets[0][:3])
    ref_dtype = torch.float64 if q.device.type == "cpu" else torch.float32
    kw = dict(impl.reference)
    if kw.get("rel_pos_bias") is not None:
        kw["rel_pos_bias"] = kw["rel_pos_bias"].detach().to(ref_dtype)
    with torch.no_grad():
        out = impl.forward(q, k, v).to(ref_dtype)
        ref = edt_kernels.reference_attention(q.to(ref_dtype), k.to(ref_dtype), v.to(ref_dtype), **kw)
        err = (torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref)).item()
    del out, ref
    return err


# ----------------------------------------------------------------------------- one measurement

COLUMNS = [
    ("case", "case"), ("mode", "mode"), ("impl", "impl"), ("computes", "computes"),
    ("shape", "B,H,N,D"), ("ms", "ms"), ("tflops", "TFLOP/s"), ("mem_mib", "mem MiB"),
    ("peak_over_io", "(qkv+mem)/io"), ("rel_err", "rel err"), ("speedup", "edt_kernels speed-up"),
    ("spread", "spread"), ("note", "note"),
]


def _section():
    notes = [f"device: {U.device_name()}", U.memory_note(),
             "TFLOP/s = matmul FLOPs / time: forward 4*B*H*N^2*D, fwd+bwd 3.5x that (same count for every "
             "implementation, whatever it recomputes)",
             "speed-up = time of this implementation / time of edt_kernels on the same case and mode",
             "flex with AMM runs two passes (LSE of the biased scores, then scores + log M) and rescales: "
             "out = o2 * exp(lse2 - lse)",
             "eager = amm_attention(backend='eager'), the authors' code path: with bfloat16 inputs the bias add, "
             "softmax and AMM multiply run in float32 (float32 table), the product with v in bfloat16"]
    if U.DEVICE.type == "cpu":
        notes.insert(0, U.CPU_NOTE)
        notes.append("CPU: edt_kernels uses backend 'auto' = cpp (compiled C++) when built, else torch; "
                     "the Triton interpreter is not timed (far too slow to mean anything)")
    return U.section(SECTION, "Attention: edt_kernels.amm_attention vs peers", COLUMNS,
                     notes, summarize=summarize)


def run_one(case: AttnCase, impl_name: str, mode: str, *, warmup: Optional[int] = None,
            repeats: Optional[int] = None, benchmark=None, compiled: bool = True,
            check: bool = True, device=None, dtype=None, n_sets: Optional[int] = None,
            record: bool = True) -> Dict:
    """Measure one (case, implementation, mode); returns the row (and records it).
    Raises ``NotApplicable`` (after recording the reason) where the peer cannot run."""
    if mode not in case.modes:
        raise ValueError(f"case {case.name} has modes {case.modes}, not {mode!r}")
    w0, r0 = default_iters()
    warmup = w0 if warmup is None else warmup
    repeats = r0 if repeats is None else repeats
    if record:
        _section()
    prob = make_problem(case, mode, device=device, dtype=dtype, n_sets=n_sets)
    dev = prob.sets[0][0].device
    row = {"_key": [case.name, mode, impl_name], "case": case.name, "mode": mode, "impl": impl_name,
           "shape": f"{case.B},{case.H},{case.N},{case.D}", "dtype": str(prob.sets[0][0].dtype)}
    try:
        impl = build_impl(impl_name, prob, compiled=compiled)
    except NotApplicable as exc:
        row.update(computes="-", note=f"skipped: {exc}")
        if record:
            U.record(SECTION, row)
        raise
    fn = _call(impl, prob)
    row.update(impl=impl_name, label=impl.label, computes=impl.computes)
    if check:
        row["rel_err"] = check_error(impl, prob)
    timing = U.measure(fn, prob.sets, warmup=warmup, repeats=repeats, benchmark=benchmark, device=dev)
    if timing is None:  # pytest-benchmark disabled: ran once, nothing to report
        return row
    row.update(timing.summary())
    row["tflops"] = U.attention_flops(case.B, case.H, case.N, case.D, mode) / timing.median / 1e12
    mem = U.peak_memory(fn, prob.sets[0], dev)
    io = 4 * U.tensor_bytes(prob.sets[0][0])
    row["mem_mib"] = None if mem is None else mem / 2**20
    row["peak_over_io"] = None if mem is None else (3 * U.tensor_bytes(prob.sets[0][0]) + mem) / io
    row["note"] = impl.label if impl.label != impl_name else ""
    if benchmark is not None:
        benchmark.extra_info.update({k: v for k, v in row.items() if not k.startswith("_")})
    if record:
        U.record(SECTION, row)
    return row


# ----------------------------------------------------------------------------- summary

def summarize(sec: U.Section) -> List[Dict]:
    rows = sec.rows
    base = {(r["case"], r["mode"]): r for r in rows if r["impl"] == "edt_kernels" and r.get("ms")}
    for r in rows:
        b = base.get((r["case"], r["mode"]))
        r["speedup"] = (r["ms"] / b["ms"]) if (b and r.get("ms")) else None
    pivot, seen = [], []
    for r in rows:
        key = (r["case"], r["mode"])
        if key not in seen:
            seen.append(key)
    for case, mode in seen:
        p = {"case": case, "mode": mode}
        for r in rows:
            if (r["case"], r["mode"]) == (case, mode):
                if r["impl"] == "edt_kernels":
                    p["kernel_ms"] = r.get("ms")
                    p["kernel_tflops"] = r.get("tflops")
                    p["kernel_label"] = r.get("label")
                else:
                    p[r["impl"]] = r.get("speedup") if r.get("ms") else "skipped"
        pivot.append(p)
    cols = [("case", "case"), ("mode", "mode"), ("kernel_label", "edt_kernels backend"),
            ("kernel_ms", "ms"), ("kernel_tflops", "TFLOP/s"), ("eager", "vs eager"),
            ("sdpa_mask", "vs SDPA+mask"), ("flex", "vs flex"), ("sdpa_nobias", "vs SDPA no bias")]
    tables = [{"title": "Speed-up of edt_kernels over each peer (peer time / edt_kernels time)",
               "notes": ["> 1: edt_kernels is faster. SDPA+mask in AMM cases computes the bias only; "
                         "SDPA no bias computes neither bias nor AMM (a speed-of-light reference)."],
               "columns": [list(c) for c in cols], "rows": pivot}]
    tables.append(targets_table(rows))
    return tables


def _get(rows, case, mode, impl, key):
    for r in rows:
        if (r["case"], r["mode"], r["impl"]) == (case, mode, impl):
            return r.get(key)
    return None


def targets_table(rows) -> Dict:
    """The attention targets (H100, bf16), read off this run."""
    out = []

    def add(target, value, ok):
        out.append({"target": target, "measured": value,
                    "met": None if value is None else bool(ok)})

    for c in ("edt-xl-s0", "edt-xl-s1", "edt-xl-s2"):
        s = _get(rows, c, "fwd", "eager", "speedup")
        add(f"{c} fwd >= 3x eager", s, s is not None and s >= 3)
        s = _get(rows, c, "fwd", "flex", "speedup")
        add(f"{c} fwd >= 1.5x flex", s, s is not None and s >= 1.5)
        s = _get(rows, c, "fwd+bwd", "eager", "speedup")
        add(f"{c} fwd+bwd >= 2x eager", s, s is not None and s >= 2)
    s = _get(rows, "mdt-xl-masked", "fwd", "eager", "speedup")
    add("mdt-xl-masked fwd >= 4x eager", s, s is not None and s >= 4)
    p = _get(rows, "mdt-xl-masked", "fwd", "edt_kernels", "peak_over_io")
    add("mdt-xl-masked fwd peak <= 1.2x q,k,v,out", p, p is not None and p <= 1.2)
    t = _get(rows, "long-4096", "fwd", "edt_kernels", "tflops")
    add("long-4096 fwd table+AMM >= 300 TFLOP/s", t, t is not None and t >= 300)
    s = _get(rows, "long-4096", "fwd", "sdpa_nobias", "speedup")
    add("long-4096 fwd within 1.3x of SDPA flash (speed-up >= 1/1.3)", s, s is not None and s >= 1 / 1.3)
    notes = ["Targets are stated for an H100 in bfloat16 at the full shapes."]
    if U.SMALL or U.DEVICE.type != "cuda":
        notes.append("This run used small shapes / no GPU: the targets are not measured here (n/a).")
    return {"title": "Attention targets (H100, bf16)", "notes": notes,
            "columns": [["target", "target"], ["measured", "measured"], ["met", "met"]], "rows": out}


# ----------------------------------------------------------------------------- pytest entry

PARAMS = [pytest.param(c, m, i, id=f"{c.name}-{m}-{i}") for c in CASES for m in c.modes for i in IMPLS]


@pytest.mark.parametrize("case,mode,impl", PARAMS)
def test_attention(benchmark, case, mode, impl):
    benchmark.group = f"attention {case.name} {mode}"
    try:
        row = run_one(case, impl, mode, benchmark=benchmark)
    except NotApplicable as exc:
        pytest.skip(str(exc))
    if "rel_err" in row:
        # A peer that computes something else would make every ratio meaningless.
        assert row["rel_err"] < (2e-2 if U.DEVICE.type == "cuda" else 1e-4), row


# ----------------------------------------------------------------------------- main

def main(argv: Optional[Sequence[str]] = None) -> int:
    p = U.base_parser("AMM attention benchmarks")
    p.add_argument("--impls", nargs="*", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--modes", nargs="*", default=list(MODES), choices=MODES)
    p.add_argument("--no-compile", action="store_true", help="run flex uncompiled (eager)")
    args = U.parse_main_args(p, argv)
    names = args.cases or [c.name for c in CASES]
    errors = []
    for name in names:
        if name not in CASE_BY_NAME:
            p.error(f"unknown case {name!r}; known: {sorted(CASE_BY_NAME)}")
        case = CASE_BY_NAME[name]
        for mode in (m for m in args.modes if m in case.modes):
            for impl in args.impls:
                try:
                    row = run_one(case, impl, mode, warmup=args.warmup, repeats=args.repeats,
                                  compiled=not args.no_compile)
                    print(f"{name:18s} {mode:8s} {impl:12s} {row.get('ms', float('nan')):9.3f} ms",
                          flush=True)
                except NotApplicable as exc:
                    print(f"{name:18s} {mode:8s} {impl:12s} skipped: {exc}", flush=True)
                except Exception as exc:  # noqa: BLE001 - reported and makes the exit status non-zero
                    errors.append(f"{name} {mode} {impl}: {type(exc).__name__}: {exc}")
                    U.record(SECTION, {"_key": [name, mode, impl], "case": name, "mode": mode,
                                       "impl": impl, "note": f"ERROR: {type(exc).__name__}: {exc}"})
    return U.finish_main(args, [SECTION], errors)


if __name__ == "__main__":
    sys.exit(main())
