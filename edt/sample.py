"""Class-conditional sampling: ``python -m edt.sample``.

    python -m edt.sample --ckpt results/checkpoints/0400000.pt --cfg-scale 1.5 \\
        --num-samples 64 --vae /path/to/sd-vae-ft-ema --out-dir samples/

Writes ``OUT/samples.png`` (a grid) and ``OUT/samples.npz`` whose ``arr_0`` is
uint8 ``[N, H, W, 3]``, the format ADM's evaluator (FID/IS/precision/recall)
reads. With ``--vae`` (a local diffusers ``AutoencoderKL`` folder; diffusers is
then required) the latents are decoded to pixels (``z / 0.18215``); without it
the latents themselves are written, first 3 channels in [-1, 1] as RGB (what
the built-in synthetic data looks like).

Sampling is respaced DDPM (``--num-sampling-steps``, 250 by default) or DDIM
(``--ddim``). ``--cfg-scale`` > 1 runs classifier-free guidance through the
model's ``forward_with_cfg`` on [cond, uncond] halves (EDT/DiT: constant scale
on the first 3 channels; MDTv2: its power-cosine schedule of t).
``--amm/--no-amm`` switches EDT's attention modulation at inference.
The model, image size, class count and constructor overrides default to those
stored in a checkpoint of ``edt.train``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from .data import VAE_SCALE_FACTOR
from .diffusion import create_diffusion
from .models import load_state_dict_strict
from .utils import build_model, latents_to_uint8, make_grid, pixels_to_uint8, \
    progress_bar, write_png

__all__ = ["main", "parse_args", "load_weights"]

VAE_DOWNSAMPLE = 8
DEFAULT_MODEL = "EDT-S/2"


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m edt.sample", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help=f"model name (default: the checkpoint's, else {DEFAULT_MODEL})")
    p.add_argument("--model-kwargs", default=None, help="JSON constructor overrides (default: the checkpoint's)")
    p.add_argument("--ckpt", default=None, help="edt.train checkpoint, or a published state dict (.pt); "
                   "without it the weights are random (smoke tests only)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA, of a training checkpoint")
    p.add_argument("--image-size", type=int, default=None, help="pixels (default: the checkpoint's, else 256)")
    p.add_argument("--num-classes", type=int, default=None, help="default: the checkpoint's, else 1000")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale; 1 disables")
    p.add_argument("--num-sampling-steps", type=int, default=250)
    p.add_argument("--ddim", action="store_true", help="DDIM instead of ancestral (DDPM) sampling")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    amm = p.add_mutually_exclusive_group()
    amm.add_argument("--amm", dest="amm", action="store_true", default=None, help="AMM on (model's placement)")
    amm.add_argument("--no-amm", dest="amm", action="store_false", help="AMM off")
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--class-labels", type=int, nargs="*", default=None,
                   help="labels, cycled to --num-samples (default: uniformly random)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae", default=None, help="local diffusers AutoencoderKL folder")
    p.add_argument("--out-dir", default="samples")
    p.add_argument("--grid-nrow", type=int, default=8)
    p.add_argument("--mixed-precision", default="no", choices=["no", "bf16"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.num_samples < 1 or args.batch_size < 1 or args.num_sampling_steps < 1:
        p.error("--num-samples, --batch-size and --num-sampling-steps must be >= 1")
    return args


def load_weights(path: str, use_ema: bool = True):
    """(state_dict, training args or {}) of an ``edt.train`` checkpoint or a bare/published state dict."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path}: expected a dict (state dict or checkpoint), got {type(ckpt).__name__}")
    train_args = ckpt.get("args", {}) if isinstance(ckpt.get("args"), dict) else {}
    if use_ema and "ema" in ckpt:
        return ckpt["ema"], train_args
    if "model" in ckpt and isinstance(ckpt["model"], dict):
        return ckpt["model"], train_args
    if "ema" in ckpt and isinstance(ckpt["ema"], dict):
        return ckpt["ema"], train_args
    if all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return ckpt, {}
    raise ValueError(f"{path}: no 'ema' / 'model' state dict found (keys: {sorted(ckpt)[:10]})")


def _decoder(vae_path: Optional[str], device: torch.device):
    if vae_path is None:
        return lambda z: latents_to_uint8(z)
    try:
        from diffusers.models import AutoencoderKL  # optional
    except ImportError:
        raise ValueError("--vae needs the diffusers package (pip install diffusers)") from None
    vae = AutoencoderKL.from_pretrained(vae_path).to(device).eval()

    @torch.no_grad()
    def decode(z):
        return pixels_to_uint8(vae.decode(z / VAE_SCALE_FACTOR).sample)

    return decode


@torch.no_grad()
def main(argv: Optional[List[str]] = None) -> Dict:
    """Sample; returns ``{"png", "npz", "images" (uint8 [N,H,W,3]), "labels"}``."""
    args = parse_args(argv)
    device = torch.device("cuda" if (args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()))
                          else "cpu")
    state_dict, train_args = (load_weights(args.ckpt, not args.no_ema) if args.ckpt else (None, {}))
    model_name = args.model or train_args.get("model") or DEFAULT_MODEL
    if args.model_kwargs is not None:
        try:
            model_kwargs = json.loads(args.model_kwargs)
        except json.JSONDecodeError as e:
            raise ValueError(f"--model-kwargs is not valid JSON: {e}") from None
    else:
        model_kwargs = dict(train_args.get("model_kwargs") or {})
    image_size = args.image_size or train_args.get("image_size") or 256
    num_classes = args.num_classes or train_args.get("num_classes") or 1000
    if image_size % VAE_DOWNSAMPLE:
        raise ValueError(f"--image-size must be a multiple of {VAE_DOWNSAMPLE}, got {image_size}")
    latent = image_size // VAE_DOWNSAMPLE

    torch.manual_seed(args.seed)
    model = build_model(model_name, input_size=latent, num_classes=num_classes, learn_sigma=True, **model_kwargs)
    if state_dict is not None:
        load_state_dict_strict(model, state_dict, args.ckpt)
    else:
        print("warning: no --ckpt given, sampling from random weights", file=sys.stderr)
    model = model.to(device).eval()
    if args.amm is not None:
        if not hasattr(model, "set_amm"):
            raise ValueError(f"--amm/--no-amm: model {model_name} has no AMM switch (set_amm)")
        model.set_amm(args.amm)
    in_channels = int(getattr(model, "in_channels", 4))

    respacing = f"ddim{args.num_sampling_steps}" if args.ddim else str(args.num_sampling_steps)
    diffusion = create_diffusion(respacing)
    decode = _decoder(args.vae, device)
    amp = args.mixed_precision == "bf16"
    gen = torch.Generator(device=device).manual_seed(args.seed)

    n = args.num_samples
    if args.class_labels:
        bad = [c for c in args.class_labels if not 0 <= c < num_classes]
        if bad:
            raise ValueError(f"--class-labels {bad} out of range [0, {num_classes})")
        labels = torch.tensor([args.class_labels[i % len(args.class_labels)] for i in range(n)])
    else:
        labels = torch.randint(0, num_classes, (n,), generator=torch.Generator().manual_seed(args.seed))
    use_cfg = args.cfg_scale > 1.0
    images = []
    batches = progress_bar(range(0, n, args.batch_size), total=math.ceil(n / args.batch_size),
                           desc="batches", disable=args.no_progress)
    for start in batches:
        y = labels[start:start + args.batch_size].to(device)
        b = len(y)
        z = torch.randn((b, in_channels, latent, latent), generator=gen, device=device)
        if use_cfg:
            z = torch.cat([z, z], 0)
            y = torch.cat([y, torch.full_like(y, num_classes)], 0)  # the null class
            model_fn, kwargs = model.forward_with_cfg, {"y": y, "cfg_scale": args.cfg_scale}
        else:
            model_fn, kwargs = model.forward, {"y": y}
        loop = diffusion.ddim_sample_loop if args.ddim else diffusion.p_sample_loop
        extra = {"eta": args.eta} if args.ddim else {}
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            out = loop(model_fn, tuple(z.shape), z, clip_denoised=False, model_kwargs=kwargs, device=device,
                       progress=not args.no_progress and n <= args.batch_size, generator=gen, **extra)
        if use_cfg:
            out = out[:b]
        images.append(decode(out.float()))
    images = np.concatenate(images, 0)

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png, npz = out_dir / "samples.png", out_dir / "samples.npz"
    write_png(png, make_grid(images, nrow=args.grid_nrow))
    np.savez(npz, arr_0=images)
    print(f"wrote {png} and {npz} (arr_0 {list(images.shape)} uint8), model {model_name}, "
          f"{'DDIM' if args.ddim else 'DDPM'} {args.num_sampling_steps} steps, cfg {args.cfg_scale}"
          + ("" if args.amm is None else f", AMM {'on' if args.amm else 'off'}"))
    result = {"png": str(png), "npz": str(npz), "images": images, "labels": labels.numpy()}
    if hasattr(model, "amm_blocks"):
        result["amm_blocks"] = tuple(model.amm_blocks)
    return result


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
