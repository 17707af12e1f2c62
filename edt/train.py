"""Train EDT / MDTv2 on VAE latents: ``python -m edt.train`` (or ``torchrun ... -m edt.train``).

    # anywhere, no download: the built-in synthetic latents, a tiny run
    python -m edt.train --model EDT-S/2 --synthetic --max-steps 200 --global-batch-size 32
    # the published recipe on pre-extracted ImageNet latents, 8 GPUs
    torchrun --nproc_per_node=8 -m edt.train --model EDT-S/2 --data-path features/ \\
        --global-batch-size 256 --max-steps 400000

One optimisation step (per rank, on ``global_batch / world_size`` samples):

* t ~ U{0..999} and the noise are drawn for the WHOLE global batch from a
  generator seeded by (seed, step); rank r takes rows r, r + W, r + 2W, ...,
  the rows of its samples (``DistributedSampler`` deals sample k of a global
  batch to rank k mod W). So a run's maths does not depend on how many
  processes share the batch.
* masking strategy (``--mask-strategy auto`` picks it from the model name):
  ``edt``: loss(full forward) + loss(``enable_mask=True`` forward) on the SAME
  noised batch (SPEC 6); ``mdt``: the same sum with the same t, the masked
  forward on an independently noised copy of the batch (MDT's train loop calls
  ``training_losses`` twice, each drawing its own noise; note that the authors'
  EDT script does the same); ``none``: the full forward only.
  The loss of each forward is the diffusion loss MSE(eps) + VB.
* AdamW (weight decay 0; constant lr as DiT/MDT, or ``--lr-schedule linear``
  as the EDT recipe's 5e-4 -> 5e-5 decay, which the authors ran with Adan),
  optional gradient clipping, EMA update.
* Random draws inside the model (label dropout, masks) use a generator seeded
  by (seed, step, rank) when the model's forward takes ``generator=``,
  otherwise the (checkpointed) global RNG.

Checkpoints (``RESULTS/checkpoints/<step>.pt``) hold model, EMA, optimiser,
step, the arguments and every rank's RNG states; ``--resume`` continues
bit-exactly (same data order, noise and masks) when the world size is unchanged.
SIGINT / SIGTERM (Ctrl-C, a cluster's pre-emption) finish the current step,
write a checkpoint and exit with status 130; a second signal stops at once.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import random
import signal
import sys
import threading
import time
from copy import deepcopy
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Sampler

from .data import LatentFolder, SyntheticLatents
from .diffusion import create_diffusion
from .models import load_state_dict_strict
from .utils import build_model, model_family, progress_bar

__all__ = ["main", "parse_args", "DiffusionTrainingLoss", "ShardedSampler", "update_ema", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "edt-train-v1"
#: The SD VAE downsamples by 8: a 256px image is a 32x32 latent.
VAE_DOWNSAMPLE = 8
LATENT_CHANNELS = 4
#: With several processes, a stop signal is acted on at the next step that is a multiple of this.
STOP_CHECK_EVERY = 10


# ---------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------

def _seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (numpy SeedSequence)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint32)
               .astype(np.uint64).dot(np.array([1, 1 << 32], dtype=np.uint64)) & np.uint64((1 << 63) - 1))


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


class DiffusionTrainingLoss(nn.Module):
    """Wraps a model so that ONE forward computes the step's whole loss (full + masked pass)."""

    def __init__(self, model: nn.Module, diffusion, strategy: str):
        super().__init__()
        if strategy not in ("edt", "mdt", "none"):
            raise ValueError(f"mask strategy must be 'edt', 'mdt' or 'none', got {strategy!r}")
        self.model = model
        self.diffusion = diffusion
        self.strategy = strategy
        try:
            self._takes_generator = "generator" in inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            self._takes_generator = False

    def forward(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                noise_masked: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Returns float32 [3]: (total loss, full-pass loss, masked-pass loss or 0)."""
        kwargs = {"y": y}
        if self._takes_generator and generator is not None:
            kwargs["generator"] = generator
        full = self.diffusion.training_losses(self.model, x, t, kwargs, noise=noise)["loss"].mean()
        if self.strategy == "none":
            return torch.stack([full, full.detach(), torch.zeros_like(full)])
        masked_noise = noise if self.strategy == "edt" else noise_masked
        if masked_noise is None:
            raise ValueError("the 'mdt' strategy needs noise_masked")
        masked = self.diffusion.training_losses(self.model, x, t, dict(kwargs, enable_mask=True),
                                                noise=masked_noise)["loss"].mean()
        return torch.stack([full + masked, full.detach(), masked.detach()])


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


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m edt.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default="EDT-S/2", help="published name (EDT-S/2, MDTv2-S/2, ...) or module:factory")
    g.add_argument("--model-kwargs", default="{}", help="JSON dict of constructor overrides (tiny test models)")
    g.add_argument("--image-size", type=int, default=256, help="pixels; the latent side is image-size / 8")
    g.add_argument("--num-classes", type=int, default=1000)
    g.add_argument("--mask-strategy", default="auto", choices=["auto", "edt", "mdt", "none"],
                   help="auto: edt for EDT models, mdt for MDTv2, none otherwise")
    g = p.add_argument_group("data")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--data-path", default=None, help="folder of latents (see edt.data for the layouts)")
    src.add_argument("--synthetic", action="store_true", help="built-in class-conditional blobs (default "
                     "when no --data-path is given)")
    g.add_argument("--synthetic-size", type=int, default=4096)
    g.add_argument("--num-workers", type=int, default=None,
                   help="data loader workers (default: 4 for a latent folder on CUDA, else 0)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--global-batch-size", type=int, default=256)
    g.add_argument("--epochs", type=int, default=None, help="stop after this many epochs")
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (default 400000 "
                   "when --epochs is not given)")
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--lr-schedule", default="constant", choices=["constant", "linear"],
                   help="linear: lr -> --min-lr over --lr-decay-steps (the published EDT recipe: "
                        "5e-4 -> 5e-5 over 400k steps)")
    g.add_argument("--min-lr", type=float, default=5e-5)
    g.add_argument("--lr-decay-steps", type=int, default=400_000)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--ema-decay", type=float, default=0.9999)
    g.add_argument("--grad-clip", type=float, default=0.0, help="max gradient norm; 0 disables")
    g.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "bf16"],
                   help="auto: bf16 autocast on CUDA, float32 on CPU")
    g.add_argument("--diffusion-steps", type=int, default=1000)
    g = p.add_argument_group("run")
    g.add_argument("--results-dir", default="results")
    g.add_argument("--ckpt-every", type=int, default=50_000)
    g.add_argument("--log-every", type=int, default=100)
    g.add_argument("--resume", default=None, help="checkpoint to continue from")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        args.model_kwargs = json.loads(args.model_kwargs) if isinstance(args.model_kwargs, str) else args.model_kwargs
    except json.JSONDecodeError as e:
        p.error(f"--model-kwargs is not valid JSON: {e}")
    if not isinstance(args.model_kwargs, dict):
        p.error("--model-kwargs must be a JSON object")
    if args.image_size % VAE_DOWNSAMPLE:
        p.error(f"--image-size must be a multiple of {VAE_DOWNSAMPLE}, got {args.image_size}")
    if args.max_steps is None and args.epochs is None:
        args.max_steps = 400_000
    for name in ("global_batch_size", "log_every", "ckpt_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not args.data_path:
        args.synthetic = True
    return args


# ---------------------------------------------------------------------------
# Distributed set-up
# ---------------------------------------------------------------------------

def _setup_distributed(device_arg: str):
    use_cuda = torch.cuda.is_available() if device_arg == "auto" else device_arg == "cuda"
    if device_arg == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked but no CUDA device is available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    distributed = world > 1
    if distributed and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", init_method="env://")
    return distributed, rank, world, device


def _all_gather_objects(obj, distributed: bool, world: int) -> list:
    if not distributed:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------

def main(argv: Optional[List[str]] = None) -> Dict:
    """Run training; returns ``{"step", "history", "checkpoint", "results_dir"}`` (rank 0's view)."""
    args = parse_args(argv)
    distributed, rank, world, device = _setup_distributed(args.device)
    try:
        return _train(args, distributed, rank, world, device)
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()


def _train(args, distributed: bool, rank: int, world: int, device: torch.device) -> Dict:
    if args.global_batch_size % world:
        raise ValueError(f"--global-batch-size {args.global_batch_size} is not divisible by the "
                         f"world size {world}")
    local_batch = args.global_batch_size // world
    is_main = rank == 0
    results = Path(args.results_dir)
    ckpt_dir = results / "checkpoints"
    log_path: Optional[Path] = None  # set once the run is checked and starts writing

    def log(msg: str) -> None:
        if is_main:
            print(msg, flush=True)
            if log_path is not None:
                with open(log_path, "a") as f:
                    f.write(msg + "\n")

    # -- resume: read the checkpoint first (it may carry the run's arguments) --------------
    ckpt = None
    if args.resume:
        ckpt = torch.load(args.resume, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{args.resume} is not a training checkpoint of edt.train "
                             f"(format {CHECKPOINT_FORMAT!r})")

    # -- data: validated before anything else is built ------------------------------------
    latent = args.image_size // VAE_DOWNSAMPLE
    in_channels = int(args.model_kwargs.get("in_channels", LATENT_CHANNELS))
    latent_shape = (in_channels, latent, latent)
    if args.synthetic:
        dataset = SyntheticLatents(args.synthetic_size, latent_shape, args.num_classes, seed=args.seed)
    else:
        dataset = LatentFolder(args.data_path, latent_shape, args.num_classes)
        errors = sum(_all_gather_objects(dataset.validate(rank, world), distributed, world), [])
        if errors:
            raise ValueError(f"invalid latent folder {args.data_path}: {errors[0]}"
                             + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""))
    sampler = ShardedSampler(len(dataset), world, rank, seed=args.seed)
    steps_per_epoch = (len(dataset) // world) // local_batch
    if steps_per_epoch < 1:
        raise ValueError(f"the dataset ({len(dataset)} samples) is smaller than one global batch "
                         f"({args.global_batch_size})")
    num_workers = args.num_workers if args.num_workers is not None else \
        (4 if device.type == "cuda" and not args.synthetic else 0)
    loader = DataLoader(dataset, batch_size=local_batch, sampler=sampler, drop_last=True,
                        num_workers=num_workers, pin_memory=device.type == "cuda")
    max_steps = args.max_steps if args.max_steps is not None else args.epochs * steps_per_epoch
    if args.epochs is not None:
        max_steps = min(max_steps, args.epochs * steps_per_epoch)

    # -- model, EMA, optimiser (same initial weights on every rank) --------------------------
    _seed_globals(args.seed)
    model = build_model(args.model, input_size=latent, num_classes=args.num_classes, learn_sigma=True,
                        **args.model_kwargs).to(device)
    ema = deepcopy(model).requires_grad_(False).eval()
    family = model_family(args.model)
    strategy = args.mask_strategy if args.mask_strategy != "auto" else \
        {"edt": "edt", "mdt": "mdt"}.get(family, "none")
    diffusion = create_diffusion(timestep_respacing="", learn_sigma=True, diffusion_steps=args.diffusion_steps)
    loss_module = DiffusionTrainingLoss(model, diffusion, strategy)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    step = 0
    if ckpt is not None:
        load_state_dict_strict(model, ckpt["model"], f"{args.resume} (model)")
        load_state_dict_strict(ema, ckpt["ema"], f"{args.resume} (ema)")
        opt.load_state_dict(ckpt["opt"])
        step = int(ckpt["step"])
    if distributed:
        ddp = nn.parallel.DistributedDataParallel(
            loss_module, device_ids=[device.index] if device.type == "cuda" else None,
            # MDT's side interpolater only runs in the masked pass
            find_unused_parameters=strategy == "none" and family != "edt")
    else:
        ddp = loss_module
    # rank-specific global RNG (anything drawing outside our generators), restored on resume
    _seed_globals(_seed(args.seed, 1, rank))
    if ckpt is not None:
        states = ckpt.get("rng") or []
        if ckpt.get("world_size") == world and len(states) == world:
            _set_rng_state(states[rank], device)
        else:
            _seed_globals(_seed(args.seed, 2, rank, step))
            print(f"note: checkpoint written with world size {ckpt.get('world_size')}, now {world}: "
                  f"global RNG states re-seeded", file=sys.stderr)
    else:
        update_ema(ema, model, decay=0.0)  # EMA starts as a copy of the model
    del ckpt

    # nothing is written before the data and the checkpoint have been checked
    if is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        log_path = results / "log.txt"
    amp = args.mixed_precision == "bf16" or (args.mixed_precision == "auto" and device.type == "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model {args.model} ({n_params / 1e6:.2f}M parameters), mask strategy {strategy}, "
        f"{'bf16 autocast' if amp else 'float32'}, device {device}, world size {world}, "
        f"data {'synthetic' if args.synthetic else args.data_path} ({len(dataset)} latents "
        f"{list(latent_shape)}), {steps_per_epoch} steps/epoch, steps {step} -> {max_steps}")

    model.train()
    history: List[Dict] = []
    last_ckpt = None
    gen_device = device if device.type == "cuda" else torch.device("cpu")
    T = diffusion.num_timesteps
    run_loss = torch.zeros(3, device=device, dtype=torch.float64)
    run_steps, t0 = 0, time.time()
    bar = progress_bar(total=max_steps, initial=step, desc="training", disable=args.no_progress or not is_main)

    def save(at_step: int) -> str:
        rng = _all_gather_objects(_rng_state(device), distributed, world)
        path = ckpt_dir / f"{at_step:07d}.pt"
        if is_main:
            state = {"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "ema": ema.state_dict(),
                     "opt": opt.state_dict(), "step": at_step, "args": vars(args), "world_size": world,
                     "rng": rng, "mask_strategy": strategy}
            tmp = path.with_suffix(".pt.tmp")
            torch.save(state, tmp)
            os.replace(tmp, path)
            log(f"saved checkpoint {path}")
        if distributed:
            dist.barrier()
        return str(path)

    def lr_at(k: int) -> float:
        if args.lr_schedule == "constant":
            return args.lr
        return args.lr - (args.lr - args.min_lr) * min(k, args.lr_decay_steps) / max(args.lr_decay_steps, 1)

    def _loop() -> bool:
        nonlocal step, epoch, last_ckpt, run_loss, run_steps, t0
        while step < max_steps:
            sampler.set_epoch(epoch, start=(step % steps_per_epoch) * local_batch)
            for x, y in loader:
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
                # the step's noise and timesteps, for the whole global batch; this rank's rows
                g = torch.Generator(device=gen_device).manual_seed(_seed(args.seed, 3, step))
                t_all = torch.randint(0, T, (args.global_batch_size,), generator=g, device=gen_device)
                noise_all = torch.randn((args.global_batch_size, *x.shape[1:]), generator=g, device=gen_device)
                noise2_all = torch.randn((args.global_batch_size, *x.shape[1:]), generator=g, device=gen_device) \
                    if strategy == "mdt" else None
                t = t_all[rank::world].to(device)
                noise = noise_all[rank::world].to(device)
                noise2 = noise2_all[rank::world].to(device) if noise2_all is not None else None
                model_gen = torch.Generator(device=gen_device).manual_seed(_seed(args.seed, 4, step, rank))
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
                    losses = ddp(x, y, t, noise, noise2, model_gen)
                opt.zero_grad(set_to_none=True)
                losses[0].backward()
                for group in opt.param_groups:
                    group["lr"] = lr_at(step)
                if args.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
                opt.step()
                update_ema(ema, model, args.ema_decay)
                step += 1
                run_loss += losses.detach().double()
                run_steps += 1
                bar.update(1)

                if step % args.log_every == 0 or step == max_steps:
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    avg = run_loss / run_steps
                    if distributed:
                        dist.all_reduce(avg)
                        avg /= world
                    elapsed = time.time() - t0
                    ips = run_steps * args.global_batch_size / max(elapsed, 1e-9)
                    rec = {"step": step, "loss": avg[0].item(), "loss_full": avg[1].item(),
                           "loss_masked": avg[2].item(), "images_per_s": ips,
                           "steps_per_s": run_steps / max(elapsed, 1e-9)}
                    history.append(rec)
                    log(f"(step={step:07d}) loss {rec['loss']:.4f} (full {rec['loss_full']:.4f}, masked "
                        f"{rec['loss_masked']:.4f}), {ips:.1f} images/s, {rec['steps_per_s']:.2f} steps/s")
                    if hasattr(bar, "set_postfix_str"):
                        bar.set_postfix_str(f"loss {rec['loss']:.4f}")
                    run_loss.zero_()
                    run_steps, t0 = 0, time.time()
                if step % args.ckpt_every == 0:
                    last_ckpt = save(step)
                if should_stop():
                    if last_ckpt is None or not last_ckpt.endswith(f"{step:07d}.pt"):
                        last_ckpt = save(step)
                    log(f"interrupted (signal {stop_request['signal']}) after step {step}; continue with "
                        f"--resume {last_ckpt}")
                    return True
                if step >= max_steps:
                    break
            epoch += 1
        return False

    # SIGINT / SIGTERM: finish the current step, checkpoint, stop (every rank at the same step)
    stop_request = {"signal": None}

    def on_signal(signum, frame):
        if stop_request["signal"] is not None:  # a second signal: give up at once
            raise KeyboardInterrupt
        stop_request["signal"] = signum

    previous_handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous_handlers[sig] = signal.signal(sig, on_signal)

    def should_stop() -> bool:
        asked = stop_request["signal"] is not None
        if not distributed:
            return asked
        if step % STOP_CHECK_EVERY:  # ranks agree on the stop step: one tiny all-reduce every few steps
            return False
        flag = torch.tensor([int(asked)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    interrupted = False
    epoch = step // steps_per_epoch
    try:
        interrupted = _loop()
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)

    if last_ckpt is None or not last_ckpt.endswith(f"{step:07d}.pt"):
        last_ckpt = save(step)
    bar.close()
    if not interrupted:
        log(f"done: {step} steps")
    return {"step": step, "history": history, "checkpoint": last_ckpt, "results_dir": str(results),
            "interrupted": interrupted}


if __name__ == "__main__":
    try:
        result = main(sys.argv[1:])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(130 if result["interrupted"] else 0)
