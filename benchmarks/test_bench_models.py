"""EDT vs MDTv2: training and inference speed, side by side with the paper.

    pytest benchmarks/test_bench_models.py --benchmark-only
    python -m benchmarks.test_bench_models --sizes S B --metrics train infer

The paper (EDT, Chen et al. 2024, speed table): EDT-S, -B, -XL train 3.93x, 2.84x, 1.92x and infer 2.29x,
2.29x, 2.22x faster than MDTv2-S, -B, -XL.  This module measures, in one
process on one device and precision, for each size and four columns:

* ``EDT eager``   - ``EDT(backend="eager")``: the authors' eager code path,
* ``MDTv2 eager`` - ``MDTv2(backend="eager")``: likewise (materialised masked bias),
* ``EDT kernels`` - ``EDT(backend="auto")``: the same model on edt_kernels,
* ``MDTv2 kernels`` - ``MDTv2(backend="auto")``,
* optionally (``EDT_BENCH_COMPILE=1`` / ``--compile``) each kernels model under
  ``torch.compile``,

three metrics:

* ``train``: one optimisation step of the published recipe, images/s.  EDT:
  loss(full forward) + loss(down-masked forward) on the same noised batch;
  MDTv2: loss(full) + loss(input-masked, mask ratio 0.3 + 0.2 U) on an
  independently noised copy (``edt.train.DiffusionTrainingLoss``, the code the
  training script runs); backward; AdamW step.  bfloat16 autocast on CUDA.
  EMA is not included (the same cost per parameter for both).
* ``infer``: one denoising step, ``forward_with_cfg`` on a [cond, uncond] batch
  (eval mode: EDT applies AMM at its published blocks), images/s counted as
  the cond half.
* ``sample``: end-to-end respaced DDPM sampling (250 steps on CUDA) with CFG,
  images/s.

and per model: parameters, GFLOPs (the authors' counter ``model.get_flops()``,
batch-1 multiply-accumulates as the papers quote them, and a measured count of
the same forward with ``torch.utils.flop_counter`` via
``edt.models.measured_macs``), and peak memory.

Fairness rules:

1. Warm-up excluded (compilation, cuDNN/cuBLAS autotuning, allocator growth).
2. CUDA events around each synchronised call (``time.perf_counter`` on CPU).
3. The median of the repeats is reported.
4. Inputs are rotated (several batches of latents, labels, timesteps and noise),
   so that no call re-reads a batch that is still in cache.
5. The same batch size, dtype, autocast and device for both models.
6. No model gets an optimisation the other could use but does not: the eager
   columns are both the authors' code paths, the kernels columns give both
   models the same fused kernels (and the compile columns the same compiler).

On a CPU-only machine only the S models run, at batch 2 with 3 sampling
steps (``EDT_BENCH_SAMPLE_STEPS`` overrides), in float32, and every figure is
labelled CPU: a CPU ratio is not the paper's GPU claim (its balance of matmul
vs memory-bound work is different).  ``EDT_BENCH_SAMPLE_STEPS`` also shortens
the CUDA sampling run where time is short.
"""
from __future__ import annotations

import contextlib
import gc
import os
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import pytest
import torch

from benchmarks import harness as U

SECTION = "models"
PAPER = {"train": {"S": 3.93, "B": 2.84, "XL": 1.92}, "infer": {"S": 2.29, "B": 2.29, "XL": 2.22}}
METRICS = ("train", "infer", "sample")
FAMILIES = ("EDT", "MDTv2")
CFG_SCALE = 1.5  # any value > 1 takes the guided path; the value does not change the cost


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name, "")
    return int(v) if v.strip() else default


SIZES = ("S",) if U.SMALL else ("S", "B", "XL")
# Same batch for both models of a size (rule 5).  CUDA: a batch that fits an
# 80 GB GPU for MDTv2 training under bf16 autocast.
TRAIN_BATCH = {"S": 2, "B": 2, "XL": 2} if U.SMALL else {"S": 128, "B": 64, "XL": 32}
INFER_BATCH = {"S": 2, "B": 2, "XL": 2} if U.SMALL else {"S": 32, "B": 32, "XL": 32}
SAMPLE_STEPS = _env_int("EDT_BENCH_SAMPLE_STEPS", 3 if U.SMALL else 250)
COMPILE = os.environ.get("EDT_BENCH_COMPILE", "0") == "1"


@dataclass(frozen=True)
class Column:
    family: str  # "EDT" | "MDTv2"
    variant: str  # "eager" | "kernels" | "compile"

    @property
    def name(self) -> str:
        return f"{self.family} {self.variant}"

    @property
    def backend(self) -> str:
        """The models' backend: the authors' code path, or the kernels."""
        return _backend(self.variant)


def _backend(variant: str) -> str:
    from edt.models.common import EAGER

    return EAGER if variant == "eager" else "auto"


def columns(compile_: bool = COMPILE) -> List[Column]:
    variants = ["eager", "kernels"] + (["compile"] if compile_ else [])
    return [Column(f, v) for v in variants for f in FAMILIES]


def model_name(family: str, size: str) -> str:
    return f"EDT-{size}/2" if family == "EDT" else f"MDTv2-{size}/2"


def iters(metric: str) -> Tuple[int, int]:
    """(warm-up, repeats) per metric and device."""
    # sample: no warm-up run of the whole loop; make_sample warms the model up
    # with two guided forwards instead (a 250-step warm-up run would double the cost).
    if U.DEVICE.type == "cuda":
        return {"train": (3, 10), "infer": (3, 20), "sample": (0, 2)}[metric]
    return {"train": (1, 2), "infer": (1, 3), "sample": (0, 2)}[metric]


# ----------------------------------------------------------------------------- models

_CACHE: Dict[Tuple, object] = {}


@dataclass
class Built:
    model: torch.nn.Module
    runner: Callable  # the (maybe compiled) module that is called
    optimizer: Optional[torch.optim.Optimizer] = None
    loss: Optional[torch.nn.Module] = None


def build(family: str, size: str, variant: str, *, device=None, overrides: Optional[dict] = None) -> Built:
    """The model of a column, cached while the same (family, size, variant) is asked for."""
    from edt.models import EDT_models, MDTv2_models

    device = U.DEVICE if device is None else torch.device(device)
    key = (family, size, variant, str(device), tuple(sorted((overrides or {}).items())))
    if key in _CACHE:
        return _CACHE[key]
    _CACHE.clear()
    gc.collect()  # free the previous column's model and optimizer state first
    if device.type == "cuda":
        torch.cuda.empty_cache()
    factory = (EDT_models if family == "EDT" else MDTv2_models)[model_name(family, size)]
    torch.manual_seed(0)
    with torch.device(device):
        model = factory(backend=_backend(variant), **(overrides or {}))
    runner = model
    if variant == "compile":
        U.configure_compile()
        runner = torch.compile(model)
    built = Built(model, runner)
    _CACHE[key] = built
    return built


def model_stats(family: str, size: str, *, overrides: Optional[dict] = None) -> Dict:
    """Parameters and GFLOPs (authors' counter and measured), on the meta device."""
    from edt.models import EDT_models, MDTv2_models, measured_macs

    factory = (EDT_models if family == "EDT" else MDTv2_models)[model_name(family, size)]
    with torch.device("meta"):
        model = factory(backend=_backend("eager"), **(overrides or {}))
    out = {"params_M": sum(p.numel() for p in model.parameters()) / 1e6}
    out["gflops_authors"] = model.get_flops() / 1e9 if hasattr(model, "get_flops") else None
    out["gflops_measured"] = measured_macs(model) / 1e9
    return out


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------- the three workloads

class _RecipeLoss(torch.nn.Module):
    """The published two-loss step (full + masked loss), used when ``edt.train`` is not
    importable: EDT masks the SAME noised batch, MDTv2 an independently noised copy."""

    def __init__(self, model, diffusion, strategy: str):
        super().__init__()
        self.model, self.diffusion, self.strategy = model, diffusion, strategy

    def forward(self, x, y, t, noise, noise_masked=None):
        full = self.diffusion.training_losses(self.model, x, t, {"y": y}, noise=noise)["loss"].mean()
        nm = noise if self.strategy == "edt" else noise_masked
        masked = self.diffusion.training_losses(self.model, x, t, {"y": y, "enable_mask": True},
                                                noise=nm)["loss"].mean()
        return torch.stack([full + masked, full.detach(), masked.detach()])


def training_loss(model, diffusion, strategy: str) -> torch.nn.Module:
    """``edt.train.DiffusionTrainingLoss`` (the training script's own step), or
    the equivalent :class:`_RecipeLoss`."""
    try:
        from edt.train import DiffusionTrainingLoss
    except ImportError:
        return _RecipeLoss(model, diffusion, strategy)
    return DiffusionTrainingLoss(model, diffusion, strategy)


def make_train(built: Built, family: str, batch: int, device, n_sets: int, seed: int = 0):
    """fn(x, y, t, noise, noise2) = one optimisation step; and its input sets."""
    from edt.diffusion import create_diffusion

    model = built.model
    model.train()
    if built.loss is None:
        built.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
        built.loss = training_loss(built.runner, create_diffusion(""), "edt" if family == "EDT" else "mdt")
    opt, loss_mod = built.optimizer, built.loss
    g = torch.Generator(device="cpu").manual_seed(seed)
    C, S = model.in_channels, model.input_size
    sets = []
    for _ in range(n_sets):
        x = torch.randn(batch, C, S, S, generator=g)
        sets.append(tuple(a.to(device) for a in (
            x, torch.randint(0, model.num_classes, (batch,), generator=g),
            torch.randint(0, 1000, (batch,), generator=g), torch.randn(x.shape, generator=g),
            torch.randn(x.shape, generator=g))))

    def step(x, y, t, noise, noise2):
        with _autocast(device):
            losses = loss_mod(x, y, t, noise, noise2)
        opt.zero_grad(set_to_none=True)
        losses[0].backward()
        opt.step()
        return losses.detach()
    return step, sets


def make_infer(built: Built, batch: int, device, n_sets: int, seed: int = 1):
    """fn(x2, t2, y2) = one guided denoising step on a [cond, uncond] batch of 2*batch."""
    model = built.model
    model.eval()
    runner = built.runner
    g = torch.Generator(device="cpu").manual_seed(seed)
    C, S = model.in_channels, model.input_size
    sets = []
    for _ in range(n_sets):
        z = torch.randn(batch, C, S, S, generator=g)
        y = torch.randint(0, model.num_classes, (batch,), generator=g)
        t = torch.randint(0, 1000, (1,), generator=g).repeat(2 * batch)
        y2 = torch.cat([y, torch.full_like(y, model.num_classes)])  # second half: the null class
        sets.append(tuple(a.to(device) for a in (torch.cat([z, z]), t, y2)))

    fwd = runner.forward_with_cfg if runner is model else _compiled_cfg(built)

    def step(x2, t2, y2):
        with torch.no_grad(), _autocast(device):
            return fwd(x2, t2, y2, CFG_SCALE)
    return step, sets


def _compiled_cfg(built: Built):
    if not hasattr(built, "_cfg"):
        built._cfg = torch.compile(built.model.forward_with_cfg)
    return built._cfg


def make_sample(built: Built, batch: int, device, n_sets: int, steps: int = SAMPLE_STEPS, seed: int = 2):
    """fn(z2, y2) = respaced DDPM sampling with CFG over ``steps`` steps."""
    from edt.diffusion import create_diffusion

    model = built.model
    model.eval()
    diffusion = create_diffusion(str(steps))
    fwd = built.model.forward_with_cfg if built.runner is model else _compiled_cfg(built)
    g = torch.Generator(device="cpu").manual_seed(seed)
    C, S = model.in_channels, model.input_size
    sets = []
    for _ in range(n_sets):
        z = torch.randn(batch, C, S, S, generator=g)
        y = torch.randint(0, model.num_classes, (batch,), generator=g)
        sets.append((torch.cat([z, z]).to(device), torch.cat([y, torch.full_like(y, model.num_classes)]).to(device)))

    with torch.no_grad(), _autocast(device):  # warm-up, outside the timed runs
        t2 = torch.full((sets[0][0].shape[0],), diffusion.num_timesteps - 1, device=device)
        for _ in range(2):
            diffusion.p_mean_variance(fwd, sets[0][0], t2, clip_denoised=False,
                                      model_kwargs={"y": sets[0][1], "cfg_scale": CFG_SCALE})

    def run(z2, y2):
        with torch.no_grad(), _autocast(device):
            return diffusion.p_sample_loop(fwd, tuple(z2.shape), z2, clip_denoised=False,
                                           model_kwargs={"y": y2, "cfg_scale": CFG_SCALE},
                                           device=device, progress=False)
    return run, sets


# ----------------------------------------------------------------------------- one measurement

ROW_COLUMNS = [("size", "size"), ("metric", "metric"), ("column", "column"), ("model", "model"),
               ("batch", "batch"), ("ms", "ms / call"), ("images_per_s", "images/s"),
               ("mem_mib", "peak MiB"), ("params_M", "params (M)"), ("gflops_authors", "GFLOPs (authors)"),
               ("gflops_measured", "GFLOPs (flop_counter)"), ("spread", "spread"), ("note", "note")]


def _section():
    notes = [f"device: {U.device_name()}; precision: "
             + ("bfloat16 autocast" if U.DEVICE.type == "cuda" else "float32"),
             "fairness: warm-up excluded; CUDA events around each synchronised call (perf_counter on CPU); "
             "median of repeats; rotated inputs; same batch, dtype and device for both models; the "
             "kernels columns give both models the same kernels",
             "train = one optimisation step of the published recipe (EDT: full + down-masked losses on the "
             "same noised batch; MDTv2: full + input-masked losses, mask ratio 0.3 + 0.2 U, on an independently "
             "noised copy; AdamW; no EMA); infer = one forward_with_cfg denoising step (images = the cond half); "
             f"sample = {SAMPLE_STEPS}-step respaced DDPM with CFG",
             "GFLOPs = multiply-accumulates of one batch-1 forward in G, the papers' convention: 'authors' is the "
             "model's get_flops(), 'flop_counter' the matmul/conv MACs counted by torch.utils.flop_counter",
             ("peak MiB (CUDA) = torch.cuda.max_memory_allocated during one call (weights, optimizer state, "
              "activations: everything)" if U.DEVICE.type == "cuda" else U.memory_note())]
    if U.DEVICE.type == "cpu":
        notes.insert(0, U.CPU_NOTE + " A CPU ratio is NOT the paper's GPU claim.")
    return U.section(SECTION, "Models: EDT vs MDTv2, training and inference", ROW_COLUMNS, notes,
                     summarize=summarize)


def _peak(fn, args, device) -> Optional[int]:
    if device.type == "cuda":
        U.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn(*args)
        U.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    return U.peak_memory(fn, args, device)


def run_one(size: str, metric: str, column: Column, *, warmup: Optional[int] = None,
            repeats: Optional[int] = None, benchmark=None, device=None, batch: Optional[int] = None,
            overrides: Optional[dict] = None, sample_steps: Optional[int] = None, n_sets: Optional[int] = None,
            record: bool = True, stats: bool = True) -> Dict:
    """Measure one (size, metric, column); returns (and records) the row."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    device = U.DEVICE if device is None else torch.device(device)
    if record:
        _section()
    w0, r0 = iters(metric)
    warmup = w0 if warmup is None else warmup
    repeats = r0 if repeats is None else repeats
    built = build(column.family, size, column.variant, device=device, overrides=overrides)
    if metric == "train":
        batch = TRAIN_BATCH[size] if batch is None else batch
        fn, sets = make_train(built, column.family, batch, device, n_sets or 3)
    elif metric == "infer":
        batch = INFER_BATCH[size] if batch is None else batch
        fn, sets = make_infer(built, batch, device, n_sets or 3)
    else:
        batch = INFER_BATCH[size] if batch is None else batch
        fn, sets = make_sample(built, batch, device, n_sets or 2,
                               steps=SAMPLE_STEPS if sample_steps is None else sample_steps)
    row = {"_key": [size, metric, column.name], "size": size, "metric": metric, "column": column.name,
           "family": column.family, "variant": column.variant, "model": model_name(column.family, size),
           "batch": batch}
    if metric == "sample":
        row["steps"] = SAMPLE_STEPS if sample_steps is None else sample_steps
    timing = U.measure(fn, sets, warmup=warmup, repeats=repeats, benchmark=benchmark, device=device)
    if timing is None:
        return row
    row.update(timing.summary())
    row["images_per_s"] = batch / timing.median
    row["note"] = ""
    if metric == "sample":  # its peak is one guided step's: see the infer row
        row["mem_mib"] = None
        row["note"] = "peak memory: see infer (not measured on the whole loop)"
    else:
        mem = _peak(fn, sets[0], device)
        row["mem_mib"] = None if mem is None else mem / 2**20
    if stats:
        row.update(model_stats(column.family, size, overrides=overrides))
    if benchmark is not None:
        benchmark.extra_info.update({k: v for k, v in row.items() if not k.startswith("_")})
    if record:
        U.record(SECTION, row)
    return row


# ----------------------------------------------------------------------------- summary

def _ips(rows, size, metric, column) -> Optional[float]:
    for r in rows:
        if (r["size"], r["metric"], r["column"]) == (size, metric, column):
            return r.get("images_per_s")
    return None


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if (a and b) else None


def summarize(sec: U.Section) -> List[Dict]:
    rows = sec.rows
    cpu = U.DEVICE.type == "cpu"
    sizes = [s for s in ("S", "B", "XL") if any(r["size"] == s for r in rows)]
    ratios, gains, models = [], [], []
    for size in sizes:
        for metric in METRICS:
            if not any(r["size"] == size and r["metric"] == metric for r in rows):
                continue
            e = _ratio(_ips(rows, size, metric, "EDT eager"), _ips(rows, size, metric, "MDTv2 eager"))
            k = _ratio(_ips(rows, size, metric, "EDT kernels"), _ips(rows, size, metric, "MDTv2 kernels"))
            h = _ratio(_ips(rows, size, metric, "EDT kernels"), _ips(rows, size, metric, "MDTv2 eager"))
            paper = PAPER.get("infer" if metric == "sample" else metric, {}).get(size)
            ratios.append({"size": size, "metric": metric, "paper": paper, "eager": e, "kernels": k,
                           "headline": h, "at_least_paper": None if (cpu or U.SMALL or e is None or paper is None)
                           else bool(e >= paper)})
            for fam in FAMILIES:
                gains.append({"size": size, "metric": metric, "model": model_name(fam, size),
                              "gain": _ratio(_ips(rows, size, metric, f"{fam} kernels"),
                                             _ips(rows, size, metric, f"{fam} eager")),
                              "compile_gain": _ratio(_ips(rows, size, metric, f"{fam} compile"),
                                                     _ips(rows, size, metric, f"{fam} eager"))})
        for fam in FAMILIES:
            r0 = next((r for r in rows if r["size"] == size and r["family"] == fam and "params_M" in r), None)
            if r0 is None:
                continue
            mem = {m: next((r.get("mem_mib") for r in rows if r["size"] == size and r["metric"] == m
                            and r["column"] == f"{fam} eager"), None) for m in ("train", "infer")}
            memk = {m: next((r.get("mem_mib") for r in rows if r["size"] == size and r["metric"] == m
                             and r["column"] == f"{fam} kernels"), None) for m in ("train", "infer")}
            models.append({"model": model_name(fam, size), "params_M": r0["params_M"],
                           "gflops_authors": r0.get("gflops_authors"), "gflops_measured": r0.get("gflops_measured"),
                           "mem_train_eager": mem["train"], "mem_train_kernels": memk["train"],
                           "mem_infer_eager": mem["infer"], "mem_infer_kernels": memk["infer"]})
    where = "CPU (small batch, float32)" if cpu else U.device_name()
    rnotes = [f"measured on {where}; ratio = EDT images/s / MDTv2 images/s at the same batch",
              "eager = both models on the authors' code paths (the paper's setting); kernels = both on "
              "edt_kernels; headline = EDT on edt_kernels vs published-style MDTv2 (eager)",
              "the paper gives no separate sampling ratio: its inference ratio is shown for 'sample' too"]
    if cpu:
        rnotes.insert(0, "CPU ratios are NOT the paper's GPU claims: a CPU spends its time differently "
                         "(no tensor cores, different balance of matmuls and memory-bound work).")
    tables = [
        {"title": "EDT / MDTv2 speed-up vs the paper", "kind": "ratios", "notes": rnotes,
         "columns": [["size", "size"], ["metric", "metric"], ["paper", "paper (GPU)"],
                     ["eager", "measured, eager"], ["kernels", "measured, edt_kernels"],
                     ["headline", "EDT kernels / MDTv2 eager"], ["at_least_paper", "eager >= paper"]],
         "rows": ratios},
        {"title": "Kernel gain per model (kernels images/s / eager images/s)", "kind": "gains",
         "notes": ["target (H100, bf16): EDT-XL train gain >= 1.25"] + (
             ["compile_gain: torch.compile'd kernels model / eager"] if COMPILE else []),
         "columns": [["size", "size"], ["metric", "metric"], ["model", "model"], ["gain", "kernel gain"]]
         + ([["compile_gain", "compile gain"]] if COMPILE else []), "rows": gains},
        {"title": "Model size, operations and peak memory", "kind": "models",
         "notes": ["GFLOPs: batch-1 forward multiply-accumulates (authors' get_flops() and torch.utils.flop_counter)",
                   "peak MiB: " + ("max allocated during one call (everything)" if not cpu
                                   else "rise of peak RSS over one call (CPU)")],
         "columns": [["model", "model"], ["params_M", "params (M)"], ["gflops_authors", "GFLOPs (authors)"],
                     ["gflops_measured", "GFLOPs (flop_counter)"], ["mem_train_eager", "train MiB eager"],
                     ["mem_train_kernels", "train MiB kernels"], ["mem_infer_eager", "infer MiB eager"],
                     ["mem_infer_kernels", "infer MiB kernels"]],
         "rows": models},
    ]
    return tables


# ----------------------------------------------------------------------------- pytest entry

PARAMS = [pytest.param(s, m, c, id=f"{s}-{c.name.replace(' ', '_')}-{m}")
          for s in SIZES for c in columns() for m in METRICS]


@pytest.mark.parametrize("size,metric,column", PARAMS)
def test_models(benchmark, size, metric, column):
    benchmark.group = f"models {size} {metric}"
    row = run_one(size, metric, column, benchmark=benchmark)
    if "images_per_s" in row:
        assert row["images_per_s"] > 0, row


# ----------------------------------------------------------------------------- main

def main(argv: Optional[Sequence[str]] = None) -> int:
    p = U.base_parser("EDT vs MDTv2 training/inference benchmarks")
    p.add_argument("--sizes", nargs="*", default=list(SIZES), choices=("S", "B", "XL"))
    p.add_argument("--metrics", nargs="*", default=list(METRICS), choices=METRICS)
    p.add_argument("--compile", action="store_true", help="add torch.compile'd kernels columns")
    p.add_argument("--batch", type=int, default=None, help="override the batch of every metric")
    p.add_argument("--sample-steps", type=int, default=None, help=f"sampling steps (default {SAMPLE_STEPS})")
    args = U.parse_main_args(p, argv)
    errors = []
    for size in args.sizes:
        for col in columns(args.compile or COMPILE):
            for metric in args.metrics:
                try:
                    row = run_one(size, metric, col, warmup=args.warmup, repeats=args.repeats, batch=args.batch,
                                  sample_steps=args.sample_steps)
                    print(f"{size:3s} {metric:7s} {col.name:16s} {row.get('images_per_s', float('nan')):10.2f} img/s",
                          flush=True)
                except Exception as exc:  # noqa: BLE001 - reported, exit status non-zero
                    errors.append(f"{size} {metric} {col.name}: {type(exc).__name__}: {exc}")
                    U.record(SECTION, {"_key": [size, metric, col.name], "size": size, "metric": metric,
                                       "column": col.name, "family": col.family, "variant": col.variant,
                                       "note": f"ERROR: {type(exc).__name__}: {exc}"})
    return U.finish_main(args, [SECTION], errors)


if __name__ == "__main__":
    sys.exit(main())
