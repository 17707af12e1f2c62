"""Host cost per op call and per model step: host µs, device launches, host syncs, graph breaks.

    python -m benchmarks.test_bench_host                       # ops + all six models
    python -m benchmarks.test_bench_host --parts ops --rounds 9
    python -m benchmarks.test_bench_host --parts compiled --compiled-models tiny   # Inductor: minutes
    pytest benchmarks/test_bench_host.py --benchmark-only

At the sizes these models run on a GPU the kernels take 10-20 µs, so the Python around them
decides whether the GPU waits.  This module measures that host side on any machine, the CPU
included, without timing a kernel:

* **Triton launches recorded, not executed.**  With ``TRITON_INTERPRET=1`` (set by ``main()``
  before triton is imported; CPU tensors) every ``@triton.jit`` function's ``run`` is replaced
  by a recorder that counts the launch and returns at once (:func:`recorded_launches`), so the
  host time of a Triton-path call is the launchers, the custom op, autograd and dispatch alone.
  The outputs of such a call are left unwritten; only host-side work is meaningful.  In a model
  step MDTv2's masking kernels still run, their time taken out (:data:`EXECUTED`).
* **Device launches** (:class:`OpCounter`): every ATen op that reaches the dispatcher below
  autograd (a ``TorchDispatchMode``), except the ones that launch nothing on a GPU: views and
  other metadata-only ops (``OpOverload.is_view``, ``detach``, ``alias``, ``_unsafe_view``,
  ``lift_fresh``), allocations (``empty``, ``empty_strided``, ``new_empty``, ...) and the host
  syncs counted below, and ops that return no tensor (``promote_types``); plus every recorded
  Triton launch.  Counted on a warm call (one call before fills the caches).  A ``torch.library`` custom op of
  edt_kernels is not counted itself: the ATen ops and launches of its implementation are.
  Composite ops are counted as what they decompose to (``linear`` = ``t`` (a view) + ``addmm``).
  An op's forward+backward is ``torch.autograd.grad(out, inputs, grad_out)`` with a prepared
  ``grad_out``: no loss reduction, no seed gradient and no ``.grad`` accumulation is counted.
  Training is mimicked: before each call the version counter of the positions (and, with the
  backward, of the table) is bumped, as a new mask draw (an optimizer step) does; an
  inference forward sees the same table every call.
* **Host syncs**: ``_local_scalar_dense`` (``.item()``, ``float(t)``, ``bool(t)``), ops whose
  output size depends on the data (``nonzero``, ``masked_select``, ``unique``...,
  ``repeat_interleave`` without ``output_size``), ``equal``/``is_nonzero``, and ``Tensor.tolist``
  / ``Tensor.numpy`` (seen by a ``TorchFunctionMode``: on the CPU they read memory without
  dispatch).  On a GPU each is a device-to-host read that stalls the launch queue.
  A read inside :func:`host_draws` (the model's random draws made ahead from a CPU generator,
  before the step, as edt.train does) of a CPU tensor is counted apart, as a host-drawn value
  read (``host_reads``): it reads host memory, never the device's.  That those draws read no
  device tensor is checked once per model by drawing them for the ``meta`` device, where any
  value read of a device tensor raises (:func:`check_host_draws`).
* **Host tensors in a step** (:class:`HostTensors`, model steps): the step run once more with
  the model and its inputs on the ``meta`` device (no data: nothing computes, but every
  tensor says where it lives), counting, on a warm call, the ops that read or make a host
  (CPU) tensor of at least one dimension.  On a GPU each is a copy between host and device (a
  copy from pageable host memory waits for the device: a sync that the counts above cannot
  see on a CPU run) or host work inside the step, and a host tensor in a compiled step keeps
  Inductor from capturing it as one CUDA graph.  0-dim host tensors are scalars to PyTorch and
  are not counted; nor are the draws made ahead (:func:`host_draws`).  The kernels do not run
  on ``meta``: the kernels path is measured with the PyTorch references in their place (their
  own per-call device work is the launch count above).
* **Host µs**: ``time.perf_counter_ns`` around each call (no counter active), ``inner`` calls
  per case per round in ``rounds`` interleaved rounds (every case once per round, so that a
  busy machine's drift hits all cases alike); the median over all calls is reported (a call
  the scheduler preempted is one outlier), with the spread (p80 - p20) / median of the
  per-round medians.
* **torch.compile** (model steps): a counting backend (each graph Dynamo hands over is counted
  and run eagerly: no Inductor, no code generation), over ``--compile-steps`` steps with fresh
  inputs (a new draw of MDT's mask per step): graphs in the first step, graph breaks
  (``torch._dynamo.utils.counters["graph_break"]``, with their reasons) and graphs compiled
  after the first step (recompiles, e.g. for a new kept-token count).

Cases.  Ops: ``amm_attention`` (table + AMM on a 4 x 4 grid, and table + per-sample positions
= MDT's masked blocks; B=2, H=2, N=16, D=8: the compute is negligible) forward and
forward+backward with the table gradient, on every backend (``triton`` recorded, ``cpp``,
``torch``, and ``eager``, the authors' code path), against ``F.scaled_dot_product_attention``
without a mask, with a float mask, and with a mask that takes a gradient; MDT's and EDT's token
ops and the adaLN ops (``layernorm_modulate`` and ``patch_merge_modulate`` also forward+backward),
on the Triton path (recorded) and the authors' eager path.  Models:
EDT-S/B/XL and MDTv2-S/B/XL with their published depth, stages, heads, grid (latent 32, patch
2: 256 tokens) and block layout but **head dim 4** (every width divided so, e.g. EDT-S dims
24/32/40/32/24), batch 2, so that the CPU compute stays small beside the host work; the
launch and sync counts do not depend on the widths.  Training step: the training script's
``DiffusionTrainingLoss`` (EDT: full + down-masked pass on the same noised batch; MDTv2: full +
input-masked pass; the model's random draws made ahead from a CPU generator, as edt.train does,
outside the compiled region) and ``backward``; the optimizer step is left out (the same few foreach
launches for both models).  Sampling step: one ``forward_with_cfg`` on a [cond, uncond] batch.
Both on the Triton path (recorded) and the authors' eager path, on the same inputs.

**Compiled vs eager** (``--parts compiled``, opt-in, run alone and without the interpreter: the
kernels run for real here).  The same training and CFG sampling steps, eager and under
``torch.compile(fullgraph=True)`` in mode default (Inductor), for small EDT and MDTv2 models
(``edt.digits.DIGITS_MODELS``, or :data:`TINY_MODELS`), on backend ``auto`` (which backend each
op chose is reported) and on the authors' eager path: the first compiled call's seconds (compile
+ one step), eager and compiled ms per step in interleaved rounds, their ratio, and whether the
compiled losses and gradients (or samples) equal eager's within the float32 gradient tolerance.
"""
from __future__ import annotations

import contextlib
import logging
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from typing import AbstractSet, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from benchmarks import harness as U

SECTION_OPS = "host_ops"
SECTION_MODELS = "host_models"
TITLE_OPS = "Host cost per op call (Triton launches recorded, not executed)"
TITLE_MODELS = "Host cost per model step (launches, syncs, host time, graph breaks)"
SECTION_COMPILED = "host_compiled"
TITLE_COMPILED = "Compiled (torch.compile, Inductor) vs eager step time on this CPU"
FAMILIES = ("EDT", "MDTv2")
SIZES = ("S", "B", "XL")
HEAD_DIM = 4  # the models' head dim here: widths shrink, counts do not change
BATCH = 2
#: The smallest models with every kind of block (EDT: one block per stage, both down/up
#: samplings and an AMM block; MDTv2: encoder, side-interpolater and decoder), 8 x 8 input.
TINY_MODELS = {
    "MDTv2": dict(input_size=8, hidden_size=16, depth=4, num_heads=2, decode_layer=2, num_classes=10),
    "EDT": dict(input_size=8, hidden_size=16, dims=(16, 24, 32, 24, 16), num_heads=(2, 2, 2, 2, 2),
                stages_depth=(1, 1, 1, 1, 1), depth=5, amm_blocks=(4,), num_classes=10),
}

# ----------------------------------------------------------------------------- counting

_NO_LAUNCH = {"detach", "alias", "_unsafe_view", "lift_fresh", "empty", "empty_strided", "new_empty",
              "new_empty_strided", "empty_like", "_reshape_alias", "resize_", "set_"}
_SYNC_OPS = {"_local_scalar_dense", "nonzero", "nonzero_static", "masked_select", "unique", "_unique",
             "_unique2", "unique_consecutive", "unique_dim", "equal", "is_nonzero", "allclose"}
_SYNC_METHODS = {"tolist", "numpy"}


_BACKEND_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)


def _is_sync(func) -> bool:
    name = func._schema.name.split("::")[-1]
    if name == "repeat_interleave":
        return func._overloadname == "Tensor" or "output_size" not in str(func._schema)
    return name in _SYNC_OPS


def _has_tensor(out) -> bool:
    if isinstance(out, torch.Tensor):
        return True
    return isinstance(out, (tuple, list)) and any(isinstance(o, torch.Tensor) for o in out)


class _HostDraws:
    active = False


@contextlib.contextmanager
def host_draws():
    """The step's random draws made ahead on the host (``draw_ahead`` from a CPU generator,
    before the step): a value read of a CPU tensor in here counts as a host-drawn value read
    (``OpCounter.host_reads``), not as a host sync."""
    saved, _HostDraws.active = _HostDraws.active, True
    try:
        yield
    finally:
        _HostDraws.active = saved


def _host_read(args) -> bool:
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    return _HostDraws.active and bool(tensors) and all(t.device.type == "cpu" for t in tensors)


class _MethodSyncs(TorchFunctionMode):
    def __init__(self, counter: "OpCounter"):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in _SYNC_METHODS:
            (self.counter.host_reads if _host_read(args) else self.counter.syncs)[func.__name__] += 1
        return func(*args, **(kwargs or {}))


class OpCounter(TorchDispatchMode):
    """Counts the device launches and host syncs of what runs inside it (module docstring)."""

    def __init__(self):
        super().__init__()
        self.launches: Counter = Counter()  # "aten.<op>" / "triton.<kernel>" -> count
        self.syncs: Counter = Counter()
        self.host_reads: Counter = Counter()  # value reads of host-drawn CPU tensors (host_draws)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ns = func.namespace
        if ns != "aten":  # a custom op: count what its implementation does
            with self:  # below Python dispatch: the backend kernel, whose ATen calls come back here
                return func.redispatch(_BACKEND_KEYS, *args, **kwargs)
        name = func._schema.name.split("::")[-1]
        out = func(*args, **kwargs)
        if _is_sync(func):
            (self.host_reads if _host_read(args) else self.syncs)[name] += 1
        elif not (func.is_view or name in _NO_LAUNCH) and _has_tensor(out):
            self.launches[f"aten.{name}"] += 1
        return out

    @contextlib.contextmanager
    def active(self):
        with recorded_launches(self.launches), _MethodSyncs(self), self:
            yield self

    @property
    def n_launches(self) -> int:
        return sum(self.launches.values())

    @property
    def n_syncs(self) -> int:
        return sum(self.syncs.values())

    @property
    def n_host_reads(self) -> int:
        return sum(self.host_reads.values())


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Kernels whose integer outputs later ops of a model step index with (MDT's kept-token order and
# inverse permutation): in a step the interpreter runs them, and the time inside them is taken out
# of the host time.  What that leaves is still above the host side alone (the interpreter leaves
# the host's caches cold: random_masking by itself measures about 5x its host side that way), so
# the per-op timings, where no later op reads them, skip them too.
EXECUTED = frozenset({"_sort_kept_kernel", "_masking_gather_kernel"})


class _Executed:
    seconds = 0.0


@contextlib.contextmanager
def recorded_launches(counts: Optional[Counter] = None, execute: AbstractSet[str] = EXECUTED):
    """Every Triton JIT launch counted in ``counts`` ("triton.<kernel>") and, under the
    interpreter, not executed but for the kernels named in ``execute`` (on a GPU every launch
    goes through)."""
    if "triton" not in sys.modules:
        yield counts
        return
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    saved = {cls: cls.run for cls in (InterpretedFunction, JITFunction)}

    def recorder(cls):
        original = saved[cls]

        def run(self, *args, grid, warmup, **kwargs):
            if warmup:
                return original(self, *args, grid=grid, warmup=warmup, **kwargs)
            name = self.fn.__name__
            if counts is not None:
                counts[f"triton.{name}"] += 1
            if cls is InterpretedFunction:
                if name not in execute:
                    return None
                t0 = time.perf_counter()
                try:  # the interpreter's own tensor copies are not the kernel's launches
                    with torch._C.DisableTorchFunction(), torch._C._DisableTorchDispatch():
                        return original(self, *args, grid=grid, warmup=warmup, **kwargs)
                finally:
                    _Executed.seconds += time.perf_counter() - t0
            return original(self, *args, grid=grid, warmup=warmup, **kwargs)
        return run

    try:
        for cls in saved:
            cls.run = recorder(cls)
        yield counts
    finally:
        for cls, run in saved.items():
            cls.run = run


def count(fn: Callable[[], object]) -> OpCounter:
    """The launches and syncs of one warm call of ``fn`` (one call first fills the caches)."""
    with recorded_launches():
        fn()
    c = OpCounter()
    with c.active():
        fn()
    return c


class HostTensors(TorchDispatchMode):
    """Counts the ops that read or make a host (CPU) tensor of at least one dimension, by op name,
    outside :func:`host_draws` (see the module docstring); run it on a step whose tensors live on
    the ``meta`` device."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not _HostDraws.active and any(isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.dim() > 0
                                         for t in tree_leaves((args, kwargs, out))):
            self.ops[func._schema.name.split("::")[-1]] += 1
        return out


def host_tensors(fn: Callable[[], object]) -> Counter:
    """:class:`HostTensors`' count of one warm call of ``fn`` (one call first makes the per-device
    tables and caches, which a step builds once)."""
    fn()
    with HostTensors() as m:
        fn()
    return m.ops


# ----------------------------------------------------------------------------- timing

def interleaved(cases: Dict[str, Callable[[], object]], rounds: int, inner: int,
                execute: AbstractSet[str] = EXECUTED) -> Dict[str, Dict]:
    """Per case: the median µs of one call over ``rounds`` interleaved rounds of ``inner`` calls,
    each call timed alone (a call the scheduler preempted is one outlier, not a round's mean);
    spread = (p80 - p20) / median of the per-round medians.  ``execute``: as in
    :func:`recorded_launches`."""
    samples: Dict[str, List[float]] = {k: [] for k in cases}
    per_round: Dict[str, List[float]] = {k: [] for k in cases}
    with recorded_launches(execute=execute):
        for fn in cases.values():  # warm-up: caches, autotuner keys, allocator
            fn()
            fn()
        for _ in range(rounds):
            for name, fn in cases.items():
                xs = []
                for _ in range(inner):
                    e0 = _Executed.seconds
                    t0 = time.perf_counter_ns()
                    fn()
                    ns = time.perf_counter_ns() - t0 - (_Executed.seconds - e0) * 1e9
                    xs.append(ns / 1e3)
                samples[name] += xs
                per_round[name].append(statistics.median(xs))
    out = {}
    for name, xs in samples.items():
        med = statistics.median(xs)
        rs = per_round[name]
        q = statistics.quantiles(rs, n=5) if len(rs) >= 2 else [rs[0]] * 4
        out[name] = {"us": med, "spread": (q[3] - q[0]) / med if med else None}
    return out


# ----------------------------------------------------------------------------- op cases

def _attn_inputs(g, positions: bool):
    """Tiny q, k, v [2, 2, 16, 8] and a table; with ``positions`` the 16 tokens are a per-sample
    subset of an 8 x 8 grid (MDT's masked blocks), else the whole 4 x 4 grid."""
    B, H, N, D = 2, 2, 16, 8
    side = 8 if positions else 4
    q, k, v = (torch.randn(B, H, N, D, generator=g) for _ in range(3))
    table = torch.randn((2 * side - 1) ** 2, H, generator=g)
    pos = torch.stack([torch.randperm(side * side, generator=g)[:N] for _ in range(B)]) if positions else None
    return q, k, v, table, pos, (side, side)


def _fresh(kw: dict, *names: str) -> dict:
    """``kw`` with the version counters of the named tensors bumped, as a training step does to
    them (an optimizer step updates the table, the next step draws new positions), so that no
    per-call table or index built from them can be re-used; no op runs."""
    for n in names:
        if kw.get(n) is not None:
            torch.autograd.graph.increment_version(kw[n])
    return kw


def _grads(out, inputs, gout):
    """The backward of one call alone: no loss reduction, no seed gradient, no accumulation."""
    return torch.autograd.grad(out, inputs, gout)


def _attention_cases(g, variant: str, with_pos: bool, backends: Sequence[str]):
    import torch.nn.functional as F

    import edt_kernels

    q, k, v, table, pos, grid = _attn_inputs(g, with_pos)
    tg = table.clone().requires_grad_(True)
    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
    gout = torch.randn(q.shape, generator=g)
    cases = []
    for backend in [b for b in ("triton", "cpp", "torch", "eager") if b in backends]:
        kw = dict(rel_pos_bias=table, grid=grid, positions=pos, amm=not with_pos, backend=backend)
        kwg = dict(kw, rel_pos_bias=tg)
        path = "triton (recorded)" if backend == "triton" else ("authors' eager" if backend == "eager"
                                                                  else backend)
        cases.append((f"amm_attention {variant}", "fwd", path,
                      lambda kw=kw: edt_kernels.amm_attention(q, k, v, **_fresh(kw, "positions"))))
        cases.append((f"amm_attention {variant}", "fwd+bwd", path,
                      lambda kw=kwg: _grads(edt_kernels.amm_attention(
                          qg, kg, vg, **_fresh(kw, "positions", "rel_pos_bias")), (qg, kg, vg, tg), gout)))
    if not with_pos:
        mask = torch.randn(1, q.shape[1], q.shape[2], q.shape[2], generator=g)
        mask_g = mask.clone().requires_grad_(True)
        cases += [
            ("sdpa", "fwd", "no mask", lambda: F.scaled_dot_product_attention(q, k, v)),
            ("sdpa", "fwd", "float mask", lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)),
            ("sdpa", "fwd+bwd", "no mask", lambda: _grads(F.scaled_dot_product_attention(qg, kg, vg), (qg, kg, vg), gout)),
            ("sdpa", "fwd+bwd", "mask with grad",
             lambda: _grads(F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask_g), (qg, kg, vg, mask_g), gout)),
        ]
    return cases


def op_cases(seed: int = 0) -> List[Tuple[str, str, str, Callable[[], object]]]:
    """(case, mode, path, fn): every fn is one call on tiny shapes."""
    import edt_kernels
    from edt_kernels.attention import available_backends

    g = torch.Generator().manual_seed(seed)
    cases = []
    for variant, with_pos in (("table+AMM", False), ("table+positions", True)):
        cases += _attention_cases(g, variant, with_pos, available_backends())
    # token and adaLN ops (MDT-like: B=2, L=16, C=8)
    B, L, C, K = 2, 16, 8, 9
    x = torch.randn(B, L, C, generator=g)
    ids = torch.stack([torch.randperm(L, generator=g) for _ in range(B)])
    shift, scale, gate = (torch.randn(B, C, generator=g) for _ in range(3))
    xk = torch.randn(B, K, C, generator=g)
    mtok, pe = torch.randn(1, 1, C, generator=g), torch.randn(1, L, C, generator=g)
    drop = (torch.rand(B, L, generator=g) < 0.4).float()
    sh4, sc4 = torch.randn(B, 4 * C, generator=g), torch.randn(B, 4 * C, generator=g)
    keep = torch.rand(B, L // 4, generator=g) >= 0.45
    rng = torch.Generator().manual_seed(seed + 1)
    ops = [
        ("gather_tokens", lambda b: edt_kernels.gather_tokens(x, ids[:, :K], backend=b)),
        ("unshuffle_with_mask_token", lambda b: edt_kernels.unshuffle_with_mask_token(xk, ids, mtok, pe, backend=b)),
        ("masked_shortcut", lambda b: edt_kernels.masked_shortcut(x, x, drop, backend=b)),
        ("patch_merge_modulate", lambda b: edt_kernels.patch_merge_modulate(x, sh4, sc4, keep, grid=4, backend=b)),
        ("random_masking", lambda b: edt_kernels.random_masking(x, 0.4, rng, backend=b)),
        ("layernorm_modulate", lambda b: edt_kernels.layernorm_modulate(x, shift, scale, backend=b)),
        ("gated_residual", lambda b: edt_kernels.gated_residual(x, gate, x, backend=b)),
    ]
    for name, call in ops:
        for b in ("triton", "eager"):
            cases.append((name, "fwd", "triton (recorded)" if b == "triton" else "authors' eager",
                          lambda call=call, b=b: call(b)))
    # the adaLN ops' backward: gradients of the input, shift and scale
    xg, shg, scg, sh4g, sc4g = (t.clone().requires_grad_(True) for t in (x, shift, scale, sh4, sc4))
    grad_ops = [
        ("patch_merge_modulate", (xg, sh4g, sc4g),
         lambda b: edt_kernels.patch_merge_modulate(xg, sh4g, sc4g, keep, grid=4, backend=b)),
        ("layernorm_modulate", (xg, shg, scg), lambda b: edt_kernels.layernorm_modulate(xg, shg, scg, backend=b)),
    ]
    for name, inputs, call in grad_ops:
        gout = torch.randn(call("eager").shape, generator=g)
        for b in ("triton", "eager"):
            cases.append((name, "fwd+bwd", "triton (recorded)" if b == "triton" else "authors' eager",
                          lambda call=call, b=b, inputs=inputs, gout=gout: _grads(call(b), inputs, gout)))
    return cases


OP_COLUMNS = [("case", "case"), ("mode", "mode"), ("path", "path"), ("us", "host µs / call"),
              ("launches", "device launches"), ("syncs", "host syncs"), ("vs_sdpa", "× SDPA host µs"),
              ("spread", "spread"), ("detail", "launches by op"), ("note", "note")]


def _record_rows(name: str, title: str, columns, notes: List[str], summarize, rows: List[Dict]) -> None:
    """``rows`` into this run's section ``name`` (created with its title, columns, notes and targets)."""
    U.section(name, title, columns, notes, summarize=summarize)
    for row in rows:
        U.record(name, row)


def _detail(c: OpCounter) -> str:
    return ", ".join(f"{k.split('.', 1)[1]}×{n}" if n > 1 else k.split(".", 1)[1]
                     for k, n in sorted(c.launches.items(), key=lambda kv: -kv[1]))


def _by_op(counts: Counter) -> Optional[str]:
    """``"op×n, ..."`` of a per-op count, None when empty."""
    return ", ".join(f"{k}×{n}" for k, n in counts.items()) or None


def run_ops(rounds: int = 9, inner: int = 20, record: bool = True, cases=None) -> List[Dict]:
    cases = op_cases() if cases is None else cases
    rows, fns = [], {}
    for case, mode, path, fn in cases:
        row = {"_key": [case, mode, path], "case": case, "mode": mode, "path": path}
        if path.startswith("triton") and not interpreting() and not U.IS_CUDA:
            row["note"] = "triton needs TRITON_INTERPRET=1 before triton is imported (run main())"
            rows.append(row)
            continue
        c = count(fn)
        row.update(launches=c.n_launches, syncs=c.n_syncs, detail=_detail(c))
        rows.append(row)
        fns[(case, mode, path)] = fn
    times = interleaved({k: f for k, f in fns.items()}, rounds, inner, execute=frozenset())
    for row in rows:
        t = times.get((row["case"], row["mode"], row["path"]))
        if t:
            row.update(t)
    ref = {"fwd": ("sdpa", "fwd", "float mask"), "fwd+bwd": ("sdpa", "fwd+bwd", "mask with grad")}
    for row in rows:
        if row["case"].startswith("amm_attention") and "us" in row:
            r = times.get(ref[row["mode"]])
            row["vs_sdpa"] = row["us"] / r["us"] if r else None
    if record:
        _record_rows(SECTION_OPS, TITLE_OPS, OP_COLUMNS, _op_notes(rounds, inner), summarize_ops, rows)
    return rows


def _op_notes(rounds: int, inner: int) -> List[str]:
    return [f"host µs: median of single calls, {rounds} interleaved rounds of {inner} calls per case; tiny shapes "
            "(attention B=2 H=2 N=16 D=8, tokens B=2 L=16 C=8): the compute is negligible.",
            "triton (recorded): TRITON_INTERPRET=1 and every Triton launch counted and skipped, so the time "
            "is the host side alone; device launches = Triton launches + ATen ops that launch on a device "
            "(views, allocations and syncs excluded; see the module docstring).",
            "× SDPA: forward against SDPA with a float mask, forward+backward against SDPA whose mask takes "
            "a gradient (the issue's reference points).",
            "adaLN ops' fwd+bwd: the gradients of the input, shift and scale (torch.autograd.grad with a "
            "prepared output gradient)."]


def _get(rows, case, mode, path, key):
    for r in rows:
        if r.get("case") == case and r.get("mode") == mode and r.get("path") == path:
            return r.get(key)
    return None


def summarize_ops(sec: U.Section) -> List[Dict]:
    rows = sec.rows
    t = []

    def add(target, value, ok):
        t.append({"target": target, "value": value, "met": None if value is None else ok})

    case = "amm_attention table+AMM"
    v = _get(rows, case, "fwd", "triton (recorded)", "vs_sdpa")
    add("triton fwd host µs <= 4x SDPA with mask", v, v is not None and v <= 4)
    v = _get(rows, case, "fwd+bwd", "triton (recorded)", "vs_sdpa")
    add("triton fwd+bwd host µs <= 2x SDPA, mask with grad", v, v is not None and v <= 2)
    for path in ("cpp", "torch"):
        v = _get(rows, case, "fwd", path, "vs_sdpa")
        if v is not None:
            add(f"{path} (CPU default path) fwd host µs <= 4x SDPA with mask", v, v <= 4)
    v = _get(rows, case, "fwd", "triton (recorded)", "launches")
    add("triton fwd device launches <= 2", v, v is not None and v <= 2)
    v = _get(rows, case, "fwd+bwd", "triton (recorded)", "launches")
    add("triton fwd+bwd device launches <= 6", v, v is not None and v <= 6)
    return [{"title": "Targets (host side of amm_attention)", "kind": "targets",
             "columns": [["target", "target"], ["value", "measured"], ["met", "met"]], "rows": t}]


# ----------------------------------------------------------------------------- model steps

def tiny_width(family: str, size: str) -> dict:
    """The published configuration with every width set to ``HEAD_DIM`` per head."""
    from edt.models.edt import _EDT_CONFIGS

    if family == "EDT":
        heads = list(_EDT_CONFIGS[size]["num_heads"])
        dims = [h * HEAD_DIM for h in heads]
        return dict(hidden_size=dims[0], dims=dims)
    heads = {"S": 6, "B": 12, "XL": 16}[size]
    return dict(hidden_size=heads * HEAD_DIM)


def build_model(family: str, size: str, backend: str, overrides: Optional[dict] = None):
    """The model with :func:`tiny_width`, or with ``overrides`` instead (the smoke test's tiny ones)."""
    from edt.models import EDT_models, MDTv2_models

    factory = (EDT_models if family == "EDT" else MDTv2_models)[f"{family}-{size}/2"]
    torch.manual_seed(0)
    return factory(backend=backend, **(tiny_width(family, size) if overrides is None else overrides))


def step_fns(model, family: str, seed: int = 0, device: Optional[torch.device] = None):
    """(train(), cfg(), loss): closures over fixed inputs, a training step and a CFG sampling step,
    and the training loss module; the inputs on ``device`` (default: the CPU)."""
    from edt.diffusion import create_diffusion
    from edt.train import DiffusionTrainingLoss
    from edt.utils import frozen

    g = torch.Generator().manual_seed(seed)
    C, S = model.in_channels, model.input_size
    x = torch.randn(BATCH, C, S, S, generator=g)
    y = torch.randint(0, model.num_classes, (BATCH,), generator=g)
    t = torch.randint(0, 1000, (BATCH,), generator=g)
    noise, noise2 = torch.randn(x.shape, generator=g), torch.randn(x.shape, generator=g)
    if device is not None:
        x, y, t, noise, noise2 = (a.to(device) for a in (x, y, t, noise, noise2))
    loss = DiffusionTrainingLoss(model, create_diffusion(""), "edt" if family == "EDT" else "mdt")
    x2 = torch.cat([x, x])
    t2 = torch.full((2 * BATCH,), 500, device=x.device)
    y2 = torch.cat([y, torch.full_like(y, model.num_classes)])

    def train(loss_fn=loss):
        model.train()
        model.zero_grad(set_to_none=True)
        with host_draws():  # before the step, from a CPU generator, as edt.train does
            draws = loss.draw_ahead(BATCH, torch.Generator().manual_seed(seed + 1), x.device)
        out = loss_fn(x, y, t, noise, noise2, draws)
        out[0].backward()
        return out

    def cfg(fwd=model.forward_with_cfg):
        model.eval()
        with torch.no_grad(), frozen(model):  # as edt.sample's model (and edt.train's EMA copy)
            return fwd(x2, t2, y2, 1.5)
    return train, cfg, loss


def check_host_draws(model, loss) -> None:
    """The training step's draws made for the ``meta`` device: a draw that read a device
    tensor's value would raise there, so every value read in :func:`host_draws` is of a
    tensor drawn on the host."""
    model.train()
    try:
        loss.draw_ahead(BATCH, torch.Generator().manual_seed(0), torch.device("meta"))
    except (RuntimeError, NotImplementedError) as exc:
        raise AssertionError(f"the step's draws read a device tensor: {exc}") from exc


class _GraphCounter:
    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def compile_stats(model, family: str, which: str, steps: int) -> Dict:
    """Graphs and graph breaks of the first step under Dynamo (counting backend), and the graphs
    compiled in ``steps - 1`` more steps on new inputs (recompiles)."""
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    dynamo.reset()
    counters.clear()
    backend = _GraphCounter()
    graphs, breaks = [], None
    quiet = logging.getLogger("torch._dynamo")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the break reasons are reported in the table
    try:
        for s in range(steps):
            train, cfg, loss = step_fns(model, family, seed=s)
            if which == "train":
                train(torch.compile(loss, backend=backend))
            else:
                cfg(torch.compile(model.forward_with_cfg, backend=backend))
            graphs.append(backend.graphs)
            if breaks is None:
                breaks = dict(counters["graph_break"])
    finally:
        quiet.setLevel(level)
        dynamo.reset()
    reasons = "; ".join(f"{r.splitlines()[0][:80]} ×{n}" for r, n in breaks.items())
    return {"graphs": graphs[0], "graph_breaks": sum(breaks.values()),
            "recompiles": graphs[-1] - graphs[0], "break_reasons": reasons or None}


MODEL_COLUMNS = [("model", "model"), ("step", "step"), ("path", "path"), ("launches", "device launches"),
                 ("triton", "of which Triton"), ("syncs", "host syncs"),
                 ("host_tensors", "ops on host tensors (meta run)"),
                 ("host_reads", "host-drawn values read (CPU generator, before the step)"),
                 ("ms", "host ms / step"),
                 ("vs_eager", "launches / authors'"), ("graphs", "graphs (step 1)"),
                 ("graph_breaks", "graph breaks (step 1)"), ("recompiles", "recompiles"), ("spread", "spread"),
                 ("sync_detail", "syncs by op"), ("host_tensor_detail", "host-tensor ops by op"),
                 ("break_reasons", "break reasons"), ("note", "note")]


def run_models(families: Sequence[str] = FAMILIES, sizes: Sequence[str] = SIZES, rounds: int = 5,
               compile_steps: int = 3, record: bool = True,
               overrides: Optional[Dict[str, dict]] = None) -> List[Dict]:
    """Rows per (model, step, path); ``overrides``: family -> model arguments instead of the widths."""
    rows = []
    for size in sizes:
        for family in families:
            name = f"{family}-{size}/2"
            fns, built = {}, {}
            for backend in ("triton", "eager"):
                path = "triton (recorded)" if backend == "triton" else "authors' eager"
                model = build_model(family, size, backend, (overrides or {}).get(family))
                built[backend] = model
                train, cfg, loss = step_fns(model, family)
                check_host_draws(model, loss)
                meta = build_model(family, size, "torch" if backend == "triton" else backend,
                                   (overrides or {}).get(family)).to("meta")
                on_meta = dict(zip(("train", "cfg sample"), step_fns(meta, family, device=torch.device("meta"))))
                for step, fn in (("train", train), ("cfg sample", cfg)):
                    row = {"_key": [name, step, path], "model": name, "step": step, "path": path}
                    c = count(fn)
                    host = host_tensors(on_meta[step])
                    row.update(launches=c.n_launches, syncs=c.n_syncs, host_reads=c.n_host_reads,
                               triton=sum(n for k, n in c.launches.items() if k.startswith("triton.")),
                               sync_detail=_by_op(c.syncs), host_tensors=sum(host.values()),
                               host_tensor_detail=_by_op(host))
                    if backend == "triton" and compile_steps:
                        with recorded_launches():
                            row.update(compile_stats(model, family, "train" if step == "train" else "cfg",
                                                     compile_steps))
                    rows.append(row)
                    fns[(step, path)] = fn
            times = interleaved(fns, rounds, 1)
            for row in rows:
                if row["model"] != name:
                    continue
                t = times[(row["step"], row["path"])]
                row.update(ms=t["us"] / 1e3, spread=t["spread"])
                eager = next(r for r in rows if r["model"] == name and r["step"] == row["step"]
                             and r["path"] == "authors' eager")
                row["vs_eager"] = row["launches"] / eager["launches"] if eager["launches"] else None
            del built
    if record:
        _record_rows(SECTION_MODELS, TITLE_MODELS, MODEL_COLUMNS, _model_notes(rounds, compile_steps),
                     summarize_models, rows)
    return rows


def _model_notes(rounds: int, compile_steps: int) -> List[str]:
    return [f"published depth, stages, heads, 256 tokens and block layout; head dim {HEAD_DIM} and batch "
            f"{BATCH} so that the CPU compute stays small (the counts do not depend on widths); host ms: median "
            f"of {rounds} interleaved rounds of one step, Triton launches recorded, not executed, but for "
            "MDTv2's masking kernels, whose outputs later ops index with: they run in the interpreter and "
            "their time is taken out, not the cold host caches they leave (MDTv2's host ms are an upper bound).",
            "train = DiffusionTrainingLoss (both passes, the loss) + backward, no optimizer step; "
            "cfg sample = one forward_with_cfg on a [cond, uncond] batch.",
            f"graphs / breaks / recompiles: Dynamo with a counting backend over {compile_steps} steps with new "
            "inputs; recompiles = graphs compiled after the first step.",
            "host syncs: reads of a value inside the step; host-drawn values read: reads, in the model's "
            "draw_ahead before the step, of values drawn on the host from a CPU generator (MDTv2's mask ratio, "
            "which sizes the step's kept-token count): host memory, no device read on a GPU (checked by "
            "drawing them for the meta device); the position and id value checks are opt-in "
            "(edt_kernels.set_check_values).",
            "ops on host tensors: the step once more on the meta device, warm, counting the ops that read or "
            "make a host tensor of at least one dimension (on a GPU a copy between host and device, which "
            "waits for the device from pageable memory, or host work; a host tensor also keeps a compiled "
            "step from being one CUDA graph); the kernels path with the PyTorch references in the kernels' "
            "place (they do not run on meta).",
            "baseline beside it in benchmarks/results/host-cost-baseline/ (the code before the host-cost changes)."]


def summarize_models(sec: U.Section) -> List[Dict]:
    rows, t = sec.rows, []

    def row(model, step, path):
        return next((r for r in rows if r["model"] == model and r["step"] == step and r["path"] == path), {})

    r = row("EDT-S/2", "train", "triton (recorded)")
    v = r.get("vs_eager")
    t.append({"target": "EDT-S/2 train step device launches <= 0.5x authors' eager", "value": v,
              "met": None if v is None else v <= 0.5})
    kern = [r for r in rows if r["path"] == "triton (recorded)"]
    if kern:
        s = max(r.get("syncs", 0) for r in kern)
        t.append({"target": "0 host syncs in EDT and MDTv2 steps (max over rows)", "value": s, "met": s == 0})
        h = [r["host_tensors"] for r in kern if r.get("host_tensors") is not None]
        if h:
            t.append({"target": "0 ops on host tensors in EDT and MDTv2 steps (meta run, max over rows)",
                      "value": max(h), "met": max(h) == 0})
        tr = [r for r in kern if r["step"] == "train" and r.get("graph_breaks") is not None]
        if tr:
            b = max(r["graph_breaks"] for r in tr)
            t.append({"target": "0 graph breaks in the compiled training steps (max)", "value": b, "met": b == 0})
    return [{"title": "Targets (model steps)", "kind": "targets",
             "columns": [["target", "target"], ["value", "measured"], ["met", "met"]], "rows": t}]


# ----------------------------------------------------------------------------- compiled vs eager

def digits_config(family: str) -> dict:
    """The model arguments of :data:`edt.digits.DIGITS_MODELS` for ``family`` at the digits input
    size (16, patch 2: 64 tokens) and 10 classes, the backend left to :func:`build_model`."""
    from edt.digits import DIGITS_MODELS, DIGITS_SIZE, NUM_CLASSES

    kw = {k: v for k, v in DIGITS_MODELS[family][1].items() if k != "backend"}
    return dict(kw, input_size=DIGITS_SIZE, num_classes=NUM_CLASSES)


def chosen_backends(fn: Callable[[], object]) -> str:
    """The backend each edt_kernels op chose while ``fn`` ran ("op: backend, ..."), with the
    choice cache cleared before and after, so that every op chooses while it is watched."""
    from edt_kernels import backends as KB

    seen: Dict[str, str] = {}
    select = KB._select

    def watched(op, inp, backend):
        chosen = select(op, inp, backend)
        seen[op] = next(n for n, b in KB.backends_of(op).items() if b is chosen)
        return chosen

    KB._CHOICES.clear()
    KB._select = watched
    try:
        fn()
    finally:
        KB._select = select
        KB._CHOICES.clear()
    return ", ".join(f"{op}: {name}" for op, name in sorted(seen.items())) or "no edt_kernels op"


def _train_result(model, train, loss_fn) -> List[torch.Tensor]:
    """The losses and the parameter gradients (in parameter order) of one training step."""
    out = train(loss_fn)
    return [out.detach().clone()] + [p.grad.clone() for p in model.parameters() if p.grad is not None]


def _max_diff(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> Tuple[float, bool]:
    """The largest |got - want| over all tensors, and whether every pair is close within the float32
    gradient tolerance of tests/tolerances.py (the same shapes required)."""
    from tests.tolerances import GRAD_TOL

    tol = GRAD_TOL[torch.float32]
    if len(got) != len(want) or any(a.shape != b.shape for a, b in zip(got, want)):
        return float("inf"), False
    diff = max(float((a - b).abs().max()) for a, b in zip(got, want))
    return diff, all(torch.allclose(a, b, atol=tol[0], rtol=tol[1]) for a, b in zip(got, want))


COMPILED_COLUMNS = [("model", "model"), ("step", "step"), ("backend", "backend"), ("picked", "ops ran on"),
                    ("compile_s", "first compiled call s (compile + 1 step)"), ("eager_ms", "eager ms / step"),
                    ("compiled_ms", "compiled ms / step"), ("ratio", "compiled / eager"),
                    ("same", "compiled = eager"), ("max_diff", "max |compiled - eager|"),
                    ("spread", "spread (eager, compiled)"), ("note", "note")]


def run_compiled(families: Sequence[str] = FAMILIES, backends: Sequence[str] = ("auto", "eager"),
                 rounds: int = 5, record: bool = True, overrides: Optional[Dict[str, dict]] = None,
                 compiler: str = "inductor", cache: Optional[str] = None) -> List[Dict]:
    """Per (model, step, backend): the training step (both passes, the loss, backward) and the CFG
    sampling step, eager and under ``torch.compile(fullgraph=True, backend=compiler)`` (mode
    default); the compiled numbers against eager's on the same inputs.  Models: ``overrides``
    (family -> model arguments), else :func:`digits_config`.  ``cache``: the Inductor cache's
    state before the whole part (:func:`inductor_cache_state`, read here when not given)."""
    import torch._dynamo as dynamo

    cache = cache or inductor_cache_state()
    rows = []
    for family in families:
        kw = (overrides or {}).get(family) or digits_config(family)
        for backend in backends:
            name = f"{family}-S/2"
            model = build_model(family, "S", backend, kw)
            train, cfg, loss = step_fns(model, family)
            picked = chosen_backends(lambda: (train(), cfg()))
            dynamo.reset()
            try:
                ctrain = torch.compile(loss, fullgraph=True, backend=compiler)
                ccfg = torch.compile(model.forward_with_cfg, fullgraph=True, backend=compiler)
                want = {"train": _train_result(model, train, loss), "cfg sample": [cfg()]}
                got, first = {}, {}
                t0 = time.perf_counter()
                got["train"] = _train_result(model, train, ctrain)
                first["train"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                got["cfg sample"] = [cfg(ccfg)]
                first["cfg sample"] = time.perf_counter() - t0
                times = interleaved({("train", "eager"): lambda: train(loss), ("train", "compiled"): lambda: train(ctrain),
                                     ("cfg sample", "eager"): cfg, ("cfg sample", "compiled"): lambda: cfg(ccfg)},
                                    rounds, 1)
            finally:
                dynamo.reset()
            for step in ("train", "cfg sample"):
                e, c = times[(step, "eager")], times[(step, "compiled")]
                diff, same = _max_diff(got[step], want[step])
                rows.append({"_key": [name, step, backend], "model": name, "step": step, "backend": backend,
                             "picked": picked, "compile_s": first[step], "eager_ms": e["us"] / 1e3,
                             "compiled_ms": c["us"] / 1e3, "ratio": c["us"] / e["us"], "same": same,
                             "max_diff": diff, "spread": f"{e['spread'] or 0:.2f}, {c['spread'] or 0:.2f}"})
    if record:
        _record_rows(SECTION_COMPILED, TITLE_COMPILED, COMPILED_COLUMNS, _compiled_notes(rounds, overrides, cache),
                     summarize_compiled, rows)
    return rows


def inductor_cache_state() -> str:
    """Whether Inductor's on-disk cache (``TORCHINDUCTOR_CACHE_DIR``) held anything before the
    compiled part: the first compiled calls time cold compiles only when it was empty."""
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        entries = len(os.listdir(cache_dir()))  # cache_dir() creates the folder when it is missing
    except (ImportError, OSError) as exc:
        return f"Inductor's cache not read ({type(exc).__name__}): compile seconds may include cache hits"
    if entries == 0:
        return "Inductor's on-disk cache empty at the start: the first compiled calls are cold compiles"
    return (f"Inductor's on-disk cache held {entries} entr{'y' if entries == 1 else 'ies'} at the start: the "
            "first compiled calls may be cache hits, not cold compiles (an empty TORCHINDUCTOR_CACHE_DIR times those)")


def _compiled_notes(rounds: int, overrides, cache: str) -> List[str]:
    tiny = overrides is TINY_MODELS
    models = ("TINY_MODELS: EDT-S/2 one block per stage at widths 16-24-32-24-16, 2 heads, AMM in block 4; "
              "MDTv2-S/2 depth 4, width 16, 2 heads, decode_layer 2; input 8 x 8 x 4 (16 tokens), 10 classes"
              if tiny else "the models given" if overrides else
              "edt.digits.DIGITS_MODELS at their digits input: "
              + "; ".join(f"{f}-S/2 {digits_config(f)}" for f in FAMILIES))
    return [f"models: {models}; batch {BATCH}; float32, torch CPU threads as run (1 by default).",
            "train = DiffusionTrainingLoss (both passes, the loss) + backward, no optimizer step; cfg sample = "
            "one forward_with_cfg on a [cond, uncond] batch; the same inputs and draws as the model section.",
            "compiled = torch.compile(fullgraph=True), mode default (Inductor, C++ code on the CPU); first "
            "compiled call: Dynamo + Inductor for the forward and (train) the backward, plus one step; "
            "backend auto: the edt_kernels ops choose as listed (no Triton here: kernels run for real, not "
            f"recorded); backend eager: the authors' code path. {cache}.",
            f"ms / step: median of {rounds} interleaved rounds of one step (eager and compiled alternate); "
            "compiled = eager: losses and every parameter gradient (train) or the output (cfg) within the "
            "float32 gradient tolerance of tests/tolerances.py."]


def summarize_compiled(sec: U.Section) -> List[Dict]:
    t = []
    for step in ("train", "cfg sample"):
        rs = [r for r in sec.rows if r.get("step") == step and r.get("ratio") is not None]
        if rs:
            v = max(r["ratio"] for r in rs)
            t.append({"target": f"compiled {step} step no slower than eager on this CPU (max compiled / eager)",
                      "value": v, "met": v <= 1.0})
    rs = [r for r in sec.rows if r.get("same") is not None]
    if rs:
        n = sum(1 for r in rs if r["same"])
        t.append({"target": "compiled results equal eager's (rows)", "value": f"{n} of {len(rs)}",
                  "met": n == len(rs)})
    return [{"title": "Targets (compiled steps on this CPU)", "kind": "targets",
             "columns": [["target", "target"], ["value", "measured"], ["met", "met"]], "rows": t}]


# ----------------------------------------------------------------------------- pytest entry + main

def _in_subprocess(args: Sequence[str]) -> int:
    env = dict(os.environ, TRITON_INTERPRET="1")
    return subprocess.run([sys.executable, "-m", "benchmarks.test_bench_host", *args], env=env,
                          cwd=str(U.REPO_ROOT)).returncode


def test_host_cost(benchmark):
    """The whole instrument; in a subprocess when this process did not start Triton's interpreter."""
    benchmark.group = "host cost"
    if interpreting() or U.IS_CUDA:
        benchmark.pedantic(lambda: (run_ops(), run_models()), rounds=1, iterations=1)
    else:
        assert benchmark.pedantic(_in_subprocess, args=([],), rounds=1, iterations=1) == 0


def _record_error(errors: List[str], section: tuple, model: str, exc: Exception) -> None:
    """``exc`` of ``model`` in ``errors`` (the exit status) and as the model's row of ``section``
    (name, title, columns, summarize)."""
    name, title, columns, summarize = section
    errors.append(f"{model}: {type(exc).__name__}: {exc}")
    U.section(name, title, columns, summarize=summarize)
    U.record(name, {"_key": [model], "model": model, "note": f"ERROR: {type(exc).__name__}: {exc}"})


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = U.base_parser("host cost per op call and per model step")
    p.add_argument("--parts", nargs="*", default=["ops", "models"], choices=("ops", "models", "compiled"),
                   help="compiled (opt-in, minutes of Inductor): eager vs torch.compile step times; "
                        "alone, as its kernels run for real instead of recorded")
    p.add_argument("--sizes", nargs="*", default=list(SIZES), choices=SIZES)
    p.add_argument("--families", nargs="*", default=list(FAMILIES), choices=FAMILIES)
    p.add_argument("--rounds", type=int, default=9, help="interleaved rounds (ops; models use max(3, rounds // 2))")
    p.add_argument("--inner", type=int, default=20, help="calls per case per round (ops)")
    p.add_argument("--compile-steps", type=int, default=3, help="steps under Dynamo per model step (0: skip)")
    p.add_argument("--compiled-models", default="digits", choices=("digits", "tiny"),
                   help="compiled part: edt.digits.DIGITS_MODELS, or TINY_MODELS (Inductor in minutes)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: the host side alone)")
    args = U.parse_main_args(p, argv)
    if "compiled" in args.parts and len(args.parts) > 1:
        p.error("--parts compiled runs alone (its kernels run for real; the others record Triton launches)")
    if "compiled" in args.parts and interpreting():
        p.error("--parts compiled times the kernels themselves: run it without TRITON_INTERPRET=1")
    if "compiled" not in args.parts and not U.IS_CUDA and "triton" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(args.threads)
    errors = []
    if "ops" in args.parts:
        rows = run_ops(args.rounds, args.inner)
        for r in rows:
            print(f"{r['case']:32s} {r['mode']:8s} {r['path']:18s} {r.get('us', float('nan')):9.1f} us "
                  f"{r.get('launches', '-')!s:>4} launches {r.get('syncs', '-')!s:>3} syncs", flush=True)
    if "models" in args.parts:
        for size in args.sizes:
            for fam in args.families:
                try:
                    for r in run_models([fam], [size], max(3, args.rounds // 2), args.compile_steps):
                        print(f"{r['model']:12s} {r['step']:10s} {r['path']:18s} {r['ms']:8.1f} ms "
                              f"{r['launches']:6d} launches {r['syncs']:3d} syncs "
                              f"graphs {r.get('graphs', '-')} breaks {r.get('graph_breaks', '-')} "
                              f"recompiles {r.get('recompiles', '-')}", flush=True)
                except Exception as exc:  # noqa: BLE001 - reported, exit status non-zero
                    _record_error(errors, (SECTION_MODELS, TITLE_MODELS, MODEL_COLUMNS, summarize_models),
                                  f"{fam}-{size}/2", exc)
    if "compiled" in args.parts:
        cache = inductor_cache_state()  # before the first family compiles into it
        for fam in args.families:
            try:
                for r in run_compiled([fam], rounds=max(3, args.rounds // 2), cache=cache,
                                      overrides=TINY_MODELS if args.compiled_models == "tiny" else None):
                    print(f"{r['model']:12s} {r['step']:10s} {r['backend']:5s} compile {r['compile_s']:7.1f} s "
                          f"eager {r['eager_ms']:8.1f} ms compiled {r['compiled_ms']:8.1f} ms "
                          f"ratio {r['ratio']:.2f} same {r['same']}", flush=True)
            except Exception as exc:  # noqa: BLE001 - reported, exit status non-zero
                _record_error(errors, (SECTION_COMPILED, TITLE_COMPILED, COMPILED_COLUMNS, summarize_compiled),
                              f"{fam}-S/2", exc)
    return U.finish_main(args, [SECTION_OPS, SECTION_MODELS, SECTION_COMPILED], errors)


if __name__ == "__main__":
    sys.exit(main())
