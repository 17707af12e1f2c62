"""Shared driver of the memory-bound kernel benchmarks (tokens, adaLN).

Each op is given as an :class:`OpSpec`: how to build its inputs, which inputs
take a gradient, the kernel (``edt_kernels`` public function, backend "auto"),
the eager PyTorch composition (the ``edt_kernels.reference`` function, which is
the published composition) and the fewest bytes a forward and a backward must
move.  Three implementations run on the same rotated inputs:

* ``edt_kernels``: the public function (Triton on CUDA; on the CPU the ops run
  their PyTorch reference: the Triton kernels need CUDA, and the interpreter is
  far too slow to time; the row's label says which path ran),
* ``eager``: the reference composition,
* ``compiled``: ``torch.compile(reference, dynamic=False)``.

GB/s = minimal bytes / median time; "% copy" compares it with the measured
copy bandwidth of the device.  Target (H100): >= 80% of copy
bandwidth and >= 2x eager.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from benchmarks import harness as U

IMPLS = ("edt_kernels", "eager", "compiled")
MODES = ("fwd", "fwd+bwd")


@dataclass(frozen=True)
class OpSpec:
    """One op at one shape.

    ``make(g, device, dtype)`` returns the input tuple; ``grad_idx`` lists the
    inputs that take a gradient in ``fwd+bwd``; ``kernel`` and ``reference``
    take the inputs positionally; ``fwd_bytes``/``bwd_bytes`` map the inputs to
    the minimal traffic of a forward / a backward.
    """

    name: str
    op: str
    shape: str
    make: Callable
    grad_idx: Tuple[int, ...]
    kernel: Callable
    reference: Callable
    fwd_bytes: Callable
    bwd_bytes: Callable
    path: Callable  # inputs -> "triton" / "torch reference"
    about: str = ""
    modes: Tuple[str, ...] = MODES


def nbytes(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.numel() * t.element_size()


_COMPILED: Dict[str, Callable] = {}


def compiled(spec: OpSpec) -> Callable:
    if spec.op not in _COMPILED:
        U.configure_compile()
        _COMPILED[spec.op] = torch.compile(spec.reference, dynamic=False)
    return _COMPILED[spec.op]


def make_sets(spec: OpSpec, mode: str, *, device=None, dtype=None, n_sets: Optional[int] = None,
              seed: int = 0) -> List[Tuple]:
    device = U.DEVICE if device is None else torch.device(device)
    dtype = U.default_dtype() if dtype is None else dtype
    g = torch.Generator(device="cpu").manual_seed(seed)
    first = spec.make(g, device, dtype)
    set_bytes = sum(nbytes(t) for t in first if isinstance(t, torch.Tensor))
    n = U.rotations(set_bytes, device) if n_sets is None else n_sets
    sets = [first] + [spec.make(g, device, dtype) for _ in range(n - 1)]
    if mode == "fwd+bwd":
        out = []
        for s in sets:
            s = tuple(t.requires_grad_(True) if i in spec.grad_idx else t for i, t in enumerate(s))
            with torch.no_grad():
                o = spec.reference(*s)
            out.append(s + (torch.randn(o.shape, generator=g).to(device, o.dtype),))
        sets = out
    return sets


def impl_fn(spec: OpSpec, impl: str) -> Callable:
    if impl == "edt_kernels":
        return spec.kernel
    if impl == "eager":
        return spec.reference
    if impl == "compiled":
        return compiled(spec)
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def call(spec: OpSpec, impl: str, mode: str) -> Callable:
    f = impl_fn(spec, impl)
    if mode == "fwd":
        def fn(*inputs):
            with torch.no_grad():
                return f(*inputs)
        return fn

    def fn(*inputs_and_dout):
        *inputs, dout = inputs_and_dout
        out = f(*inputs)
        return torch.autograd.grad(out, [inputs[i] for i in spec.grad_idx], dout)
    return fn


def check_error(spec: OpSpec, impl: str, inputs: Sequence) -> float:
    """Relative L2 error of the forward against the reference in float64 (CPU)
    or float32 (CUDA) on the same inputs."""
    inputs = tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in inputs)
    hi = torch.float64 if inputs[0].device.type == "cpu" else torch.float32
    up = tuple(t.to(hi) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs)
    with torch.no_grad():
        out = impl_fn(spec, impl)(*inputs).to(hi)
        ref = spec.reference(*up).to(hi)
    return (torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-30)).item()


COLUMNS = [
    ("op", "op"), ("shape", "shape"), ("mode", "mode"), ("impl", "impl"), ("path", "path"),
    ("ms", "ms"), ("GBps", "GB/s"), ("pct_copy", "% of copy BW"), ("mem_mib", "mem MiB"),
    ("rel_err", "rel err"), ("speedup", "edt_kernels speed-up"), ("spread", "spread"), ("note", "note"),
]


def section(name: str, title: str, extra_notes: Sequence[str] = ()) -> U.Section:
    notes = [f"device: {U.device_name()}",
             f"copy bandwidth (measured, dst.copy_(src), read+write): {U.copy_bandwidth():.1f} GB/s",
             "GB/s = the fewest bytes the op must move (inputs read once, outputs written once; "
             "fwd+bwd adds the backward's reads of dout/saved inputs and writes of the gradients) / time",
             "eager = the edt_kernels.reference composition (the published PyTorch code); compiled = "
             "torch.compile of it", U.memory_note(),
             "speed-up = time of this implementation / time of edt_kernels"] + list(extra_notes)
    if U.DEVICE.type == "cpu":
        notes.insert(0, U.CPU_NOTE)
        notes.append("CPU: the token/adaLN ops run their PyTorch reference (the Triton kernels need CUDA; "
                     "the interpreter is not timed), so edt_kernels ~ eager here by construction")
    return U.section(name, title, COLUMNS, notes, summarize=summarize)


def summarize(sec: U.Section) -> List[Dict]:
    base = {(r["op"], r["shape"], r["mode"]): r for r in sec.rows
            if r["impl"] == "edt_kernels" and r.get("ms")}
    for r in sec.rows:
        b = base.get((r["op"], r["shape"], r["mode"]))
        r["speedup"] = r["ms"] / b["ms"] if (b and r.get("ms")) else None
    rows = []
    for (op, shape, mode), b in base.items():
        row = {"op": op, "shape": shape, "mode": mode, "path": b.get("path"), "ms": b["ms"],
               "GBps": b.get("GBps"), "pct_copy": b.get("pct_copy")}
        for r in sec.rows:
            if (r["op"], r["shape"], r["mode"]) == (op, shape, mode) and r["impl"] != "edt_kernels":
                row[r["impl"]] = r.get("speedup")
        row["target_met"] = (None if U.SMALL or U.DEVICE.type != "cuda" else
                             bool((row.get("pct_copy") or 0) >= 80 and (row.get("eager") or 0) >= 2))
        rows.append(row)
    cols = [["op", "op"], ["shape", "shape"], ["mode", "mode"], ["path", "edt_kernels path"],
            ["ms", "ms"], ["GBps", "GB/s"], ["pct_copy", "% of copy BW"], ["eager", "vs eager"],
            ["compiled", "vs torch.compile"], ["target_met", ">= 80% copy and >= 2x eager"]]
    notes = ["vs X = time of X / time of edt_kernels (> 1: the kernel is faster)."]
    if U.SMALL or U.DEVICE.type != "cuda":
        notes.append("Targets (H100): not measured in this run (n/a).")
    return [{"title": "edt_kernels vs eager and torch.compile", "notes": notes, "columns": cols, "rows": rows}]


def run_one(spec: OpSpec, impl: str, mode: str, section_name: str, *, warmup: Optional[int] = None,
            repeats: Optional[int] = None, benchmark=None, device=None, dtype=None,
            n_sets: Optional[int] = None, record: bool = True, check: bool = True) -> Dict:
    if mode not in spec.modes:
        raise ValueError(f"{spec.name} has modes {spec.modes}, not {mode!r}")
    w0, r0 = (5, 30) if U.DEVICE.type == "cuda" else (2, 10)
    warmup = w0 if warmup is None else warmup
    repeats = r0 if repeats is None else repeats
    sets = make_sets(spec, mode, device=device, dtype=dtype, n_sets=n_sets)
    dev = sets[0][0].device
    inputs0 = sets[0][:len(sets[0]) - (1 if mode == "fwd+bwd" else 0)]
    path = spec.path(*inputs0) if impl == "edt_kernels" else ("torch.compile" if impl == "compiled" else "eager")
    row = {"_key": [spec.op, spec.shape, mode, impl], "op": spec.op, "shape": spec.shape, "mode": mode,
           "impl": impl, "path": path, "dtype": str(inputs0[0].dtype)}
    fn = call(spec, impl, mode)
    if check:
        row["rel_err"] = check_error(spec, impl, inputs0)
    timing = U.measure(fn, sets, warmup=warmup, repeats=repeats, benchmark=benchmark, device=dev)
    if timing is None:
        return row
    row.update(timing.summary())
    moved = spec.fwd_bytes(*inputs0) + (spec.bwd_bytes(*inputs0) if mode == "fwd+bwd" else 0)
    row["bytes"] = moved
    row["GBps"] = moved / timing.median / 1e9
    row["pct_copy"] = 100.0 * row["GBps"] / U.copy_bandwidth(dev)
    mem = U.peak_memory(fn, sets[0], dev)
    row["mem_mib"] = None if mem is None else mem / 2**20
    row["note"] = ""
    if benchmark is not None:
        benchmark.extra_info.update({k: v for k, v in row.items() if not k.startswith("_")})
    if record:
        U.record(section_name, row)
    return row


def main_loop(specs: Sequence[OpSpec], section_name: str, args) -> List[str]:
    errors = []
    for spec in specs:
        if args.cases and spec.name not in args.cases and spec.op not in args.cases:
            continue
        for mode in (m for m in args.modes if m in spec.modes):
            for impl in args.impls:
                try:
                    row = run_one(spec, impl, mode, section_name, warmup=args.warmup, repeats=args.repeats)
                    print(f"{spec.name:32s} {mode:8s} {impl:12s} {row.get('ms', float('nan')):9.3f} ms "
                          f"{row.get('GBps', float('nan')):8.1f} GB/s", flush=True)
                except Exception as exc:  # noqa: BLE001 - reported, exit status non-zero
                    errors.append(f"{spec.name} {mode} {impl}: {type(exc).__name__}: {exc}")
                    U.record(section_name, {"_key": [spec.op, spec.shape, mode, impl], "op": spec.op,
                                            "shape": spec.shape, "mode": mode, "impl": impl,
                                            "note": f"ERROR: {type(exc).__name__}: {exc}"})
    return errors


def add_cli(p):
    p.add_argument("--impls", nargs="*", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--modes", nargs="*", default=list(MODES), choices=MODES)
    return p


def check_row(row: Dict) -> None:
    """A measured row's kernel agrees with the eager op (bf16 on CUDA, float32 on the CPU)."""
    if "rel_err" in row:
        assert row["rel_err"] < (2e-2 if U.DEVICE.type == "cuda" else 1e-5), row


def main(description: str, specs: Sequence[OpSpec], section_name: str, make_section: Callable[[], object],
         argv: Optional[Sequence[str]]) -> int:
    """The ``main`` of a memory-bound benchmark module: its cases, one section, the results files."""
    args = U.parse_main_args(add_cli(U.base_parser(description)), argv)
    make_section()
    errors = main_loop(specs, section_name, args)
    return U.finish_main(args, [section_name], errors)
