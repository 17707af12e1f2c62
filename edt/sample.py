"""Class-conditional sampling: ``python -m edt.sample`` (or ``torchrun ... -m edt.sample``).

    python -m edt.sample --ckpt results/checkpoints/0400000.pt --cfg-scale 1.5 \\
        --num-samples 64 --vae /path/to/sd-vae-ft-ema --out-dir samples/
    # FID-50K samples on 8 GPUs (resumable: run the same command again after an interruption)
    torchrun --nproc_per_node=8 -m edt.sample --ckpt ... --num-samples 50000 --batch-size 125 \\
        --cfg-scale 1.5 --vae /path/to/sd-vae-ft-ema --out-dir samples50k/

Writes ``OUT/samples.npz`` whose ``arr_0`` is uint8 ``[N, H, W, 3]``, the format
ADM's evaluator (FID/IS/precision/recall) reads, the labels as
``OUT/labels.npy`` (int64 ``[N]``), one PNG per sample in ``OUT/images/``
(``--no-image-folder`` skips them) and a grid of the first ``--grid-max``
samples, ``OUT/samples.png``. With ``--vae`` (a local diffusers
``AutoencoderKL`` folder; diffusers is then required) the latents are decoded
to pixels (``z / 0.18215``); without it the latents themselves are written,
first 3 channels in [-1, 1] as RGB (what the built-in synthetic data looks like).

The N samples are cut into chunks of ``--batch-size``; with W processes, rank r
makes the chunks c = r, r + W, ... Each finished chunk is written to
``OUT/shards/<c>.npz`` at once, whole or not at all (a temporary file, fsynced
and renamed); a run that finds a chunk on disk skips it, so a run killed at any
moment continues where it stopped when the same command is run again (the settings are recorded in
``OUT/shards/config.json``, and a run with other settings is refused). Without
``--no-image-folder`` a run also writes the PNGs missing from ``OUT/images/``
of the chunks it finds done, from their shards. A
chunk's noise comes from a generator seeded by (seed, chunk): the samples do
not depend on the number of processes.

Sampling is respaced DDPM (``--num-sampling-steps``, 250 by default) or DDIM
(``--ddim``). ``--cfg-scale`` > 1 runs classifier-free guidance through the
model's ``forward_with_cfg`` on [cond, uncond] halves (EDT/DiT: constant scale
on the first 3 channels, or all of them for a model with fewer; MDTv2: its power-cosine
schedule of t).
``--amm/--no-amm`` switches EDT's attention modulation at inference.
The model, image size, class count and constructor overrides default to those
stored in a checkpoint of ``edt.train``.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from .cli import ArgumentParser, check_output_path, json_object, run_command
from .data import VAE_SCALE_FACTOR, latent_size
from .diffusion import create_diffusion
from .distributed import mix_seed, process_group
from .models import load_state_dict_strict
from .models.common import CFG_CHANNELS
from .utils import COMPILE_MODES, TMP_SUFFIX, atomic_write, build_model, check_run_config, compile_step, \
    latents_to_uint8, load_checkpoint_file, make_grid, pixels_to_uint8, progress_bar, write_png

__all__ = ["main", "console_main", "parse_args", "load_weights", "sample_chunk"]

DEFAULT_MODEL = "EDT-S/2"


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = ArgumentParser("python -m edt.sample", __doc__)
    p.add_argument("--model", default=None, help=f"model name (default: the checkpoint's, else {DEFAULT_MODEL})")
    p.add_argument("--model-kwargs", default=None, help="JSON constructor overrides (default: the checkpoint's)")
    p.add_argument("--ckpt", default=None, help="edt.train checkpoint, or a published state dict (.pt); "
                   "without it the weights are random (smoke tests only)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA, of a training checkpoint")
    p.add_argument("--image-size", type=int, default=None, help="pixels (default: the checkpoint's, else 256)")
    p.add_argument("--num-classes", type=int, default=None, help="default: the checkpoint's, else 1000")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale; 1 disables")
    p.add_argument("--num-sampling-steps", type=int, default=250, help="respaced DDPM (or DDIM) steps")
    p.add_argument("--ddim", action="store_true", help="DDIM instead of ancestral (DDPM) sampling")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    amm = p.add_mutually_exclusive_group()
    amm.add_argument("--amm", dest="amm", action="store_true", default=None,
                     help="AMM on, at the model's published blocks (default: the model's own setting, "
                          "which for EDT is on)")
    amm.add_argument("--no-amm", dest="amm", action="store_false",
                     help="AMM off (default: the model's own setting, which for EDT is on)")
    p.add_argument("--num-samples", type=int, default=16, help="N, in all (50000 for FID-50K)")
    p.add_argument("--batch-size", type=int, default=16, help="samples per forward, per process")
    p.add_argument("--class-labels", type=int, nargs="*", default=None,
                   help="labels, cycled to --num-samples (default: uniformly random)")
    p.add_argument("--seed", type=int, default=0, help="seeds the labels and every chunk's noise")
    p.add_argument("--vae", default=None, help="local diffusers AutoencoderKL folder (default: no decoding, "
                   "the latents are written)")
    p.add_argument("--out-dir", default="samples", help="samples.npz, labels.npy, samples.png, images/, shards/")
    p.add_argument("--no-image-folder", action="store_true", help="do not write OUT/images/<i>.png")
    p.add_argument("--overwrite", action="store_true", help="discard the shards (and images) of an earlier "
                   "run in --out-dir instead of resuming it")
    p.add_argument("--grid-nrow", type=int, default=8, help="images per row of the grid")
    p.add_argument("--grid-max", type=int, default=64, help="samples in the grid OUT/samples.png")
    p.add_argument("--mixed-precision", default="no", choices=["no", "bf16"], help="bf16: autocast the model")
    p.add_argument("--compile", default="none", choices=COMPILE_MODES,
                   help="torch.compile the model's step (whole graph): default, max-autotune, reduce-overhead "
                        "(replayed as CUDA graphs on CUDA, default elsewhere); see README")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when available")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    with p.usage_errors():
        if args.model_kwargs is not None:
            args.model_kwargs = json_object("--model-kwargs", args.model_kwargs)
        check_output_path("--out-dir", args.out_dir)
    # --num-classes and --image-size are None when not given (the checkpoint's value applies)
    p.require_at_least(args, 1, ("num_samples", "batch_size", "num_sampling_steps", "grid_max", "grid_nrow",
                                 "num_classes"))
    if args.image_size is not None:
        with p.usage_errors():
            latent_size(args.image_size)
    return args


def load_weights(path: str, use_ema: bool = True):
    """(state_dict, training args or {}) of an ``edt.train`` checkpoint or a bare/published state dict.

    A missing, truncated or foreign file raises ``ValueError("<path>: ...; expected ...")``."""
    expected = "an edt.train checkpoint or a model state dict (.pt)"
    ckpt = load_checkpoint_file(path, expected)
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path}: holds a {type(ckpt).__name__}; expected {expected}")
    args = ckpt.get("args")
    train_args = vars(args) if isinstance(args, argparse.Namespace) else args if isinstance(args, dict) else {}
    if use_ema and isinstance(ckpt.get("ema"), dict):
        return ckpt["ema"], train_args
    if isinstance(ckpt.get("model"), dict):
        return ckpt["model"], train_args
    if isinstance(ckpt.get("ema"), dict):
        return ckpt["ema"], train_args
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return ckpt, {}
    raise ValueError(f"{path}: no 'ema' / 'model' state dict and not a state dict itself (keys: "
                     f"{sorted(map(str, ckpt))[:10]}); expected {expected}")


def _decoder(vae_path: Optional[str], device: torch.device):
    """latents -> uint8 [N, H, W, 3]: a local diffusers VAE, or the latents themselves."""
    if vae_path is None:
        return latents_to_uint8
    try:
        from diffusers.models import AutoencoderKL  # optional
    except ImportError:
        raise ValueError("--vae needs the diffusers package (pip install diffusers)") from None
    if not Path(vae_path).is_dir():
        raise ValueError(f"--vae {vae_path}: not a directory; expected a local diffusers AutoencoderKL folder")
    return _VaeDecoder(AutoencoderKL.from_pretrained(vae_path).to(device).eval())


class _VaeDecoder:
    def __init__(self, vae):
        self.vae = vae

    @torch.no_grad()
    def __call__(self, z: torch.Tensor) -> np.ndarray:
        return pixels_to_uint8(self.vae.decode(z / VAE_SCALE_FACTOR).sample)


def _labels(args, n: int, num_classes: int) -> torch.Tensor:
    """All N labels: ``--class-labels`` cycled, else uniformly random from the seed."""
    if args.class_labels:
        bad = [c for c in args.class_labels if not 0 <= c < num_classes]
        if bad:
            raise ValueError(f"--class-labels {bad} out of range [0, {num_classes})")
        return torch.tensor([args.class_labels[i % len(args.class_labels)] for i in range(n)])
    return torch.randint(0, num_classes, (n,), generator=torch.Generator().manual_seed(args.seed))


@torch.no_grad()
def model_steps(model, mode: str, device: torch.device) -> Dict[str, Any]:
    """The model's step for the sampler: ``cfg`` (``forward_with_cfg``) and ``plain`` (``forward``),
    compiled in ``mode`` (``--compile``; the model itself is left as it was).  A model without
    ``forward_with_cfg`` has no ``cfg`` step."""
    steps = {"plain": compile_step(model.forward, mode, device)}
    if hasattr(model, "forward_with_cfg"):
        steps["cfg"] = compile_step(model.forward_with_cfg, mode, device)
    return steps


def sample_chunk(step_fns: Dict[str, Any], diffusion, decode, args, y: torch.Tensor, chunk: int, in_channels: int,
                 latent: int, num_classes: int, device: torch.device, progress: bool = False) -> np.ndarray:
    """Images uint8 [b, H, W, 3] of one chunk of samples (``step_fns``: :func:`model_steps`): its noise
    and the sampler's draws come from a generator seeded by (seed, chunk), so a chunk's images do not
    depend on which process makes it or on what was made before."""
    gen = torch.Generator(device=device).manual_seed(mix_seed(args.seed, 7, chunk))
    y = y.to(device)
    b = len(y)
    z = torch.randn((b, in_channels, latent, latent), generator=gen, device=device)
    if args.cfg_scale > 1.0:
        z = torch.cat([z, z], 0)
        y = torch.cat([y, torch.full_like(y, num_classes)], 0)  # the null class
        if "cfg" not in step_fns:
            raise ValueError(f"--cfg-scale {args.cfg_scale} needs a model with forward_with_cfg "
                             f"(guidance); use --cfg-scale 1")
        model_fn, kwargs = step_fns["cfg"], {"y": y, "cfg_scale": args.cfg_scale}
        if in_channels < CFG_CHANNELS:  # fewer channels than the guided share of 4 VAE channels
            kwargs["cfg_channels"] = in_channels
    else:
        model_fn, kwargs = step_fns["plain"], {"y": y}
    loop = diffusion.ddim_sample_loop if args.ddim else diffusion.p_sample_loop
    extra = {"eta": args.eta} if args.ddim else {}
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=args.mixed_precision == "bf16"):
        out = loop(model_fn, tuple(z.shape), z, clip_denoised=False, model_kwargs=kwargs, device=device,
                   progress=progress, generator=gen, **extra)
    return decode(out[:b].float())


def _run_config(args, model_name: str, model_kwargs: dict, image_size: int, num_classes: int) -> dict:
    """What determines the samples: a resumed run must match it."""
    return {"ckpt": str(Path(args.ckpt).resolve()) if args.ckpt else None, "no_ema": args.no_ema,
            "model": model_name, "model_kwargs": model_kwargs, "image_size": image_size,
            "num_classes": num_classes, "cfg_scale": args.cfg_scale,
            "num_sampling_steps": args.num_sampling_steps, "ddim": args.ddim, "eta": args.eta, "amm": args.amm,
            "num_samples": args.num_samples, "batch_size": args.batch_size, "class_labels": args.class_labels,
            "seed": args.seed, "vae": str(Path(args.vae).resolve()) if args.vae else None,
            "mixed_precision": args.mixed_precision}


def _discard_earlier_run(out_dir: Path) -> None:
    """--overwrite: remove the files an earlier run of edt.sample wrote (nothing else)."""
    for pattern in ("shards/[0-9]*.npz", "shards/*" + TMP_SUFFIX, "shards/config.json", "images/[0-9]*.png",
                    "images/[0-9]*.png" + TMP_SUFFIX):
        for f in out_dir.glob(pattern):
            f.unlink()


def _check_shard_dir(shards: Path, config: dict, d, overwrite: bool = False) -> None:
    """Rank 0 records the run's settings in SHARDS/config.json; a resumed run must match them."""
    if overwrite and d.rank == 0:
        _discard_earlier_run(shards.parent)
    check_run_config(shards / "config.json", config, d, "the shards of another sampling run",
                     "--overwrite to discard it, or another --out-dir")


def _read_shard(path: Path, size: int):
    """(images, labels) of a finished shard, or None when it is missing or unreadable."""
    try:
        with np.load(path, allow_pickle=False) as z:
            images, labels = z["images"], z["labels"]
    except Exception:  # noqa: BLE001 - a half-written zip raises BadZipFile, OSError, ValueError, ...
        return None
    return (images, labels) if len(images) == size and len(labels) == size else None


def _write_images(image_dir: Path, lo: int, images: np.ndarray, missing_only: bool = False) -> None:
    """IMAGES/<lo + i>.png for every image i (only those not there with ``missing_only``). Each is
    written under a temporary name and renamed, so a PNG that exists is a whole one."""
    for i, image in enumerate(images):
        path = image_dir / f"{lo + i:06d}.png"
        if missing_only and path.exists():
            continue
        tmp = path.with_name(path.name + TMP_SUFFIX)
        write_png(tmp, image)
        os.replace(tmp, path)


def _write_shard(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    atomic_write(path, lambda f: np.savez(f, images=images, labels=labels))  # whole or not at all


@torch.no_grad()
def main(argv: Optional[List[str]] = None) -> Dict:
    """Sample; returns ``{"png", "npz", "images" (uint8 [N,H,W,3]), "labels", "made", "resumed"}`` on
    rank 0 (``made``/``resumed``: this rank's chunks generated now / found done)."""
    args = parse_args(argv)
    with process_group(args.device) as d:
        return sample(args, d)


def sample(args, d) -> Dict:
    """Every rank makes the chunks c with c % world == rank (chunk c: samples c*B .. c*B+B-1),
    skipping those already on disk; rank 0 then assembles the .npz and the grid."""
    device = d.device
    state_dict, train_args = (load_weights(args.ckpt, not args.no_ema) if args.ckpt else (None, {}))
    model_name = args.model or train_args.get("model") or DEFAULT_MODEL
    model_kwargs = dict(args.model_kwargs if args.model_kwargs is not None else train_args.get("model_kwargs") or {})
    image_size = args.image_size if args.image_size is not None else train_args.get("image_size") or 256
    num_classes = args.num_classes if args.num_classes is not None else train_args.get("num_classes") or 1000
    latent = latent_size(image_size)

    torch.manual_seed(args.seed)
    model = build_model(model_name, input_size=latent, num_classes=num_classes, learn_sigma=True, **model_kwargs)
    if state_dict is not None:
        load_state_dict_strict(model, state_dict, args.ckpt)
    elif d.rank == 0:
        print("warning: no --ckpt given, sampling from random weights", file=sys.stderr)
    # frozen: a sampler takes no gradient, and the attention kernels re-use their per-offset tables
    # from step to step only for tables that take none
    model = model.to(device).eval().requires_grad_(False)
    if args.amm is not None:
        if not hasattr(model, "set_amm"):
            raise ValueError(f"--amm/--no-amm: model {model_name} has no AMM switch (set_amm)")
        model.set_amm(args.amm)
    in_channels = int(getattr(model, "in_channels", 4))
    labels = _labels(args, args.num_samples, num_classes)
    respacing = f"ddim{args.num_sampling_steps}" if args.ddim else str(args.num_sampling_steps)
    diffusion = create_diffusion(respacing, diffusion_steps=int(train_args.get("diffusion_steps") or 1000))
    decode = _decoder(args.vae, device)

    out_dir = Path(args.out_dir)
    shards = out_dir / "shards"
    _check_shard_dir(shards, _run_config(args, model_name, model_kwargs, image_size, num_classes), d,
                     overwrite=args.overwrite)
    image_dir = out_dir / "images"
    if not args.no_image_folder:
        image_dir.mkdir(parents=True, exist_ok=True)
    step_fns = model_steps(model, args.compile, device)
    n, bs = args.num_samples, args.batch_size
    chunks = list(range(d.rank, math.ceil(n / bs), d.world))
    made, resumed = 0, 0
    bar = progress_bar(chunks, total=len(chunks), desc="batches", disable=args.no_progress or d.rank != 0)
    for c in bar:
        lo, hi = c * bs, min(n, (c + 1) * bs)
        path = shards / f"{c:06d}.npz"
        done = _read_shard(path, hi - lo)
        if done is not None:
            resumed += 1
            if not args.no_image_folder:  # the run that made it may have written no PNGs
                _write_images(image_dir, lo, done[0], missing_only=True)
            continue
        images = sample_chunk(step_fns, diffusion, decode, args, labels[lo:hi], c, in_channels, latent, num_classes,
                              device, progress=not args.no_progress and n <= bs)
        if not args.no_image_folder:
            _write_images(image_dir, lo, images)
        _write_shard(path, images, labels[lo:hi].numpy())
        made += 1
    if d.distributed:
        dist.barrier()
    if d.rank != 0:
        return {"made": made, "resumed": resumed}
    return _assemble(args, out_dir, shards, labels, model, model_name, made, resumed)


def _assemble(args, out_dir: Path, shards: Path, labels: torch.Tensor, model, model_name: str, made: int,
              resumed: int) -> Dict:
    """OUT/samples.npz (``arr_0``: uint8 [N, H, W, 3], ADM's evaluator format), OUT/labels.npy, the grid."""
    n, bs = args.num_samples, args.batch_size
    parts = []
    for c in range(math.ceil(n / bs)):
        shard = _read_shard(shards / f"{c:06d}.npz", min(n, (c + 1) * bs) - c * bs)
        if shard is None:
            raise ValueError(f"{shards / f'{c:06d}.npz'}: missing or unreadable after sampling; expected a "
                             f"finished shard (run again to make it)")
        parts.append(shard[0])
    images = np.concatenate(parts, 0)
    png, npz = out_dir / "samples.png", out_dir / "samples.npz"
    write_png(png, make_grid(images[:args.grid_max], nrow=args.grid_nrow))
    atomic_write(npz, lambda f: np.savez(f, arr_0=images))
    atomic_write(out_dir / "labels.npy", lambda f: np.save(f, labels.numpy()))
    print(f"wrote {npz} (arr_0 {list(images.shape)} uint8), {out_dir / 'labels.npy'}, {png}"
          + ("" if args.no_image_folder else f" and {out_dir / 'images'}/") + f"; model {model_name}, "
          f"{'DDIM' if args.ddim else 'DDPM'} {args.num_sampling_steps} steps, cfg {args.cfg_scale}"
          + ("" if args.amm is None else f", AMM {'on' if args.amm else 'off'}")
          + (f"; {resumed} of rank 0's batches were already done" if resumed else ""))
    result = {"png": str(png), "npz": str(npz), "images": images, "labels": labels.numpy(),
              "made": made, "resumed": resumed}
    if hasattr(model, "amm_blocks"):
        result["amm_blocks"] = tuple(model.amm_blocks)
    return result


def console_main(argv: Optional[List[str]] = None) -> int:
    """``python -m edt.sample``: exit 0, or 2 with one ``error:`` line on bad input."""
    return run_command(main, argv)


if __name__ == "__main__":
    sys.exit(console_main(sys.argv[1:]))
