"""Train EDT / MDTv2 on VAE latents: ``python -m edt.train`` (or ``torchrun ... -m edt.train``).

    # a CPU demo, no download: a tiny EDT on the built-in synthetic latents (about a minute)
    python -m edt.train --preset cpu-demo
    # a tiny EDT on real images, scikit-learn's UCI digits at 16x16 (edt.digits)
    python -m edt.train --preset digits
    # the published EDT recipe on pre-extracted ImageNet latents, 8 GPUs
    torchrun --nproc_per_node=8 -m edt.train --model EDT-S/2 --data-path features/ \\
        --global-batch-size 256 --max-steps 400000

Recipes (``--recipe``, default ``auto``: ``mdt`` for MDTv2 models, ``edt`` otherwise);
any flag given explicitly overrides the recipe's value:

* ``edt`` (xinwangChen/EDT, ``train_mask_adan.py``): Adan, weight decay
  0, no gradient clipping, lr decayed linearly from 1e-3 (EDT-S/B; 5e-4 for
  EDT-XL) to 5e-5 over 400k steps, timesteps from ADM's loss-second-moment
  importance sampler, EMA 0.9999.
* ``mdt`` (sail-sg/MDT, ``run.sh`` / ``train_util.py``): Adan with its gradient
  norm clipped to 1, weight decay 0, constant lr 5e-4, uniform timesteps,
  EMA 0.9999.

One optimisation step (per rank, on ``global_batch / world_size`` samples):

* the timesteps and the noise are drawn for the WHOLE global batch from a
  generator seeded by (seed, step); rank r takes rows r, r + W, r + 2W, ...,
  the rows of its samples (``DistributedSampler`` deals sample k of a global
  batch to rank k mod W). So a run's maths does not depend on how many
  processes share the batch. With the loss-second-moment sampler, t ~ p_t
  (the sampler's weights) and each sample's loss is multiplied by
  1 / (T p_t); the sampler is updated with the sum of both passes'
  per-sample losses, gathered over all ranks.
* masking strategy (``--mask-strategy auto`` picks it from the model name):
  ``edt`` / ``mdt``: loss(full forward) + loss(``enable_mask=True`` forward)
  with the same t, each pass on its own noise, as both authors' scripts do
  (two ``training_losses`` calls, each drawing its noise); ``shared-noise``:
  the same two passes on ONE noised batch (an ablation); ``none``: the full
  forward only. The loss of each forward is the diffusion loss of
  ``edt.diffusion`` (Min-SNR-weighted MSE + VB).
* the optimiser step (AdamW or Adan), optional gradient clipping, EMA update.
* random draws inside the model (label dropout, masks) are made ahead of the
  forward (the model's ``draw_ahead``) from a generator seeded by (seed, step,
  rank), so that the step itself draws nothing and reads nothing back from the
  device (``--compile`` compiles it whole); a model without ``draw_ahead``
  draws from the (checkpointed) global RNG.

Checkpoints (``RESULTS/checkpoints/<step>.pt``) hold model, EMA, optimiser,
step, the arguments, the timestep sampler's state and every rank's RNG
states; ``--resume`` continues bit-exactly (same data order, noise, timesteps
and masks) when the world size is unchanged. Each is written whole or not at
all (a temporary file, fsynced and renamed), so a process killed at any moment
leaves only complete checkpoints, and ``--resume auto`` (the newest of them; a
fresh start when there is none) lets a preempted job be restarted with the
same command, any number of times, ending bit-equal to an uninterrupted run.
SIGINT / SIGTERM (Ctrl-C, a cluster's pre-emption) finish the current step,
write a checkpoint and exit with status 130; a second signal stops at once. A non-finite loss stops the
run (exit 1) without writing a checkpoint, so the last one written stays the
last good one.
"""
from __future__ import annotations

import argparse
import random
import signal
import sys
import threading
import time
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Sampler

from .cli import ArgumentParser, check_output_path, json_object
from .data import VAE_DOWNSAMPLE, LatentFolder, SyntheticLatents, latent_size
from .digits import DIGITS_MODELS, DIGITS_SIZE, prepare_digits_folder
from .diffusion import create_diffusion, create_named_schedule_sampler
from .distributed import Dist, exit_status_of_peer_failure, mix_seed, process_group
from .models import load_state_dict_strict
from .models.checkpointing import parse_checkpoint
from .models.common import EAGER
from .utils import COMPILE_MODES, TMP_SUFFIX, atomic_write, build_model, compile_step, load_checkpoint_file, \
    model_family, progress_bar

__all__ = ["main", "console_main", "parse_args", "DiffusionTrainingLoss", "ShardedSampler", "update_ema",
           "TrainingDiverged", "RECIPES", "recipe_values", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "edt-train-v1"
LATENT_CHANNELS = 4
#: A non-finite loss is acted on at the next step that is a multiple of this (or a log or
#: checkpoint step); with several processes stop signals too (one tiny all-reduce), with one at once.
STOP_CHECK_EVERY = 10
#: The progress bar shows the loss of every one of the first steps, then every this many.
PROGRESS_LOSS_EVERY = 10

#: The published recipes: the optimisation values each preset fills in (see the module docstring).
RECIPES: Dict[str, Dict[str, Any]] = {
    "edt": {"optimizer": "adan", "lr": 1e-3, "lr_schedule": "linear", "min_lr": 5e-5,
            "lr_decay_steps": 400_000, "weight_decay": 0.0, "grad_clip": 0.0,
            "schedule_sampler": "loss-second-moment", "ema_decay": 0.9999},
    "mdt": {"optimizer": "adan", "lr": 5e-4, "lr_schedule": "constant", "min_lr": 5e-5,
            "lr_decay_steps": 400_000, "weight_decay": 0.0, "grad_clip": 1.0,
            "schedule_sampler": "uniform", "ema_decay": 0.9999},
}
#: EDT-XL's initial learning rate in the authors' train_mask_adan.sh (S and B use 1e-3).
EDT_XL_LR = 5e-4

#: ``--preset cpu-demo``: a tiny EDT (the EDT-S/2 stage layout at widths 32-64) on 64px
#: synthetic data, ~200 steps: about a minute on 2 CPU cores.
PRESETS: Dict[str, Dict[str, Any]] = {
    "cpu-demo": {"model": "EDT-S/2",
                 "model_kwargs": {"dims": [32, 48, 64, 48, 32], "num_heads": [2, 2, 2, 2, 2],
                                  "hidden_size": 32, "backend": "eager"},
                 "image_size": 64, "num_classes": 10, "synthetic": True, "synthetic_size": 1024,
                 "global_batch_size": 16, "max_steps": 200, "log_every": 20, "ckpt_every": 200,
                 "results_dir": "results/cpu-demo", "device": "cpu", "threads": 1},
    # the UCI digits (edt.digits): 16x16x1 images stand in for the latents, so the "image size"
    # is 16 x 8; the data folder is written to the cache on first use. EMA 0.99: the published
    # 0.9999 averages over ~10k steps, far more than a run of a few minutes makes (at 0.999 the
    # EMA of a 700-step run would still be half its initial weights).
    "digits": {"model": DIGITS_MODELS["EDT"][0], "model_kwargs": DIGITS_MODELS["EDT"][1],
               "image_size": DIGITS_SIZE * VAE_DOWNSAMPLE, "num_classes": 10, "global_batch_size": 64,
               "max_steps": 3000, "ema_decay": 0.99, "log_every": 100, "ckpt_every": 1000,
               "results_dir": "results/digits", "device": "cpu", "threads": 2},
}


class TrainingDiverged(RuntimeError):
    """The loss became non-finite; no checkpoint was written after it."""


# ---------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------

class ShardedSampler(Sampler):
    """Shuffled indices of one rank: the epoch's permutation (seeded by seed + epoch),
    cut to a multiple of ``world_size``, every ``world_size``-th from ``rank`` on
    (``DistributedSampler``'s deal), starting ``start`` indices in (for resuming)."""

    def __init__(self, n: int, world_size: int = 1, rank: int = 0, seed: int = 0):
        self.n, self.world_size, self.rank, self.seed = n, world_size, rank, seed
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = int(epoch), int(start)

    def __len__(self) -> int:
        return self.n // self.world_size - self.start

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.n, generator=g)
        total = (self.n // self.world_size) * self.world_size
        return iter(perm[self.rank:total:self.world_size][self.start:].tolist())


MASK_STRATEGIES = ("edt", "mdt", "shared-noise", "none")


def _weighted_mean(loss: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
    return (loss * weights).mean() if weights is not None else loss.mean()


class DiffusionTrainingLoss(nn.Module):
    """Wraps a model so that ONE forward computes the step's whole loss (full + masked pass)."""

    def __init__(self, model: nn.Module, diffusion, strategy: str):
        super().__init__()
        if strategy not in MASK_STRATEGIES:
            raise ValueError(f"mask strategy must be one of {', '.join(map(repr, MASK_STRATEGIES))}, "
                             f"got {strategy!r}")
        self.model = model
        self.diffusion = diffusion
        self.strategy = strategy

    def draw_ahead(self, batch: int, generator: Optional[torch.Generator], device) -> Optional[tuple]:
        """The model's random draws for the step's passes, made ahead (``(full, masked)``, masked
        None with the ``none`` strategy), so that :meth:`forward` draws nothing and compiles whole;
        None for a model without ``draw_ahead`` (it draws from the global RNG itself)."""
        if not hasattr(self.model, "draw_ahead"):
            return None
        full = self.model.draw_ahead(batch, False, generator, device)
        masked = None if self.strategy == "none" else self.model.draw_ahead(batch, True, generator, device)
        return full, masked

    def forward(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                noise_masked: Optional[torch.Tensor] = None, draws: Optional[tuple] = None,
                weights: Optional[torch.Tensor] = None, per_sample: bool = False):
        """float32 [3]: (total loss, full-pass loss, masked-pass loss or 0), each the mean over
        the batch of ``weights * per-sample loss`` (weights: the sampler's importance weights,
        1 when ``None``). ``per_sample=True`` also returns the per-sample sum of the passes'
        unweighted losses, detached (what a loss-aware timestep sampler is updated with).
        ``draws``: :meth:`draw_ahead`'s (None: the model draws from the global RNG)."""
        full_draws, masked_draws = draws if draws is not None else (None, None)
        kwargs = {"y": y}
        full_kwargs = dict(kwargs, draws=full_draws) if full_draws is not None else kwargs
        # The kernel backends compute the loss as one fused op; the authors' path op by op.
        backend = getattr(self.model, "backend", EAGER)
        loss_backend = None if backend == EAGER else backend
        full_terms = self.diffusion.training_losses(self.model, x, t, full_kwargs, noise=noise,
                                                    backend=loss_backend)["loss"]
        full = _weighted_mean(full_terms, weights)
        if self.strategy == "none":
            out = torch.stack([full, full.detach(), torch.zeros_like(full)])
            return (out, full_terms.detach()) if per_sample else out
        if self.strategy == "shared-noise":
            masked_noise = noise
        elif noise_masked is None:
            raise ValueError(f"the {self.strategy!r} strategy needs noise_masked (each pass has its own noise)")
        else:
            masked_noise = noise_masked
        masked_kwargs = dict(kwargs, enable_mask=True)
        if masked_draws is not None:
            masked_kwargs["draws"] = masked_draws
        masked_terms = self.diffusion.training_losses(self.model, x, t, masked_kwargs, noise=masked_noise,
                                                      backend=loss_backend)["loss"]
        masked = _weighted_mean(masked_terms, weights)
        out = torch.stack([full + masked, full.detach(), masked.detach()])
        return (out, full_terms.detach() + masked_terms.detach()) if per_sample else out


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, over the parameters; buffers are copied."""
    ema_params = dict(ema.named_parameters())
    for name, p in model.named_parameters():
        ema_params[name].mul_(decay).add_(p.detach(), alpha=1 - decay)
    ema_buffers = dict(ema.named_buffers())
    for name, b in model.named_buffers():
        ema_buffers[name].copy_(b)


def _rng_state(device: torch.device) -> dict:
    """This process's RNG states, in types ``torch.load(weights_only=True)`` accepts."""
    kind, key, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": str(kind), "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)},
             "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _seed_globals(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (1 << 32))
    random.seed(seed)


def make_optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """``adamw`` (torch) or ``adan``: pytorch-optimizer's Adan, whose update is that of the authors'
    ``adan.py`` (sail-sg/Adan; tests/test_adan.py compares them): betas (0.98, 0.92, 0.99), eps 1e-8,
    weight decay applied as ``p / (1 + lr wd)`` after the step (their default ``no_prox=False``)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adan":
        from pytorch_optimizer import Adan  # a dependency; imported here, for the runs that use it

        return Adan(params, lr=lr, betas=(0.98, 0.92, 0.99), eps=1e-8, weight_decay=weight_decay,
                    weight_decouple=False)
    raise ValueError(f"--optimizer must be 'adamw' or 'adan', got {name!r}")


def lr_at(args: argparse.Namespace, k: int) -> float:
    """Learning rate of the step with index k (0-based): constant, or linear from --lr to
    --min-lr over --lr-decay-steps and --min-lr after (the authors' ``adjust_lr``)."""
    if args.lr_schedule == "constant":
        return args.lr
    return args.lr - (args.lr - args.min_lr) * min(k, args.lr_decay_steps) / max(args.lr_decay_steps, 1)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def _recipe_help(key: str) -> str:
    edt, mdt = RECIPES["edt"][key], RECIPES["mdt"][key]
    extra = f" ({EDT_XL_LR:g} for EDT-XL)" if key == "lr" else ""
    return f"default: from --recipe (edt: {edt}{extra}; mdt: {mdt})"


def _build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser("python -m edt.train", __doc__)
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="a complete small run; explicit flags override its values. cpu-demo: "
                        "a tiny EDT on 64px synthetic latents, 200 steps, about a minute on 2 cores; "
                        "digits: a tiny EDT on the UCI digits (16x16, needs scikit-learn), 3000 steps")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="EDT-S/2", help="published name (EDT-S/2, MDTv2-S/2, ...) or module:factory")
    g.add_argument("--model-kwargs", default="{}", help="JSON dict of constructor overrides (tiny test models)")
    g.add_argument("--image-size", type=int, default=256, help="pixels; the latent side is image-size / 8")
    g.add_argument("--num-classes", type=int, default=1000, help="class labels 0..N-1 (N is the null class)")
    g.add_argument("--mask-strategy", default="auto", choices=["auto", *MASK_STRATEGIES],
                   help="auto: edt for EDT models, mdt for MDTv2, none otherwise")
    g = p.add_argument_group("data")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--data-path", default=None, help="folder of latents (see edt.data for the layouts)")
    src.add_argument("--synthetic", action="store_true", help="built-in class-conditional blobs (the "
                     "default when no --data-path is given)")
    g.add_argument("--synthetic-size", type=int, default=4096, help="samples in the synthetic set")
    g.add_argument("--num-workers", type=int, default=None,
                   help="data loader workers (default: 4 for a latent folder on CUDA, else 0)")
    g.add_argument("--skip-data-check", action="store_true",
                   help="do not read every latent to check it is finite before training (file headers "
                        "and labels are still checked); for huge sets")
    g = p.add_argument_group("optimisation (defaults from --recipe)")
    g.add_argument("--recipe", default="auto", choices=["auto", *RECIPES],
                   help="published values for the flags below: auto = mdt for MDTv2 models, edt otherwise")
    g.add_argument("--optimizer", default=None, choices=["adamw", "adan"], help=_recipe_help("optimizer"))
    g.add_argument("--schedule-sampler", default=None, choices=["uniform", "loss-second-moment"],
                   help=_recipe_help("schedule_sampler"))
    g.add_argument("--lr", type=float, default=None, help=_recipe_help("lr"))
    g.add_argument("--lr-schedule", default=None, choices=["constant", "linear"],
                   help="linear: --lr -> --min-lr over --lr-decay-steps; " + _recipe_help("lr_schedule"))
    g.add_argument("--min-lr", type=float, default=None, help=_recipe_help("min_lr"))
    g.add_argument("--lr-decay-steps", type=int, default=None, help=_recipe_help("lr_decay_steps"))
    g.add_argument("--weight-decay", type=float, default=None, help=_recipe_help("weight_decay"))
    g.add_argument("--ema-decay", type=float, default=None, help=_recipe_help("ema_decay"))
    g.add_argument("--grad-clip", type=float, default=None,
                   help="max gradient norm, 0 disables; " + _recipe_help("grad_clip"))
    g.add_argument("--global-batch-size", type=int, default=256, help="samples per step over all processes")
    g.add_argument("--epochs", type=int, default=None, help="stop after this many epochs")
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (default: 400000 "
                   "when --epochs is not given)")
    g.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "bf16"],
                   help="auto: bf16 autocast on CUDA, float32 on CPU")
    g.add_argument("--diffusion-steps", type=int, default=1000, help="T of the linear-beta schedule")
    g.add_argument("--grad-checkpoint", default="none", metavar="{none,all,selective,K}",
                   help="activation checkpointing of the blocks: none, all, every K-th block, or selective "
                        "(matmul outputs kept, the rest recomputed); results are unchanged")
    g.add_argument("--compile", default="none", choices=COMPILE_MODES,
                   help="torch.compile the step's forward+loss+backward (whole graph): default (Inductor), "
                        "max-autotune (Inductor with GEMM autotuning), reduce-overhead (the step replayed "
                        "as CUDA graphs on CUDA, default elsewhere); see README")
    g = p.add_argument_group("run")
    g.add_argument("--results-dir", default="results", help="log.txt and checkpoints/ go here")
    g.add_argument("--ckpt-every", type=int, default=50_000, help="steps between checkpoints")
    g.add_argument("--log-every", type=int, default=100, help="steps between log lines")
    g.add_argument("--resume", default=None,
                   help="checkpoint of edt.train to continue from, or 'auto': the newest in "
                        "RESULTS/checkpoints, a fresh start when there is none (restart a preempted job "
                        "with the same command)")
    g.add_argument("--seed", type=int, default=0, help="seeds weights, data order, noise, timesteps, masks")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when available")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads of torch (default: torch's own choice); 1 is fastest for tiny models")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def recipe_values(recipe: str, model: str) -> Dict[str, Any]:
    """The optimisation values of a published recipe for a model (``recipe`` 'auto', 'edt' or 'mdt')."""
    if recipe == "auto":
        recipe = "mdt" if model_family(model) == "mdt" else "edt"
    if recipe not in RECIPES:
        raise ValueError(f"--recipe must be 'auto', 'edt' or 'mdt', got {recipe!r}")
    values = dict(RECIPES[recipe])
    if recipe == "edt" and "XL" in model:
        values["lr"] = EDT_XL_LR
    return values


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = _build_parser()
    args = p.parse_args(argv)
    # which flags were typed: a second parse into a namespace that already holds a marker
    # everywhere (argparse fills in defaults only where the namespace has no value)
    unset = object()
    typed = p.parse_args(argv, namespace=argparse.Namespace(**{k: unset for k in vars(args)}))
    explicit = {k for k, v in vars(typed).items() if v is not unset}
    if args.preset is not None:
        for key, value in PRESETS[args.preset].items():
            if key not in explicit:
                setattr(args, key, deepcopy(value))
        if "data_path" in explicit:
            args.synthetic = False
    if isinstance(args.model_kwargs, str):  # a preset's is a dict already
        with p.usage_errors():
            args.model_kwargs = json_object("--model-kwargs", args.model_kwargs)
    try:
        parse_checkpoint(args.grad_checkpoint)
    except (TypeError, ValueError) as e:
        p.error(f"--grad-checkpoint: {e}")
    if args.recipe == "auto":
        args.recipe = "mdt" if model_family(args.model) == "mdt" else "edt"
    for key, value in recipe_values(args.recipe, args.model).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    with p.usage_errors():
        latent_size(args.image_size)
    # --max-steps and --epochs are None when not given (the other one, or 400000 steps, applies)
    p.require_at_least(args, 1, ("global_batch_size", "log_every", "ckpt_every", "lr_decay_steps", "max_steps",
                                 "epochs"))
    if args.max_steps is None and args.epochs is None:
        args.max_steps = 400_000
    if not args.lr > 0:
        p.error(f"--lr must be > 0, got {args.lr:g}")
    p.require_at_least(args, 0, ("min_lr", "weight_decay", "grad_clip"))  # --grad-clip 0: no clipping
    if not 0 <= args.ema_decay <= 1:
        p.error(f"--ema-decay must be in [0, 1], got {args.ema_decay:g}")
    with p.usage_errors():
        check_output_path("--results-dir", args.results_dir)
    if args.preset == "digits" and not args.data_path and "synthetic" not in explicit:
        args.data_path = str(prepare_digits_folder("train"))
    if not args.data_path:
        args.synthetic = True
    return args


# ---------------------------------------------------------------------------
# Set-up
# ---------------------------------------------------------------------------

def _all_gather_objects(obj, d: Dist) -> list:
    if not d.distributed:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def latest_checkpoint(results_dir) -> Optional[str]:
    """The checkpoint of the highest step in RESULTS/checkpoints (``<step>.pt``), or None.

    Every such name is a complete file: checkpoints are renamed into place once written."""
    found = [(int(p.stem), p) for p in (Path(results_dir) / "checkpoints").glob("*.pt") if p.stem.isdigit()]
    return str(max(found)[1]) if found else None


def _resolve_resume(args: argparse.Namespace, d: Dist) -> None:
    """``--resume auto`` -> the newest checkpoint or None, as rank 0 finds it (one answer for all ranks)."""
    if args.resume != "auto":
        return
    box = [latest_checkpoint(args.results_dir) if d.rank == 0 else None]
    if d.distributed:
        dist.broadcast_object_list(box, src=0)
    args.resume = box[0]
    if d.rank == 0:
        where = Path(args.results_dir) / "checkpoints"
        print(f"--resume auto: continuing from {args.resume}" if args.resume else
              f"--resume auto: no checkpoint in {where}, starting afresh", flush=True)


def read_checkpoint(path: str) -> dict:
    """A checkpoint of ``edt.train``, or ``ValueError("<path>: ...; expected ...")``."""
    expected = f"a training checkpoint of edt.train (format {CHECKPOINT_FORMAT!r})"
    ckpt = load_checkpoint_file(path, expected)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        what = f"a dict without format {CHECKPOINT_FORMAT!r}" if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path}: holds {what} (a published state dict is for edt.sample); expected {expected}")
    missing = [k for k in ("model", "ema", "opt", "step") if k not in ckpt]
    if missing:
        raise ValueError(f"{path}: has no {', '.join(missing)}; expected {expected}")
    return ckpt


def build_dataset(args: argparse.Namespace, d: Dist):
    """The training set, checked on every rank's share before anything is built from it."""
    latent = latent_size(args.image_size)
    in_channels = int(args.model_kwargs.get("in_channels", LATENT_CHANNELS))
    latent_shape = (in_channels, latent, latent)
    if args.synthetic:
        return SyntheticLatents(args.synthetic_size, latent_shape, args.num_classes, seed=args.seed), latent_shape
    dataset = LatentFolder(args.data_path, latent_shape, args.num_classes)
    errors = sum(_all_gather_objects(dataset.validate(d.rank, d.world, check_values=not args.skip_data_check),
                                     d), [])
    if errors:
        raise ValueError(f"invalid latent folder {args.data_path}: {errors[0]}"
                         + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""))
    return dataset, latent_shape


@dataclass
class Run:
    """Everything one training run holds between steps."""
    args: argparse.Namespace
    d: Dist
    model: nn.Module
    ema: nn.Module
    opt: torch.optim.Optimizer
    loss_module: "DiffusionTrainingLoss"
    #: ``loss_module``, compiled with ``--compile``, inside DistributedDataParallel with several processes
    step_fn: Any
    diffusion: Any
    schedule_sampler: Any
    strategy: str
    loader: DataLoader
    sampler: ShardedSampler
    steps_per_epoch: int
    local_batch: int
    max_steps: int
    amp: bool
    results: Path
    step: int = 0
    history: List[Dict] = field(default_factory=list)
    last_ckpt: Optional[str] = None
    log_path: Optional[Path] = None
    run_loss: Optional[torch.Tensor] = None
    run_steps: int = 0
    t0: float = 0.0
    #: the first step whose loss was not finite (1-based), -1 while all were
    bad_step: Optional[torch.Tensor] = None
    bar: Any = None
    stop: Any = None

    @property
    def is_main(self) -> bool:
        return self.d.rank == 0


def log(run: Run, msg: str) -> None:
    """Print on rank 0 and append to RESULTS/log.txt (once the run writes)."""
    if run.is_main:
        if run.bar is not None and hasattr(run.bar, "write") and not getattr(run.bar, "disable", True):
            run.bar.write(msg)  # above the progress bar
            sys.stdout.flush()
        else:
            print(msg, flush=True)
        if run.log_path is not None:
            with open(run.log_path, "a") as f:
                f.write(msg + "\n")


def _restore(run: Run, ckpt: dict) -> None:
    """Model, EMA, optimiser, step, sampler and RNG states of a checkpoint (checked against this run)."""
    args, path = run.args, run.args.resume
    saved_opt = ckpt.get("optimizer", "adamw")  # checkpoints before Adan support were AdamW runs
    if saved_opt != args.optimizer:
        raise ValueError(f"{path}: checkpoint of an {saved_opt} run; expected {args.optimizer} "
                         f"(pass --optimizer {saved_opt} to continue it)")
    saved = ckpt.get("schedule_sampler") or {"name": "uniform", "state": None}
    if saved["name"] != args.schedule_sampler:
        raise ValueError(f"{path}: checkpoint of a run with the {saved['name']} timestep sampler; expected "
                         f"{args.schedule_sampler} (pass --schedule-sampler {saved['name']} to continue it)")
    load_state_dict_strict(run.model, ckpt["model"], f"{path} (model)")
    load_state_dict_strict(run.ema, ckpt["ema"], f"{path} (ema)")
    try:
        run.opt.load_state_dict(ckpt["opt"])
    except (ValueError, KeyError) as e:
        raise ValueError(f"{path}: optimiser state does not fit this model ({e}); expected a checkpoint "
                         f"of the same model") from None
    if saved["state"] is not None and hasattr(run.schedule_sampler, "load_state_dict"):
        run.schedule_sampler.load_state_dict(saved["state"])
    run.step = int(ckpt["step"])
    states = ckpt.get("rng") or []
    if ckpt.get("world_size") == run.d.world and len(states) == run.d.world:
        _set_rng_state(states[run.d.rank], run.d.device)
    else:
        _seed_globals(mix_seed(args.seed, 2, run.d.rank, run.step))
        print(f"note: checkpoint written with world size {ckpt.get('world_size')}, now {run.d.world}: "
              f"global RNG states re-seeded", file=sys.stderr)


def setup(args: argparse.Namespace, d: Dist) -> Run:
    """Check the inputs (checkpoint, data), then build model, EMA, optimiser, sampler, loader.

    Nothing is written before the checks pass."""
    if args.global_batch_size % d.world:
        raise ValueError(f"--global-batch-size {args.global_batch_size} is not divisible by the "
                         f"world size {d.world}")
    local_batch = args.global_batch_size // d.world
    _resolve_resume(args, d)
    ckpt = read_checkpoint(args.resume) if args.resume else None
    dataset, latent_shape = build_dataset(args, d)
    sampler = ShardedSampler(len(dataset), d.world, d.rank, seed=args.seed)
    steps_per_epoch = (len(dataset) // d.world) // local_batch
    if steps_per_epoch < 1:
        raise ValueError(f"the dataset ({len(dataset)} samples) is smaller than one global batch "
                         f"({args.global_batch_size})")
    device = d.device
    num_workers = args.num_workers if args.num_workers is not None else \
        (4 if device.type == "cuda" and not args.synthetic else 0)
    loader = DataLoader(dataset, batch_size=local_batch, sampler=sampler, drop_last=True,
                        num_workers=num_workers, pin_memory=device.type == "cuda")
    max_steps = args.max_steps if args.max_steps is not None else args.epochs * steps_per_epoch
    if args.epochs is not None:
        max_steps = min(max_steps, args.epochs * steps_per_epoch)

    # same initial weights on every rank
    _seed_globals(args.seed)
    model_kwargs = dict(args.model_kwargs)
    if parse_checkpoint(args.grad_checkpoint).enabled:
        model_kwargs["checkpoint"] = args.grad_checkpoint
    model = build_model(args.model, input_size=latent_shape[1], num_classes=args.num_classes, learn_sigma=True,
                        **model_kwargs).to(device)
    ema = deepcopy(model).requires_grad_(False).eval()
    family = model_family(args.model)
    strategy = args.mask_strategy if args.mask_strategy != "auto" else \
        {"edt": "edt", "mdt": "mdt"}.get(family, "none")
    diffusion = create_diffusion(timestep_respacing="", learn_sigma=True, diffusion_steps=args.diffusion_steps)
    schedule_sampler = create_named_schedule_sampler(args.schedule_sampler, diffusion)
    loss_module = DiffusionTrainingLoss(model, diffusion, strategy)
    opt = make_optimizer(args.optimizer, model.parameters(), args.lr, args.weight_decay)
    # The loss module is compiled and DDP wraps the compiled module: DDP's own forward (its
    # bookkeeping before and after the model) stays eager, since Dynamo cannot trace it whole, and
    # the step inside is one graph (with several processes, Dynamo's DDP optimizer cuts it at the
    # gradient buckets so that the all-reduces overlap the backward).
    step_fn = compile_step(loss_module, args.compile, device, fullgraph=family in ("edt", "mdt"))
    if d.distributed:
        step_fn = nn.parallel.DistributedDataParallel(
            step_fn, device_ids=[device.index] if device.type == "cuda" else None,
            # MDT's side interpolater only runs in the masked pass
            find_unused_parameters=strategy == "none" and family != "edt")
    amp = args.mixed_precision == "bf16" or (args.mixed_precision == "auto" and device.type == "cuda")
    run = Run(args=args, d=d, model=model, ema=ema, opt=opt, loss_module=loss_module, step_fn=step_fn,
              diffusion=diffusion,
              schedule_sampler=schedule_sampler, strategy=strategy, loader=loader, sampler=sampler,
              steps_per_epoch=steps_per_epoch, local_batch=local_batch, max_steps=max_steps, amp=amp,
              results=Path(args.results_dir))
    # rank-specific global RNG (anything drawing outside our generators), restored on resume
    _seed_globals(mix_seed(args.seed, 1, d.rank))
    if ckpt is not None:
        _restore(run, ckpt)
    else:
        update_ema(ema, model, decay=0.0)  # EMA starts as a copy of the model
    del ckpt
    run.run_loss = torch.zeros(3, device=device, dtype=torch.float64)
    run.bad_step = torch.full((), -1, dtype=torch.int64, device=device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    if run.is_main:  # the inputs are checked: the run starts writing
        (run.results / "checkpoints").mkdir(parents=True, exist_ok=True)
        for leftover in (run.results / "checkpoints").glob("*.pt" + TMP_SUFFIX):  # of a killed write
            leftover.unlink()
        run.log_path = run.results / "log.txt"
    n_params = sum(p.numel() for p in model.parameters())
    log(run, f"model {args.model} ({n_params / 1e6:.2f}M parameters), mask strategy {strategy}, "
        f"recipe {args.recipe} ({args.optimizer} lr {args.lr:g}"
        + (f" -> {args.min_lr:g} over {args.lr_decay_steps} steps" if args.lr_schedule == "linear" else "")
        + f", {args.schedule_sampler} timesteps, grad clip {args.grad_clip:g}, EMA {args.ema_decay:g}), "
        f"{'bf16 autocast' if amp else 'float32'}, device {device}, world size {d.world}, "
        f"data {'synthetic' if args.synthetic else args.data_path} ({len(dataset)} latents "
        f"{list(latent_shape)}), {steps_per_epoch} steps/epoch, steps {run.step} -> {max_steps}")
    return run


# ---------------------------------------------------------------------------
# One step
# ---------------------------------------------------------------------------

def draw_timesteps(run: Run, n: int, g: torch.Generator):
    """(t int64 [n], importance weights float32 [n] or None) for the whole global batch.

    Uniform: t ~ U{0..T-1}, no weights. Otherwise t ~ p = w / sum(w) from the
    sampler's ``weights()`` and each sample is weighted 1 / (T p_t), as ADM's
    ``ScheduleSampler.sample`` does (drawn here from the step's generator, so
    that the draw is the same for any number of processes)."""
    T = run.diffusion.num_timesteps
    if run.args.schedule_sampler == "uniform":
        return torch.randint(0, T, (n,), generator=g, device=g.device), None
    w = torch.as_tensor(np.asarray(run.schedule_sampler.weights(), dtype=np.float64), device=g.device)
    p = w / w.sum()
    t = torch.multinomial(p, n, replacement=True, generator=g)
    return t, (1.0 / (T * p[t])).float()


def _update_sampler(run: Run, t: torch.Tensor, per_sample: torch.Tensor) -> None:
    """Feed a loss-aware sampler this rank's per-sample losses (it gathers them over the ranks).

    The sampler refuses a non-finite loss (every rank sees the same gathered
    losses, so every rank refuses): that is reported as ``TrainingDiverged``."""
    try:
        run.schedule_sampler.update_with_local_losses(t, per_sample.float())
    except ValueError:
        if not torch.isfinite(per_sample).all() and int(run.bad_step) < 0:
            run.bad_step.fill_(run.step + 1)
        check_finite(run)  # raises when any rank's loss was non-finite
        raise


def train_step(run: Run, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One optimisation step on this rank's batch; returns its float32 [3] losses (detached)."""
    args, d, step = run.args, run.d, run.step
    gen_device = d.device if d.device.type == "cuda" else torch.device("cpu")
    g = torch.Generator(device=gen_device).manual_seed(mix_seed(args.seed, 3, step))
    t_all, w_all = draw_timesteps(run, args.global_batch_size, g)
    shape = (args.global_batch_size, *x.shape[1:])
    noise_all = torch.randn(shape, generator=g, device=gen_device)
    noise2_all = torch.randn(shape, generator=g, device=gen_device) if run.strategy in ("edt", "mdt") else None
    rows = slice(d.rank, None, d.world)
    t = t_all[rows].to(d.device)
    weights = w_all[rows].to(d.device) if w_all is not None else None
    noise = noise_all[rows].to(d.device)
    noise2 = noise2_all[rows].to(d.device) if noise2_all is not None else None
    model_gen = torch.Generator(device=gen_device).manual_seed(mix_seed(args.seed, 4, step, d.rank))
    draws = run.loss_module.draw_ahead(x.shape[0], model_gen, d.device)
    if args.compile == "reduce-overhead" and d.device.type == "cuda":
        torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs are consumed
    with torch.autocast(device_type=d.device.type, dtype=torch.bfloat16, enabled=run.amp):
        losses, per_sample = run.step_fn(x, y, t, noise, noise2, draws, weights=weights, per_sample=True)
    if hasattr(run.schedule_sampler, "update_with_local_losses"):
        _update_sampler(run, t, per_sample)
    run.opt.zero_grad(set_to_none=True)
    losses[0].backward()
    for group in run.opt.param_groups:
        group["lr"] = lr_at(args, step)
    if args.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), args.grad_clip)
    run.opt.step()
    update_ema(run.ema, run.model, args.ema_decay)
    losses = losses.detach()
    run.bad_step = torch.where((run.bad_step < 0) & ~torch.isfinite(losses).all(),
                               torch.full_like(run.bad_step, step + 1), run.bad_step)
    run.step = step + 1
    return losses


# ---------------------------------------------------------------------------
# Checkpoints, logging, signals
# ---------------------------------------------------------------------------

def save_checkpoint(run: Run) -> str:
    """Write RESULTS/checkpoints/<step>.pt (rank 0; whole or not at all: ``atomic_write``); every
    rank takes part.

    Refuses (``TrainingDiverged``) when a loss since the start was not finite: the last
    checkpoint on disk stays the last good one."""
    check_finite(run)
    d = run.d
    rng = _all_gather_objects(_rng_state(d.device), d)
    path = run.results / "checkpoints" / f"{run.step:07d}.pt"
    if run.is_main:
        sampler_state = run.schedule_sampler.state_dict() if hasattr(run.schedule_sampler, "state_dict") else None
        state = {"format": CHECKPOINT_FORMAT, "model": run.model.state_dict(), "ema": run.ema.state_dict(),
                 "opt": run.opt.state_dict(), "optimizer": run.args.optimizer, "step": run.step,
                 "args": vars(run.args), "world_size": d.world, "rng": rng, "mask_strategy": run.strategy,
                 "schedule_sampler": {"name": run.args.schedule_sampler, "state": sampler_state}}
        atomic_write(path, lambda f: torch.save(state, f))
        log(run, f"saved checkpoint {path}")
    if d.distributed:
        dist.barrier()
    run.last_ckpt = str(path)
    return str(path)


def _checkpointed_now(run: Run) -> bool:
    return run.last_ckpt is not None and run.last_ckpt.endswith(f"{run.step:07d}.pt")


def check_finite(run: Run) -> None:
    """Raise ``TrainingDiverged`` (on every rank) when a loss since the start was not finite."""
    bad = run.bad_step.clone()
    if run.d.distributed:
        bad = torch.where(bad < 0, torch.full_like(bad, 1 << 62), bad)
        dist.all_reduce(bad, op=dist.ReduceOp.MIN)
        bad = torch.where(bad == 1 << 62, torch.full_like(bad, -1), bad)
    k = int(bad.item())
    if k >= 0:
        kept = (f"the last checkpoint written is {run.last_ckpt}" if run.last_ckpt else
                "no checkpoint was written by this run" + (f" (it resumed from {run.args.resume})"
                                                            if run.args.resume else ""))
        raise TrainingDiverged(f"the training loss is not finite at step {k}; stopped at step {run.step} "
                               f"without writing a checkpoint; {kept}. Lower --lr, check the data, or "
                               f"use --mixed-precision no")


def log_progress(run: Run) -> None:
    """Average the losses since the last log over the ranks; print, record, reset."""
    d = run.d
    if d.device.type == "cuda":
        torch.cuda.synchronize()
    avg = run.run_loss / run.run_steps
    if d.distributed:
        dist.all_reduce(avg)
        avg /= d.world
    elapsed = time.time() - run.t0
    ips = run.run_steps * run.args.global_batch_size / max(elapsed, 1e-9)
    rec = {"step": run.step, "loss": avg[0].item(), "loss_full": avg[1].item(),
           "loss_masked": avg[2].item(), "images_per_s": ips, "steps_per_s": run.run_steps / max(elapsed, 1e-9)}
    run.history.append(rec)
    log(run, f"(step={run.step:07d}) loss {rec['loss']:.4f} (full {rec['loss_full']:.4f}, masked "
        f"{rec['loss_masked']:.4f}), {ips:.1f} images/s, {rec['steps_per_s']:.2f} steps/s")
    run.run_loss.zero_()
    run.run_steps, run.t0 = 0, time.time()


class StopSignal:
    """SIGINT / SIGTERM set a flag (the run stops after the current step); a second one raises
    ``KeyboardInterrupt``. Installed only in the main thread; ``restore()`` puts back the old handlers."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous: Dict[int, Any] = {}

    def __call__(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def install(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def should_stop(run: Run) -> bool:
    """Whether a stop signal reached any rank; the ranks agree on the step (one tiny all-reduce
    every ``STOP_CHECK_EVERY`` steps with several processes)."""
    asked = run.stop is not None and run.stop.signum is not None
    if not run.d.distributed:
        return asked
    if run.step % STOP_CHECK_EVERY:
        return False
    flag = torch.tensor([int(asked)], device=run.d.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _after_step(run: Run, losses: torch.Tensor) -> bool:
    """Bookkeeping after a step: progress, log, finite check, checkpoint; True to stop."""
    args = run.args
    run.run_loss += losses.double()
    run.run_steps += 1
    run.bar.update(1)
    shown = run.step <= PROGRESS_LOSS_EVERY or run.step % PROGRESS_LOSS_EVERY == 0
    if shown and run.is_main and hasattr(run.bar, "set_postfix_str"):
        run.bar.set_postfix_str(f"loss {losses[0].item():.4f}")
    log_now = run.step % args.log_every == 0 or run.step == run.max_steps
    save_now = run.step % args.ckpt_every == 0
    if log_now or run.step % STOP_CHECK_EVERY == 0:
        check_finite(run)  # every rank reaches this at the same steps (save_checkpoint checks too)
    if log_now:
        log_progress(run)
    if save_now:
        save_checkpoint(run)
    if should_stop(run):
        if not _checkpointed_now(run):
            save_checkpoint(run)
        log(run, f"interrupted (signal {run.stop.signum}) after step {run.step}; continue with "
            f"--resume {run.last_ckpt} (or --resume auto)")
        return True
    return False


def train_loop(run: Run) -> bool:
    """Steps until --max-steps / --epochs or a stop signal; True when interrupted."""
    device = run.d.device
    epoch = run.step // run.steps_per_epoch
    while run.step < run.max_steps:
        run.sampler.set_epoch(epoch, start=(run.step % run.steps_per_epoch) * run.local_batch)
        for x, y in run.loader:
            losses = train_step(run, x.to(device, non_blocking=True), y.to(device, non_blocking=True))
            if _after_step(run, losses):
                return True
            if run.step >= run.max_steps:
                break
        epoch += 1
    return False


def train(args: argparse.Namespace, d: Dist) -> Dict:
    """Set up and run; returns ``{"step", "history", "checkpoint", "results_dir", "interrupted"}``."""
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    run = setup(args, d)
    run.model.train()
    run.t0 = time.time()
    run.bar = progress_bar(total=run.max_steps, initial=run.step, desc="training",
                           disable=args.no_progress or not run.is_main)
    run.stop = StopSignal().install()
    try:
        interrupted = train_loop(run)
        if not _checkpointed_now(run):
            save_checkpoint(run)
    finally:
        run.stop.restore()
        run.bar.close()
    if not interrupted:
        log(run, f"done: {run.step} steps")
    return {"step": run.step, "history": run.history, "checkpoint": run.last_ckpt,
            "results_dir": str(run.results), "interrupted": interrupted}


def main(argv: Optional[List[str]] = None) -> Dict:
    """Run training; returns ``{"step", "history", "checkpoint", "results_dir", "interrupted"}``
    (rank 0's view). Bad input raises ``ValueError``; a non-finite loss ``TrainingDiverged``."""
    args = parse_args(argv)
    with process_group(args.device) as d:
        return train(args, d)


def console_main(argv: Optional[List[str]] = None) -> int:
    """``python -m edt.train``: exit 0 (done), 130 (interrupted), 2 (bad input, one ``error:``
    line), 1 (non-finite loss, or another rank of a distributed job died: one ``error:`` line)."""
    try:
        result = main(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        return exit_status_of_peer_failure(e)  # re-raises any other error
    return 130 if result["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(console_main(sys.argv[1:]))
