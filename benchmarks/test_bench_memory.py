"""Training memory: what one optimisation step keeps for its backward, its
peak memory and its time, for EDT and MDTv2 on the authors' eager path, on
edt_kernels, compiled, and under each activation-checkpointing setting.

    pytest benchmarks/test_bench_memory.py --benchmark-only
    python -m benchmarks.test_bench_memory --sizes S B XL --compile

One step = the training script's loss (``edt.train.DiffusionTrainingLoss``:
the full pass and the masked pass, as ``benchmarks.test_bench_models``
runs it), backward, AdamW.  Per (model, column):

* ``activation MiB``: bytes of the unique storages saved for backward during
  the step's forward (both passes), recorded by
  ``torch.autograd.graph.saved_tensors_hooks``; parameters (and views of them)
  are excluded, a storage saved several times (q/k/v views of one qkv tensor,
  the same input saved by two ops) counts once.  The inputs a checkpointed
  block keeps are counted (PyTorch's non-reentrant checkpoint saves them
  through the same hooks); what is recomputed in the backward is not;
* ``peak MiB``: CUDA: ``torch.cuda.max_memory_allocated`` over the step minus
  what was allocated before it; CPU: the rise of peak RSS over the step
  (``benchmarks.harness.peak_memory``);
* ``ms / step``: median of ``--repeats`` timed steps, after one warm-up step
  (which also creates AdamW's state) and the measured step (its hooks cost
  time: it is not timed); ``time x kernels``: its ratio to the unchecked
  kernels model's step.  A checkpointed column times its steps in turn with
  those of an unchecked twin (``twin ms``: the kernels model, same batch), so
  that a change of machine load during the measurement falls on both alike,
  and its ratio is to the twin's median.

The compiled columns (``--compile``: ``compile``, ``compile ckpt=all``) run
the training loss under ``torch.compile(fullgraph=True)`` with the random
draws made ahead (as ``edt.train`` compiles its step), through
:func:`partition_backend`: the forward/backward partition Inductor would
make (its decompositions, joint-graph passes and min-cut rematerialisation
partitioner), its two graphs run as they are, without code generation.  What
they save for the backward is what an Inductor-compiled step saves (the
compiled region's saved tensors go through ``ctx.save_for_backward``, so the
same hooks count them); their peak and time are not Inductor's and are not
reported.

Batch 4, 32x32 latents (256 px images), float32 everywhere (no autocast):
the figures are per step of that batch, and ``per image`` divides by 4.
"""
from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import pytest
import torch

from benchmarks import harness as U
from benchmarks import test_bench_models as BM

SECTION = "memory"
BATCH = 4
SIZES = ("S",) if U.SMALL else ("S", "B", "XL")
FAMILIES = ("EDT", "MDTv2")
CHECKPOINTS = ("all", 2, "selective")
MIB = 2 ** 20


@dataclass(frozen=True)
class Column:
    variant: str  # "eager" | "kernels" | "compile"
    checkpoint: object = None

    @property
    def name(self) -> str:
        return self.variant + ("" if self.checkpoint is None else f" ckpt={self.checkpoint}")

    @property
    def compiled(self) -> bool:
        return self.variant == "compile"


def columns(compile_: bool) -> List[Column]:
    cols = [Column("eager"), Column("kernels")] + [Column("kernels", c) for c in CHECKPOINTS]
    return cols + ([Column("compile"), Column("compile", "all")] if compile_ else [])


COMPILE_NOTE = ("torch.compile's partition measured without Inductor's code generation (partition_backend): "
                "the bytes an Inductor-compiled step keeps; no peak, no time (its graphs run op by op here, "
                "neither would be Inductor's)")


def partition_backend(saved: Optional[list] = None):
    """A ``torch.compile`` backend that splits the training graph into forward
    and backward exactly as Inductor does (its pre-grad passes, AOTAutograd
    with its decompositions, its joint-graph passes and the min-cut
    rematerialisation partitioner: ``torch._inductor.compile_fx.partition_fn``)
    and runs both graphs as they are, generating no code.  The tensors the
    forward saves for the backward are Inductor's; the time is not.
    ``saved``: a list that gets, per backward graph, the (shape, dtype) of
    each tensor it takes from the forward (its inputs but the incoming
    gradients; a symbolic size as its value when traced)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor import compile_fx as CF

    def as_is(gm, example_inputs):
        return make_boxed_func(gm)

    def backward(gm, example_inputs):
        if saved is not None:
            vals = [n.meta.get("val") for n in gm.graph.nodes
                    if n.op == "placeholder" and not n.name.startswith("tangents")]
            saved.append([(tuple(d if isinstance(d, int) else d.node.hint for d in v.shape), v.dtype)
                          for v in vals if isinstance(v, torch.Tensor)])
        return make_boxed_func(gm)

    partitioned = aot_autograd(fw_compiler=as_is, bw_compiler=backward, partition_fn=CF.partition_fn,
                               decompositions=CF.select_decomp_table())

    def backend(gm, example_inputs):
        return partitioned(CF._recursive_pre_grad_passes(gm, example_inputs), example_inputs)  # noqa: SLF001

    return backend


def _compiled_loss(loss_mod, batch: int, device):
    """fn(x, y, t, noise, noise2) = the training loss compiled whole by
    :func:`partition_backend`, its random draws made ahead from the global RNG
    (the draws the uncompiled forward makes after the same seed).  Dynamo's
    caches are cleared first: the model is compiled afresh with static shapes,
    as a training job compiles its one model (after other models' columns
    Dynamo would otherwise mark the changed sizes dynamic)."""
    torch._dynamo.reset()  # noqa: SLF001
    U.configure_compile()
    compiled = torch.compile(loss_mod, backend=partition_backend(), fullgraph=True)

    def fn(*inputs):
        return compiled(*inputs, draws=loss_mod.draw_ahead(inputs[0].shape[0], None, inputs[0].device))
    return fn


@contextlib.contextmanager
def _selective_caches():
    """The caches of selective checkpointing created while inside: the outputs
    it keeps (matmuls, attention) live there, not in autograd's saved tensors."""
    from edt.models import checkpointing as CK

    caches, make = [], CK._selective_contexts  # noqa: SLF001 - the instrument reads what it keeps

    def recording():
        forward_ctx, recompute_ctx = make()
        caches.append(forward_ctx.storage)
        return forward_ctx, recompute_ctx

    CK._selective_contexts = recording  # noqa: SLF001
    try:
        yield caches
    finally:
        CK._selective_contexts = make  # noqa: SLF001


def saved_activation_bytes(fn, params: Sequence[torch.Tensor]):
    """``(fn()``, bytes of the unique non-parameter storages kept for backward
    while it ran: saved by autograd, or cached by selective checkpointing)."""
    from torch.utils._pytree import tree_leaves

    param_storages = {p.untyped_storage()._cdata for p in params}  # storage identity (fake tensors too)
    seen: Dict[int, int] = {}

    def add(t: torch.Tensor):
        s = t.untyped_storage()
        if s._cdata not in param_storages:
            seen[s._cdata] = max(seen.get(s._cdata, 0), s.nbytes())
        return t

    with _selective_caches() as caches, torch.autograd.graph.saved_tensors_hooks(add, lambda t: t):
        out = fn()
    for cache in caches:  # op -> its outputs (a list or, in newer torch, a dict by call index)
        for leaf in tree_leaves(dict(cache)):
            if isinstance(getattr(leaf, "val", None), torch.Tensor):
                add(leaf.val)
    return out, sum(seen.values())




def _overrides(col: Column, overrides: Optional[dict]) -> dict:
    return dict(overrides or {}, **({} if col.checkpoint is None else {"checkpoint": col.checkpoint}))


def _train_parts(family: str, size: str, col: Column, device, overrides: Optional[dict] = None):
    """The column's model (cached by the models benchmark), AdamW, the training loss and one batch."""
    from edt.diffusion import create_diffusion

    variant = "kernels" if col.compiled else col.variant  # the compiled columns compile its whole loss
    built = BM.build(family, size, variant, device=device, overrides=_overrides(col, overrides))
    model = built.model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    loss_mod = BM.training_loss(built.runner, create_diffusion(""), "edt" if family == "EDT" else "mdt")
    run = _compiled_loss(loss_mod, BATCH, device) if col.compiled else loss_mod
    return model, opt, run, _fixed_inputs(model, device)


def _fixed_inputs(model, device):
    """(x, y, t, noise, noise2) of one batch, drawn from a CPU generator seeded 0."""
    g = torch.Generator(device="cpu").manual_seed(0)
    C, S = model.in_channels, model.input_size
    x = torch.randn(BATCH, C, S, S, generator=g)
    return tuple(a.to(device) for a in (x, torch.randint(0, model.num_classes, (BATCH,), generator=g),
                                        torch.randint(0, 1000, (BATCH,), generator=g),
                                        torch.randn(x.shape, generator=g), torch.randn(x.shape, generator=g)))


def fake_activation_bytes(family: str, size: str, col: Column, overrides: Optional[dict] = None) -> int:
    """The activation bytes of one step's forward computed on fake tensors
    (``FakeTensorMode``: shapes, dtypes and aliasing as in a real run, no data,
    no time): the same ops save the same storages.  MDTv2's masked pass keeps
    a number of tokens that depends on a random draw, which fake tensors do
    not have: it is run at the mean mask ratio (the draw U(0, 1) = 0.5, ratio
    0.3 + 0.2 * 0.5 = 0.4), and the value checks of the token indices (which
    read them) are skipped."""
    from unittest import mock

    from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

    from edt.diffusion import create_diffusion
    from edt.models import EDT_models, MDTv2_models
    from edt.models import mdt as mdt_module
    from edt_kernels import _validation
    from edt_kernels import attention as attention_module

    def mean_draw(shape, generator, device):
        with unset_fake_temporarily():
            return torch.full(tuple(shape), 0.5)

    factory = (EDT_models if family == "EDT" else MDTv2_models)[BM.model_name(family, size)]
    variant = "kernels" if col.compiled else col.variant
    with torch.device("meta"):  # the initialisation needs data; the values do not matter here
        model = factory(backend=BM._backend(variant), **_overrides(col, overrides)).train()  # noqa: SLF001
    with FakeTensorMode(allow_non_fake_inputs=True), mock.patch.object(mdt_module, "uniform", mean_draw), \
            mock.patch.object(attention_module, "_check_positions_range", lambda *args: None), \
            mock.patch.object(_validation, "check_id_values", lambda *args, **kwargs: None):
        model.to_empty(device="cpu")
        loss_mod = BM.training_loss(model, create_diffusion(""), "edt" if family == "EDT" else "mdt")
        run = _compiled_loss(loss_mod, BATCH, "cpu") if col.compiled else loss_mod
        inputs = _fixed_inputs(model, "cpu")
        _, nbytes = saved_activation_bytes(lambda: run(*inputs), list(model.parameters()))
    return nbytes


def _stepper(model, opt, loss_mod, inputs, acts: Optional[dict] = None):
    """step(record=False): one training step (loss, backward, AdamW) on the fixed batch, the same
    masks and label dropout in every step and column; ``record``: the activation bytes its forward
    keeps go to ``acts["bytes"]``."""
    params = list(model.parameters())

    def step(record: bool = False):
        torch.manual_seed(1)
        if record:
            losses, acts["bytes"] = saved_activation_bytes(lambda: loss_mod(*inputs), params)
        else:
            losses = loss_mod(*inputs)
        opt.zero_grad(set_to_none=True)
        losses[0].backward()
        opt.step()
        return losses.detach()
    return step


def _timed(fn, device) -> float:
    U.synchronize(device)
    t0 = time.perf_counter()
    fn()
    U.synchronize(device)
    return time.perf_counter() - t0


def measure_one(family: str, size: str, col: Column, *, repeats: int = 1, device=None,
                bytes_only: bool = False, overrides: Optional[dict] = None) -> Dict:
    """One row: activation bytes, peak, step time (``bytes_only``: the bytes on
    fake tensors); ``overrides``: constructor arguments (tiny test models)."""
    if bytes_only:
        nbytes = fake_activation_bytes(family, size, col, overrides)
        notes = ([COMPILE_NOTE] if col.compiled else []) + ["bytes from fake tensors (no step run: no peak, no time)"]
        return {"_key": [family, size, col.name], "model": BM.model_name(family, size), "family": family,
                "size": size, "column": col.name, "batch": BATCH, "act_mib": nbytes / MIB,
                "act_mib_per_image": nbytes / MIB / BATCH,
                "note": "; ".join(notes + (["masked pass at the mean mask ratio 0.4"] if family == "MDTv2" else []))}
    device = U.DEVICE if device is None else torch.device(device)
    model, opt, loss_mod, inputs = _train_parts(family, size, col, device, overrides)
    acts = {}
    step = _stepper(model, opt, loss_mod, inputs, acts)
    step()  # warm-up: AdamW state, compilation, allocator growth
    row = {"_key": [family, size, col.name], "model": BM.model_name(family, size), "family": family,
           "size": size, "column": col.name, "batch": BATCH}
    if col.compiled:
        step(True)
        row["note"] = COMPILE_NOTE
    else:
        peak = BM._peak(step, (True,), device)  # noqa: SLF001 - the models benchmark's peak, same method
        if device.type == "cuda":
            peak -= torch.cuda.memory_allocated(device)
        # a checkpointed column steps in turn with its unchecked twin (the kernels column's model),
        # so that a change of machine load during the measurement falls on both alike
        twin = None
        if col.checkpoint is not None:
            twin = _stepper(*_train_parts(family, size, Column("kernels"), device, overrides))
            twin()
        times, twin_times = [], []
        for _ in range(max(repeats, 1)):
            times.append(_timed(step, device))
            if twin is not None:
                twin_times.append(_timed(twin, device))
        step_s = U.Timing(times).median
        row.update(peak_mib=None if peak is None else peak / MIB, ms=1e3 * step_s)
        if twin is not None:
            twin_s = U.Timing(twin_times).median
            row.update(twin_ms=1e3 * twin_s, time_ratio=step_s / twin_s)
    row.update(act_mib=acts["bytes"] / MIB, act_mib_per_image=acts["bytes"] / MIB / BATCH)
    del model, opt, loss_mod
    BM._CACHE.clear()  # noqa: SLF001 - free this column's model before the next
    return row


ROW_COLUMNS = [("model", "model"), ("column", "column"), ("act_mib", "activation MiB"),
               ("act_ratio", "x eager"), ("act_mib_per_image", "MiB / image"), ("peak_mib", "peak MiB"),
               ("ms", "ms / step"), ("twin_ms", "twin ms"), ("time_ratio", "time x kernels"), ("note", "note")]


def _section() -> U.Section:
    notes = [f"device: {U.device_name()}; float32, batch {BATCH}, 32x32 latents (256 px); one step = "
             "full + masked training loss, backward, AdamW",
             "activation MiB = unique storages saved for backward during the step's forward (both passes), "
             "parameters excluded (torch.autograd.graph.saved_tensors_hooks); checkpointed blocks count the "
             "inputs they keep",
             ("peak MiB (CUDA) = torch.cuda.max_memory_allocated over one step minus what was allocated "
              "before it" if U.DEVICE.type == "cuda" else U.memory_note()),
             "x eager = activation bytes / the eager column's; ms / step = median of the timed steps; "
             "time x kernels = step time / the unchecked kernels model's: for a checkpointed column, its "
             "twin's (twin ms: the unchecked kernels model, its steps timed in turn with the column's)",
             "compile, compile ckpt=all (with --compile): the kernels model's whole training loss under "
             "torch.compile(fullgraph=True), draws made ahead, split into forward and backward as Inductor "
             "splits it (its pre-grad passes, decompositions, joint-graph passes and min-cut "
             "rematerialisation partitioner) and run without code generation: the bytes its forward saves "
             "for the backward are an Inductor-compiled step's (the hooks see the compiled region's saved "
             "tensors); its peak and step time would not be Inductor's and are not reported"]
    if U.DEVICE.type == "cpu":
        notes.insert(0, U.CPU_NOTE)
    return U.section(SECTION, "Training memory: activations kept for backward, peak, step time",
                     ROW_COLUMNS, notes, summarize=summarize)


#: The issue's targets: activation bytes of the XL models against the eager path, without and with
#: every block checkpointed, and the step time with every block checkpointed against the unchecked one.
TARGET_BYTES, TARGET_BYTES_CKPT, TARGET_TIME_CKPT = 0.65, 0.25, 1.35
#: The computed budget: EDT-XL/2 at 256 px, this many images per GPU, every block checkpointed.
BUDGET_BATCH, BUDGET_GB = 32, 24.0
#: Training bytes per parameter: float32 weights, gradients, AdamW's two moments, the EMA copy.
BYTES_PER_PARAM = 20


def _edt_block_share(size: str) -> float:
    """tokens x width of one first-stage block of EDT-``size`` at 256 px over the sum over all its
    blocks: the share of the unchecked activations one recomputed block holds again."""
    from edt.models.edt import _EDT_CONFIGS

    cfg = _EDT_CONFIGS[size]
    tokens = (32 // cfg["patch_size"]) ** 2
    n = len(cfg["stages_depth"])
    per_stage = [tokens // 4 ** min(i, n - 1 - i) for i in range(n)]  # down-sampled to the middle, back up
    total = sum(d * w * t for d, w, t in zip(cfg["stages_depth"], cfg["dims"], per_stage))
    return per_stage[0] * cfg["dims"][0] / total


def xl_budget(by: Dict) -> Optional[Dict]:
    """The computed memory of an EDT-XL/2 training step at 256 px, ``BUDGET_BATCH`` images, every block
    checkpointed (None without the EDT-XL rows): parameters' training state, the kept activations
    (float32 as measured: an upper bound under bf16), and the recomputed block with its gradients."""
    kern, ckpt = by.get(("EDT-XL/2", "kernels")), by.get(("EDT-XL/2", "kernels ckpt=all"))
    if not (kern and ckpt):
        return None
    from edt.models import EDT_models

    with torch.device("meta"):
        params = sum(p.numel() for p in EDT_models["EDT-XL/2"]().parameters())
    state = BYTES_PER_PARAM * params / 1e9
    kept = BUDGET_BATCH * ckpt["act_mib_per_image"] * MIB / 1e9
    freed = kern["act_mib_per_image"] - ckpt["act_mib_per_image"]
    share = _edt_block_share("XL")
    block = BUDGET_BATCH * share * freed * MIB / 1e9
    unchecked = state + BUDGET_BATCH * kern["act_mib_per_image"] * MIB / 1e9
    return {"params": params, "state_gb": state, "kept_gb": kept, "block_share": share, "block_gb": block,
            "total_gb": state + kept + 2 * block, "unchecked_gb": unchecked}


def summarize(sec: U.Section) -> List[Dict]:
    """The targets, the ratios to the eager and unchecked kernels columns of the same model, and the
    compiled columns against the kernels ones."""
    by = {(r["model"], r["column"]): r for r in sec.rows if "act_mib" in r}
    rows = []
    for r in sec.rows:
        r = dict(r)
        eager, kern = by.get((r.get("model"), "eager")), by.get((r.get("model"), "kernels"))
        if eager and r.get("act_mib") is not None:
            r["act_ratio"] = r["act_mib"] / eager["act_mib"]
        if kern and r.get("ms") is not None and r.get("time_ratio") is None:
            r["time_ratio"] = r["ms"] / kern["ms"]
        rows.append(r)
    ratio = {(r["model"], r["column"]): r for r in rows}
    targets = []
    for col, limit, what in (("kernels", TARGET_BYTES, "without checkpointing"),
                             ("kernels ckpt=all", TARGET_BYTES_CKPT, "every block checkpointed")):
        for model in ("EDT-XL/2", "MDTv2-XL/2"):
            r = ratio.get((model, col))
            if r and r.get("act_ratio") is not None:
                targets.append({"target": f"{model} activation bytes {what} <= {limit}x the authors' eager path",
                                "value": r["act_ratio"], "met": r["act_ratio"] <= limit})
    for (model, col), r in ratio.items():
        if col == "kernels ckpt=all" and r.get("time_ratio") is not None:
            targets.append({"target": f"{model} step time, every block checkpointed, <= {TARGET_TIME_CKPT}x the "
                                      "unchecked step (medians of steps timed in turn)",
                            "value": r["time_ratio"], "met": r["time_ratio"] <= TARGET_TIME_CKPT})
    budget = xl_budget(by)
    if budget:
        targets.append({"target": f"EDT-XL/2, 256 px, batch {BUDGET_BATCH} per GPU, bf16, every block checkpointed, "
                                  f"within {BUDGET_GB:g} GB (COMPUTED from the measured bytes, not measured)",
                        "value": f"{budget['total_gb']:.1f} GB", "met": budget["total_gb"] < BUDGET_GB})
    tables = [{"title": "Targets (training memory)", "kind": "targets",
               "columns": [["target", "target"], ["value", "measured"], ["met", "met"]], "rows": targets}]
    if budget:
        tables[0]["notes"] = [
            f"COMPUTED, not measured: weights + gradients + AdamW moments + EMA (float32) = {BYTES_PER_PARAM} B x "
            f"{budget['params'] / 1e6:.1f} M parameters = {budget['state_gb']:.2f} GB; kept activations "
            f"{BUDGET_BATCH} x {by[('EDT-XL/2', 'kernels ckpt=all')]['act_mib_per_image']:.2f} MiB/image (measured "
            f"here in float32: an upper bound under bf16) = {budget['kept_gb']:.2f} GB; the block recomputed in "
            f"the backward (a first-stage block: {100 * budget['block_share']:.2f}% by tokens x width of what "
            f"checkpointing every block stops keeping) {budget['block_gb']:.2f} GB, and as much again for its "
            f"activation gradients: {budget['total_gb']:.1f} GB. Without checkpointing: "
            f"{budget['unchecked_gb']:.1f} GB (float32 upper bound). benchmarks.gpu_check measures this step's "
            "peak when a GPU runs it"]
    tables.append({"title": "Activation bytes, peak memory and step time", "columns": [list(c) for c in ROW_COLUMNS],
                   "rows": rows})
    compiled = []
    for model in dict.fromkeys(r["model"] for r in rows):
        c, k = by.get((model, "compile")), by.get((model, "kernels"))
        cc, kc = by.get((model, "compile ckpt=all")), by.get((model, "kernels ckpt=all"))
        if c and k:
            compiled.append({"model": model, "ratio": c["act_mib"] / k["act_mib"],
                             "ratio_ckpt": cc["act_mib"] / kc["act_mib"] if cc and kc else None})
    if compiled:
        tables.append({"title": "Compiled (Inductor's partition) against the kernels column, activation bytes",
                       "columns": [["model", "model"], ["ratio", "compile / kernels"],
                                   ["ratio_ckpt", "compile ckpt=all / kernels ckpt=all"]], "rows": compiled})
    return tables


def run_one(family: str, size: str, col: Column, *, repeats: int = 1, bytes_only: bool = False) -> Dict:
    sec = _section()
    try:
        row = measure_one(family, size, col, repeats=repeats, bytes_only=bytes_only)
    except Exception as exc:  # noqa: BLE001 - recorded in the table, re-raised by the caller
        row = {"_key": [family, size, col.name], "model": BM.model_name(family, size), "column": col.name,
               "note": f"ERROR: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
        U.record(sec.name, row)
        raise
    U.record(sec.name, row)
    return row


PARAMS = [pytest.param(f, s, c, id=f"{f}-{s}-{c.name.replace(' ', '_')}")
          for s in SIZES for f in FAMILIES for c in columns(False)]


@pytest.mark.parametrize("family,size,column", PARAMS)
def test_memory(benchmark, family, size, column):
    benchmark.group = f"memory {family}-{size}"
    row = benchmark.pedantic(lambda: run_one(family, size, column), rounds=1, iterations=1)
    assert row["act_mib"] > 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = U.base_parser("training memory of EDT and MDTv2: activation bytes, peak memory, step time")
    p.add_argument("--sizes", nargs="*", default=list(SIZES), choices=("S", "B", "XL"))
    p.add_argument("--families", nargs="*", default=list(FAMILIES), choices=FAMILIES)
    p.add_argument("--compile", action="store_true",
                   help="add the compiled kernels columns (compile, compile ckpt=all): the bytes of the "
                        "partition Inductor makes, measured without its code generation (no peak, no time)")
    p.add_argument("--bytes-only", nargs="*", default=[], choices=("S", "B", "XL"),
                   help="sizes whose activation bytes are computed on fake tensors, without running a step "
                        "(no peak memory, no time): for models too slow to step on this machine")
    args = U.parse_main_args(p, argv)
    errors = []
    for size in args.sizes:
        for family in args.families:
            fake = size in args.bytes_only
            for col in columns(args.compile):
                try:
                    row = run_one(family, size, col, repeats=args.repeats or 1, bytes_only=fake)
                    print(f"{family}-{size} {col.name:24s} act {row['act_mib']:9.1f} MiB  "
                          f"peak {row.get('peak_mib') or float('nan'):9.1f} MiB  "
                          f"{row.get('ms') or float('nan'):9.1f} ms", flush=True)
                except Exception as exc:  # noqa: BLE001 - reported, exit status non-zero
                    errors.append(f"{family}-{size} {col.name}: {type(exc).__name__}: {exc}")
    return U.finish_main(args, [SECTION], errors)


if __name__ == "__main__":
    sys.exit(main())
