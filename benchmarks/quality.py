"""EDT vs MDTv2 on real images, quality against training wall-clock: ``python -m benchmarks.quality``.

    python -m benchmarks.quality                      # the default run (about 15 minutes on 2 cores)
    python -m benchmarks.quality --seeds 0 1 2        # the speed-up's spread over 3 seeds (3x as long)
    python -m benchmarks.quality --minutes 0.05 --evals 1 --num-samples 20 --sampling-steps 4   # smoke

What one run does, for every seed and every model of ``--models`` (the matched tiny
configurations of ``edt.digits.DIGITS_MODELS``, parameters within 10 %):

* trains on the UCI digits' training split (``edt.digits``, 16x16x1) through
  ``edt.train`` itself: its ``--preset digits`` arguments with the model's
  published recipe (``--recipe auto``: EDT's Adan with linear decay and the
  loss-aware timestep sampler and EDT's down-sampling masks; MDTv2's Adan with
  gradient clipping, uniform timesteps and its token masking), its ``setup``,
  data loader and ``train_step`` (driven by ``train_loop`` a few steps at a
  time); same batch, data, seed-derived noise and EMA decay for both models;
* runs the models of one seed side by side, each in its own process with
  ``--threads`` threads (``--jobs`` processes at a time; by default as many as
  the cores hold, so on 2 cores EDT and MDTv2 train at once, one core each:
  the same hardware for the same time, and more steps than sharing 2 threads
  one after the other, which these tiny models barely use);
* stops after ``--minutes`` of training wall-clock (the time inside
  ``train_loop``), keeping a copy of the EMA weights at ``--evals`` regular
  shares of it (the marks), and EDT also at PROBES_PER_MARK times as many
  (the probe points, evaluated only as the claim needs them);
* then evaluates every copy, spread over the same worker processes once all
  training is done (so no training run shares the machine with sampling): the
  EMA weights draw ``--num-samples`` samples, the same number of every class,
  with ``edt.sample.sample_chunk`` (respaced DDPM, ``--sampling-steps`` steps,
  classifier-free guidance ``--cfg-scale`` on the image channel, each model's
  own guidance schedule), clipped to [-1, 1] as pixels are, judged by the
  digits judge: FD-digits against the held-out split and the class accuracy;
* writes ``OUT/quality.json`` and ``OUT/quality.md`` (device, versions, commit,
  date, machine load), ``OUT/curves.png`` (FD and class accuracy against
  seconds and steps) and ``OUT/samples-<model>-seed<s>.png`` (the last
  evaluation's samples, one row per class).

The claim tested (EDT paper: a faster-training, lower-FID model than MDTv2):
per seed, the training time EDT needs to reach MDTv2's final FD-digits, divided
into the time MDTv2 needs to reach it; reported per seed and as median and
range over the seeds. Once every mark is evaluated, ``--probes`` more EDT
evaluations bisect (in log time) the probe points between EDT's last
evaluation above the target and its first at or below it; the time is
interpolated linearly in FD between those two, and the bracket they leave is
reported with it.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import pathlib
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from edt import digits as D
from edt import train as T
from edt.cli import ArgumentParser
from edt.diffusion import create_diffusion
from edt.sample import model_steps, sample_chunk
from edt.utils import latents_to_uint8, make_grid, progress_bar, write_png

from . import harness as U

DEFAULT_OUT = U.LOCAL_RESULTS_DIR / "quality"
#: Steps between two looks at the clock (one ``train_loop`` call).
CHUNK_STEPS = 10
#: Samples per sampling chunk (a guided forward runs twice as many): on one CPU thread the digits
#: models' forward costs 25-30 % less per sample at a batch of 100 than of 200 (cache-resident).
SAMPLE_CHUNK = 50
#: EDT's probe points per interval between two marks (EMA copies kept for the bisection).
PROBES_PER_MARK = 8
#: Worker tasks per evaluation (each draws a share of its chunks; the parent judges the whole).
EVAL_PARTS = 4
#: Seconds between a worker's looks at whether the benchmark process is still there.
PARENT_POLL_S = 0.5
#: The digits' data split and judge: seed 0 for every run (the training seeds vary).
DATA_SEED = 0


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = ArgumentParser("python -m benchmarks.quality", __doc__)
    p.add_argument("--minutes", type=float, default=9.0, help="training wall-clock per model and seed")
    p.add_argument("--models", nargs="+", default=list(D.DIGITS_MODELS), choices=list(D.DIGITS_MODELS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="training seeds (weights, data order, noise)")
    p.add_argument("--evals", type=int, default=3, help="evaluations per run, at equal shares of --minutes")
    p.add_argument("--probes", type=int, default=2,
                   help="EDT evaluations after the marks, bisecting its kept EMA copies for the time it reaches "
                        "MDTv2's final FD (0: the marks only)")
    p.add_argument("--num-samples", type=int, default=1000,
                   help="samples per evaluation (classes cycled); FD-digits of fewer is biased upwards")
    p.add_argument("--sampling-steps", type=int, default=40, help="respaced DDPM steps")
    p.add_argument("--cfg-scale", type=float, default=2.0, help="classifier-free guidance scale")
    p.add_argument("--batch-size", type=int, default=64, help="training batch (both models)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads of each run")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs at once, each in its own process (default: cores // threads, at most the "
                        "number of models; 1: one after the other in this process)")
    p.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="where the JSON, markdown and PNGs go")
    p.add_argument("--cache-dir", default=None, help="data folder and judge cache (default: edt.digits.cache_dir)")
    p.add_argument("--combine", nargs="+", type=pathlib.Path, default=None, metavar="DIR",
                   help="train nothing: merge the quality.json of earlier runs with the same settings but "
                        "other seeds (e.g. the default run and a --seeds 1 2 run) into one report in --out")
    args = p.parse_args(argv)
    if not args.minutes > 0:
        p.error(f"--minutes must be > 0, got {args.minutes}")
    for name in ("evals", "num_samples", "sampling_steps", "batch_size", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.probes < 0:
        p.error(f"--probes must be >= 0, got {args.probes}")
    if args.jobs is not None and args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.jobs is None:
        args.jobs = max(1, min(len(args.models), (os.cpu_count() or 1) // args.threads))
    if args.num_samples < 2:
        p.error("--num-samples must be >= 2 (a Fréchet distance needs a covariance)")
    return args


# ---------------------------------------------------------------------------
# Sampling and judging
# ---------------------------------------------------------------------------

@torch.no_grad()
def draw_samples(model, n: int, steps: int, cfg_scale: float, seed: int, batch: int = SAMPLE_CHUNK,
                 chunks: Optional[Tuple[int, int]] = None):
    """(float32 [m, 1, S, S] clipped to [-1, 1] as pixels are, labels int64 [m]): ``n`` samples,
    classes 0..9 cycled, through edt.sample's chunk sampler (the noise of chunk c seeded by (seed, c));
    ``chunks``: only the chunks ``first <= c < stop`` of them (a chunk's samples are the same
    whichever call draws it)."""
    diffusion = create_diffusion(str(steps))
    sargs = argparse.Namespace(seed=seed, cfg_scale=cfg_scale, ddim=False, eta=0.0, mixed_precision="no")
    labels = torch.arange(n) % D.NUM_CLASSES
    first, stop = chunks if chunks is not None else (0, -(-n // batch))
    model.eval()
    step_fns = model_steps(model, "none", torch.device("cpu"))
    out = [sample_chunk(step_fns, diffusion, lambda z: z.clamp(-1, 1).cpu(), sargs, labels[c * batch:(c + 1) * batch],
                        c, model.in_channels, model.input_size, D.NUM_CLASSES, torch.device("cpu"))
           for c in range(first, stop)]
    return torch.cat(out), labels[first * batch:stop * batch]


def sample_grid(images: torch.Tensor, labels: torch.Tensor, per_class: int = 10) -> np.ndarray:
    """uint8 grid [H, W, 3]: one row per class, up to ``per_class`` samples of it."""
    rows = []
    for k in range(D.NUM_CLASSES):
        x = images[labels == k][:per_class]
        if len(x) < per_class:
            x = torch.cat([x, torch.full((per_class - len(x), *x.shape[1:]), -1.0)])
        rows.append(x)
    return make_grid(latents_to_uint8(torch.cat(rows)), nrow=per_class)


# ---------------------------------------------------------------------------
# One training run, driven through edt.train
# ---------------------------------------------------------------------------

def train(model_key: str, seed: int, args, data_dir: str, workdir: pathlib.Path,
          probe: bool = False) -> Dict[str, Any]:
    """One model trained for ``args.minutes``; at each of the ``args.evals`` marks a copy of its EMA
    weights is kept (``snapshots``: modules, sampled later by :func:`draw_part`); with ``probe``
    also at the first step past every PROBES_PER_MARK-th share of a mark interval that is not a
    mark (``probes``: their step, seconds and loss; ``probe_snapshots``: the copies)."""
    name, kwargs = D.DIGITS_MODELS[model_key]
    targs = T.parse_args(["--preset", "digits", "--model", name, "--model-kwargs", json.dumps(kwargs),
                          "--data-path", data_dir, "--seed", str(seed), "--global-batch-size", str(args.batch_size),
                          "--threads", str(args.threads), "--results-dir", str(workdir / f"{model_key}-{seed}"),
                          "--max-steps", str(1 << 40), "--log-every", str(CHUNK_STEPS),
                          "--ckpt-every", str(1 << 40), "--no-progress"])
    torch.set_num_threads(targs.threads)
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        run = T.setup(targs, T.Dist(False, 0, 1, torch.device("cpu")))
    run.model.train()
    run.bar = progress_bar(total=None, disable=True)
    run.t0 = time.time()
    budget = args.minutes * 60.0
    marks = [budget * (i + 1) / args.evals for i in range(args.evals)]
    every = marks[0] / PROBES_PER_MARK
    next_probe = every if probe else float("inf")
    seconds, rows, snapshots, probes, probe_snapshots = 0.0, [], [], [], []
    n_params = sum(p.numel() for p in run.model.parameters())
    print(f"{model_key} seed {seed}: {name} ({n_params / 1e6:.2f}M parameters), recipe {targs.recipe} "
          f"({targs.optimizer}, {targs.schedule_sampler} timesteps, mask strategy {run.strategy}), "
          f"{args.minutes:g} min", flush=True)
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        while len(rows) < len(marks):
            run.max_steps = run.step + CHUNK_STEPS
            t = time.perf_counter()
            T.train_loop(run)
            seconds += time.perf_counter() - t
            point = {"step": run.step, "seconds": seconds, "loss": run.history[-1]["loss"]}
            if seconds >= marks[len(rows)]:
                rows.append(point)
                snapshots.append(copy.deepcopy(run.ema).eval())
            elif seconds >= next_probe:
                probes.append(point)
                probe_snapshots.append(copy.deepcopy(run.ema).eval())
            if seconds >= next_probe:
                next_probe = every * (seconds // every + 1)
    print(f"  {model_key} seed {seed}: {run.step} steps in {seconds:.1f} s", file=sys.stderr, flush=True)
    return {"model": model_key, "name": name, "model_kwargs": kwargs, "seed": seed, "parameters": n_params,
            "recipe": targs.recipe, "optimizer": targs.optimizer, "optimizer_class": type(run.opt).__module__
            + "." + type(run.opt).__name__, "lr": targs.lr, "schedule_sampler": targs.schedule_sampler,
            "mask_strategy": run.strategy, "ema_decay": targs.ema_decay, "grad_clip": targs.grad_clip,
            "steps_per_second": run.step / max(seconds, 1e-9), "evals": rows, "snapshots": snapshots,
            "probes": probes, "probe_snapshots": probe_snapshots}


def draw_part(model, args, seed: int, chunks: Optional[Tuple[int, int]] = None):
    """(images, labels, seconds): the evaluation samples of ``model`` (``chunks``: a part of them)."""
    t = time.perf_counter()
    images, labels = draw_samples(model, args.num_samples, args.sampling_steps, args.cfg_scale, seed, chunks=chunks)
    return images, labels, time.perf_counter() - t


def judged(judge, reference: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
           seconds: float) -> Dict[str, Any]:
    """FD-digits and class accuracy of the samples ``images`` drawn for ``labels``."""
    return {"fd": D.fd_digits(judge, images, reference), "class_accuracy": D.class_accuracy(judge, images, labels),
            "images": images, "labels": labels, "eval_seconds": seconds}


def _worker_init(parent: int, threads: int) -> None:
    """Start of a worker process: ``threads`` torch threads, and a daemon thread that ends the
    process as soon as the benchmark process ``parent`` is gone (killed), whatever the worker is
    doing or waiting for: nothing is left running or blocked on the pool's queues."""
    torch.set_num_threads(threads)

    def watch():
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(3)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def evaluate(pool, args, judge, reference: torch.Tensor,
             tasks: Dict[Any, Tuple[Any, int, float]]) -> Dict[Any, Dict[str, Any]]:
    """``{key: (model, seed, steps_per_second)}`` -> ``{key: judged(...)}``. With a ``pool``, each
    evaluation is cut into EVAL_PARTS parts of its sampling chunks, spread over the pool's workers,
    the slowest model's first (so that the workers finish together), and joined here; without
    one, everything is drawn here."""
    if pool is None:
        return {key: judged(judge, reference, *draw_part(model, args, seed)) for key, (model, seed, _) in tasks.items()}
    n_chunks = -(-args.num_samples // SAMPLE_CHUNK)
    cuts = sorted({round(n_chunks * k / EVAL_PARTS) for k in range(EVAL_PARTS + 1)})
    pieces = list(zip(cuts, cuts[1:]))
    order = sorted(((key, part) for key in tasks for part in pieces), key=lambda t: tasks[t[0]][2])
    futures = {t: pool.submit(draw_part, tasks[t[0]][0], args, tasks[t[0]][1], t[1]) for t in order}
    parts = {t: f.result() for t, f in futures.items()}
    results = {}
    for key in tasks:
        mine = [parts[(key, part)] for part in pieces]
        results[key] = judged(judge, reference, torch.cat([m[0] for m in mine]), torch.cat([m[1] for m in mine]),
                              sum(m[2] for m in mine))
    return results


def _record(point: Dict[str, Any], res: Dict[str, Any], what: str) -> None:
    point.update(fd=res["fd"], class_accuracy=res["class_accuracy"], eval_seconds=res["eval_seconds"])
    print(f"  {what}: step {point['step']:5d}  {point['seconds']:7.1f} s  FD {res['fd']:8.2f}  class acc "
          f"{100 * res['class_accuracy']:5.1f} %", file=sys.stderr, flush=True)


def run_all(args, data_dir: str, judge, reference: torch.Tensor, workdir: pathlib.Path) -> List[Dict[str, Any]]:
    """Every (seed, model) run. First the training: the models of one seed side by side,
    ``args.jobs`` worker processes at a time (spawned: nothing of this process's thread pool is
    inherited), with nothing else running beside them; then every mark's evaluation (spread over
    the same workers by :func:`evaluate`); then up to ``args.probes`` rounds of the bisection, each
    one EDT probe point per seed, evaluated together. With ``args.jobs`` 1 everything runs here,
    one after the other."""
    with contextlib.ExitStack() as stack:
        pool = None
        if args.jobs > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            pool = stack.enter_context(ProcessPoolExecutor(
                args.jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
                initargs=(os.getpid(), args.threads)))
        probed = {"EDT", "MDTv2"} <= set(args.models) and args.probes > 0
        runs = []
        for seed in args.seeds:
            jobs = [(train, key, seed, args, data_dir, workdir, probed and key == "EDT") for key in args.models]
            if pool is None:
                runs += [fn(*a) for fn, *a in jobs]
            else:
                runs += [f.result() for f in [pool.submit(*job) for job in jobs]]
        marks = evaluate(pool, args, judge, reference,
                         {(i, j): (snap, r["seed"], r["steps_per_second"]) for i, r in enumerate(runs)
                          for j, snap in enumerate(r["snapshots"])})
        for (i, j), res in marks.items():
            _record(runs[i]["evals"][j], res, f"{runs[i]['model']} seed {runs[i]['seed']}")
        for i, r in enumerate(runs):
            last = marks[(i, len(r["evals"]) - 1)]
            r["last_images"], r["last_labels"] = last["images"], last["labels"]
        for _ in range(args.probes if probed else 0):
            asks = {}
            for i, r in enumerate(runs):
                if r["model"] != "EDT":
                    continue
                rival = next(m for m in runs if m["seed"] == r["seed"] and m["model"] == "MDTv2")
                k = next_probe(r["evals"], r["probes"], rival["evals"][-1]["fd"])
                if k is not None:
                    asks[(i, k)] = (r["probe_snapshots"][k], r["seed"], r["steps_per_second"])
            if not asks:
                break
            for (i, k), res in evaluate(pool, args, judge, reference, asks).items():
                _record(runs[i]["probes"][k], res, f"{runs[i]['model']} seed {runs[i]['seed']} probe")
    for r in runs:
        del r["snapshots"]
        r.pop("probe_snapshots", None)
        r["probe_points"] = len(r["probes"])
        r["probes"] = [p for p in r["probes"] if "fd" in p]
    return runs


# ---------------------------------------------------------------------------
# The claim
# ---------------------------------------------------------------------------

def curve(run: Dict[str, Any]) -> List[Dict[str, Any]]:
    """A run's evaluated points, marks and probes, in training-time order."""
    return sorted([e for e in run["evals"] + run.get("probes", []) if "fd" in e], key=lambda e: e["seconds"])


def reach(points: List[Dict[str, Any]], target: float) -> Optional[Tuple[int, int]]:
    """``(lo, hi)``: ``hi`` the index of the first point of ``points`` (in time order) whose
    ``fd`` is evaluated and at most ``target``, ``lo`` the index of the last evaluated point before
    it (-1: none); None when no evaluated point reaches ``target``."""
    done = [i for i, e in enumerate(points) if e.get("fd") is not None]
    hi = next((i for i in done if points[i]["fd"] <= target), None)
    if hi is None:
        return None
    return max((i for i in done if i < hi), default=-1), hi


def time_to_reach(points: List[Dict[str, Any]], target: float) -> Optional[float]:
    """Training seconds at which FD first reaches ``target`` (linear in FD between the evaluated
    points around it; the first point's time when it already does), or None when it never does."""
    found = reach(points, target)
    if found is None:
        return None
    lo, hi = found
    if lo < 0:
        return points[hi]["seconds"]
    a, b = points[lo], points[hi]
    frac = (a["fd"] - target) / max(a["fd"] - b["fd"], 1e-12)
    return a["seconds"] + frac * (b["seconds"] - a["seconds"])


def next_probe(evals: List[Dict[str, Any]], probes: List[Dict[str, Any]], target: float) -> Optional[int]:
    """Index into ``probes`` of the next probe point to evaluate: between the last evaluated point
    (marks and probes) above ``target`` and the first at or below it, the one nearest their
    geometric mean time (the earliest point's time standing in for 0); None when no evaluated point
    reaches ``target`` or no probe point is left between the two. Each probe in log time takes the
    square root of the ratio of the bracket's ends, the factor the speed-up's range spans."""
    points = sorted([(e, None) for e in evals] + [(e, k) for k, e in enumerate(probes)], key=lambda t: t[0]["seconds"])
    found = reach([e for e, _ in points], target)
    if found is None or found[1] - found[0] < 2:
        return None
    lo, hi = found
    t_lo = points[max(lo, 0)][0]["seconds"]
    mid = 0.5 * (np.log(max(t_lo, 1e-9)) + np.log(max(points[hi][0]["seconds"], 1e-9)))
    inside = [i for i in range(lo + 1, hi) if points[i][1] is not None]
    if not inside:
        return None
    best = min(inside, key=lambda i: abs(np.log(max(points[i][0]["seconds"], 1e-9)) - mid))
    return points[best][1]


def speedups(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Per seed: the time MDTv2 needs to reach its final FD over the time EDT needs, with the
    range the evaluated points around EDT's crossing leave."""
    per_seed = {}
    for seed in sorted({r["seed"] for r in runs}):
        by = {r["model"]: r for r in runs if r["seed"] == seed}
        if "EDT" not in by or "MDTv2" not in by:
            continue
        target = by["MDTv2"]["evals"][-1]["fd"]
        t_mdt = time_to_reach(curve(by["MDTv2"]), target)
        edt = curve(by["EDT"])
        t_edt = time_to_reach(edt, target)
        found = reach(edt, target)
        lo, hi = (None, None) if found is None else (edt[found[0]]["seconds"] if found[0] >= 0 else None,
                                                     edt[found[1]]["seconds"])
        per_seed[seed] = {"mdtv2_final_fd": target, "mdtv2_seconds": t_mdt, "edt_seconds_to_reach": t_edt,
                          # EDT's crossing lies in (lo, hi]: lo None when its first evaluated point
                          # already reached the target (then the speed-up is a lower bound)
                          "edt_bracket": [lo, hi],
                          "speedup": None if t_edt is None else t_mdt / max(t_edt, 1e-9),
                          "speedup_range": None if hi is None else [t_mdt / hi, None if lo is None else t_mdt / lo],
                          "speedup_is_lower_bound": found is not None and lo is None,
                          "edt_final_fd": by["EDT"]["evals"][-1]["fd"]}
    values = [v["speedup"] for v in per_seed.values() if v["speedup"] is not None]
    summary = {"per_seed": per_seed, "seeds_reached": len(values), "seeds": len(per_seed),
               "lower_bounds": sum(bool(v["speedup_is_lower_bound"]) for v in per_seed.values())}
    if values:
        median = float(np.median(values))
        bounds = [v["speedup"] for v in per_seed.values() if v["speedup_is_lower_bound"]]
        # a lower bound can only rise: it moves the median only from at or below it, the maximum always
        summary.update(median=median, min=min(values), max=max(values),
                       median_is_lower_bound=any(b <= median for b in bounds),
                       min_is_lower_bound=any(b <= min(values) for b in bounds), max_is_lower_bound=bool(bounds))
    return summary


#: Settings that may differ between runs merged by ``--combine``.
_PER_RUN_SETTINGS = {"seeds", "out", "jobs", "cache_dir", "combine"}


def combine(dirs: Sequence[pathlib.Path]) -> Dict[str, Any]:
    """One result from the ``quality.json`` of several runs: their runs concatenated (each seed
    once), the claim recomputed over all seeds, each source's run line and busy marks kept."""
    parts = []
    for d in dirs:
        path = pathlib.Path(d) / "quality.json"
        try:
            parts.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"--combine: cannot read {path} ({e})") from None
    first = parts[0]
    same = {k: v for k, v in first["settings"].items() if k not in _PER_RUN_SETTINGS}
    seeds: List[int] = []
    for d, part in zip(dirs, parts):
        other = {k: v for k, v in part["settings"].items() if k not in _PER_RUN_SETTINGS}
        if other != same:
            diff = sorted(k for k in set(same) | set(other) if same.get(k) != other.get(k))
            raise ValueError(f"--combine: {d} was run with other settings ({', '.join(diff)})")
        if set(part["settings"]["seeds"]) & set(seeds):
            raise ValueError(f"--combine: {d} repeats seed(s) {sorted(set(part['settings']['seeds']) & set(seeds))}")
        seeds += part["settings"]["seeds"]
    runs = [r for part in parts for r in part["runs"]]
    busy = [f"{d}: {why}" for d, part in zip(dirs, parts) for why in part["busy"]]
    settings = dict(first["settings"], seeds=seeds)
    return {"run_info": first["run_info"], "busy": busy, "judge": first["judge"], "claim": speedups(runs),
            "runs": runs, "settings": settings,
            "sources": [{"dir": str(d), "run_info": part["run_info"], "seeds": part["settings"]["seeds"],
                         "busy": part["busy"]} for d, part in zip(dirs, parts)]}


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------

def plot_curves(runs: List[Dict[str, Any]], floor: float, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    colours = {"EDT": "tab:blue", "MDTv2": "tab:orange"}
    probe_label = False
    for r in runs:
        points = curve(r)
        for col, xkey in enumerate(("seconds", "step")):
            x = [e[xkey] for e in points]
            kw = dict(color=colours.get(r["model"]), marker="o", ms=3, alpha=0.85,
                      label=f"{r['model']} seed {r['seed']}")
            axes[0, col].plot(x, [e["fd"] for e in points], **kw)
            axes[1, col].plot(x, [100 * e["class_accuracy"] for e in points], **kw)
            probes = r.get("probes", [])
            if probes:  # the bisection's points: hollow
                kw = dict(ls="none", marker="o", ms=6, mfc="none", color=colours.get(r["model"]),
                          label=None if probe_label else "bisection probe")
                probe_label = True
                axes[0, col].plot([e[xkey] for e in probes], [e["fd"] for e in probes], **kw)
                axes[1, col].plot([e[xkey] for e in probes], [100 * e["class_accuracy"] for e in probes], **kw)
    for col, xlabel in enumerate(("training wall-clock (s)", "training steps")):
        axes[0, col].axhline(floor, color="grey", ls="--", lw=1, label="floor (held-out vs train)")
        axes[0, col].axhline(3 * floor, color="grey", ls=":", lw=1, label="3x floor")
        axes[0, col].set_yscale("log")
        axes[0, col].set_ylabel("FD-digits (lower is better)")
        axes[1, col].axhline(90, color="grey", ls=":", lw=1)
        axes[1, col].set_ylabel("class accuracy of samples (%)")
        axes[1, col].set_xlabel(xlabel)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _fmt(v, spec: str = ".2f") -> str:
    return "n/a" if v is None else format(v, spec)


def render_markdown(result: Dict[str, Any]) -> str:
    info, judge, claim = result["run_info"], result["judge"], result["claim"]
    lines = ["# EDT vs MDTv2 on the UCI digits: quality against training wall-clock", ""]
    for src in result.get("sources") or [{"run_info": info, "seeds": result["settings"]["seeds"]}]:
        i = src["run_info"]
        lines += [f"{'Seeds ' + str(src['seeds']) + ': ' if 'dir' in src else ''}{i['date']}, commit "
                  f"{i['git_commit']}, {i['device']}, torch {i['torch']}, {result['settings']['jobs']} run(s) at a "
                  f"time, {result['settings']['threads']} thread(s) each, load average at start "
                  f"{i['load_average']}.", ""]
    if result["busy"]:
        lines += [U.busy_note(result["busy"]), ""]
    s = result["settings"]
    lines += [f"Settings: {s['minutes']:g} min of training per model and seed, {s['evals']} evaluations "
              f"(marks) and up to {s.get('probes', 0)} bisection probes, "
              f"{s['num_samples']} samples each (EMA weights, DDPM {s['sampling_steps']} steps, CFG "
              f"{s['cfg_scale']:g}), batch {s['batch_size']}, seeds {s['seeds']}.", "",
              f"Judge (CNN, seed {DATA_SEED}, trained on the {judge['n_train']} training images): "
              f"{100 * judge['heldout_accuracy']:.1f} % on the {judge['n_heldout']} held-out images; "
              f"FD floor (held-out vs training) {judge['fd_floor']:.2f}; {judge['n_real']} real training images "
              f"against the held-out split (what a perfect model scores with as many samples): FD "
              f"{judge['fd_real_n']:.2f} (range {judge['fd_real_n_min']:.2f}-{judge['fd_real_n_max']:.2f} over "
              f"{D.REAL_SUBSETS} subsets).", "",
              "| model | seed | params | recipe | steps | steps/s | final FD | FD / floor | class acc |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        e = r["evals"][-1]
        lines.append(f"| {r['model']} | {r['seed']} | {r['parameters'] / 1e6:.2f}M | {r['optimizer']} lr "
                     f"{r['lr']:g}, {r['schedule_sampler']}, mask {r['mask_strategy']} | {e['step']} | "
                     f"{r['steps_per_second']:.2f} | {e['fd']:.2f} | {e['fd'] / judge['fd_floor']:.2f} | "
                     f"{100 * e['class_accuracy']:.1f} % |")
    lines += ["", "Time for EDT to reach MDTv2's final FD (speed-up = the time MDTv2 needs to reach it / EDT's; EDT's "
                  "time interpolated linearly in FD between its evaluated points around the crossing, the bracket "
                  "they leave beside it, and the speed-up range it allows):", "",
              "| seed | MDTv2 final FD | MDTv2 s | EDT s to reach it | EDT bracket (s) | speed-up | range |",
              "|---|---|---|---|---|---|---|"]
    for seed, v in claim["per_seed"].items():
        at_least = ">= " if v.get("speedup_is_lower_bound") else ""
        lo, hi = v.get("edt_bracket") or (None, None)
        bracket = "n/a" if hi is None else f"({0 if lo is None else lo:.0f}, {hi:.0f}]"
        rng = v.get("speedup_range")
        spread = "n/a" if not rng else f"{rng[0]:.2f}-{'unbounded' if rng[1] is None else format(rng[1], '.2f')}"
        lines.append(f"| {seed} | {v['mdtv2_final_fd']:.2f} | {v['mdtv2_seconds']:.0f} | "
                     f"{_fmt(v['edt_seconds_to_reach'], '.0f')} | {bracket} | {at_least}{_fmt(v['speedup'])} | "
                     f"{spread} |")
    if claim.get("median") is not None:
        def ge(name):
            return ">= " if claim[f"{name}_is_lower_bound"] else ""

        lines += ["", f"Speed-up median {ge('median')}{claim['median']:.2f}x (range {ge('min')}{claim['min']:.2f} to "
                      f"{ge('max')}{claim['max']:.2f}) over {claim['seeds_reached']} of {claim['seeds']} seeds (the "
                      f"paper, EDT-S vs MDTv2-S on ImageNet 256: 3.93x)."]
        if claim.get("lower_bounds"):
            lines += ["", f"In {claim['lower_bounds']} seed(s) (marked >=) EDT's earliest evaluated point already "
                          f"beat MDTv2's final FD: EDT got there earlier by a margin the evaluations cannot tell, "
                          f"so those speed-ups are lower bounds, and so is each summary they can move (marked >=)."]
    else:
        lines += ["", f"EDT did not reach MDTv2's final FD in {claim['seeds']} seed(s)."]
    lines += ["", "Evaluations (mark: at an equal share of the training time; probe: a kept EMA copy the bisection "
                  "evaluated):", "", "| model | seed | point | step | seconds | FD | class acc | loss |",
              "|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        probes = {id(e) for e in r.get("probes", [])}
        for e in curve(r):
            lines.append(f"| {r['model']} | {r['seed']} | {'probe' if id(e) in probes else 'mark'} | {e['step']} | "
                         f"{e['seconds']:.0f} | {e['fd']:.2f} | {100 * e['class_accuracy']:.1f} % | {e['loss']:.4f} |")
    return "\n".join(lines) + "\n"


def write_report(result: Dict[str, Any], out: pathlib.Path) -> None:
    """``OUT/quality.json``, ``quality.md`` (also printed) and ``curves.png`` of a result."""
    out.mkdir(parents=True, exist_ok=True)
    markdown = render_markdown(result)
    (out / "quality.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    (out / "quality.md").write_text(markdown)
    plot_curves(result["runs"], result["judge"]["fd_floor"], out / "curves.png")
    print(markdown)
    print(f"results written to {out}/")


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Run the comparison; returns the JSON-able result (also written to ``OUT/quality.json``)."""
    args = parse_args(argv)
    if args.combine:
        try:
            result = combine(args.combine)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        write_report(result, args.out)
        return result
    start = U.machine_snapshot()
    info = U.run_info()
    info["threads"] = args.threads
    torch.set_num_threads(args.threads)
    data = D.load_digits_split(DATA_SEED)
    judge = D.load_judge(DATA_SEED, root=args.cache_dir, data=data)
    report = D.judge_report(judge, data, n=min(args.num_samples, len(data["train_x"])), seed=DATA_SEED)
    print(f"judge: {100 * report['heldout_accuracy']:.1f} % held-out accuracy, FD floor {report['fd_floor']:.2f}, "
          f"{report['n_real']} real images {report['fd_real_n']:.2f}", flush=True)
    data_dir = str(D.prepare_digits_folder("train", DATA_SEED, root=args.cache_dir))
    with tempfile.TemporaryDirectory(prefix="edt-quality-") as work:
        runs = run_all(args, data_dir, judge, data["test_x"], pathlib.Path(work))
    busy = U.busy_reasons(U.machine_load_since(start))
    args.out.mkdir(parents=True, exist_ok=True)
    for r in runs:
        write_png(args.out / f"samples-{r['model']}-seed{r['seed']}.png",
                  sample_grid(r.pop("last_images"), r.pop("last_labels")))
    result = {"run_info": info, "busy": busy, "judge": report, "claim": speedups(runs), "runs": runs,
              "settings": {k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items()}}
    write_report(result, args.out)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
