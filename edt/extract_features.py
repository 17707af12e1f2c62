"""Encode an image folder to VAE latents once: ``python -m edt.extract_features``.

    python -m edt.extract_features --data-path /data/imagenet/train \\
        --vae /models/sd-vae-ft-ema --features-path features/
    torchrun --nproc_per_node=8 -m edt.extract_features ...   # ranks share the images

Input: an ImageFolder tree, ``DATA/<class>/**/<image>`` (classes are the sorted
sub-folder names, labels their index; images sorted by path within a class;
extensions as torchvision's ImageFolder). Output, in the layout ``edt.train``
reads (see ``edt.data``)::

    FEATURES/<name>_features/<i>.npy   float32 [1, 4, S/8, S/8]
    FEATURES/<name>_labels/<i>.npy     int64   [1]

with ``i`` the image's index in the sorted dataset and ``name`` ``imagenet<S>``
by default. Preprocessing as the authors' ``extract_features.py``: ADM's
centre crop to S x S (halve with a box filter while the short side is at
least 2S, bicubic resize of the short side to S, centre crop), a random
horizontal flip (probability 1/2), pixels mapped to [-1, 1]; then
``vae.encode(x).latent_dist.sample() * 0.18215``. The flip and the latent
sample of image ``i`` are drawn from a generator seeded by ``(seed, i)``, so
the output does not depend on the number of ranks, the batch size or
interruptions.

Rank r of W encodes the images i = r, r + W, ...; an image whose two files
already exist is skipped, and each file is written whole or not at all (a
temporary file, fsynced and renamed), so a run killed at any moment is resumed
by running the same command again. The settings that determine the features
(data folder and its classes and image count, VAE, image size, seed, flip) are
recorded in ``FEATURES/<name>_config.json``, and a run with other settings is
refused.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .cli import ArgumentParser, check_output_path, run_command
from .data import VAE_SCALE_FACTOR, latent_size
from .distributed import process_group
from .utils import atomic_write, check_run_config, progress_bar

__all__ = ["main", "parse_args", "ImageFolderPIL", "center_crop_arr", "IMG_EXTENSIONS"]

#: File extensions read as images (those of torchvision's ImageFolder).
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def center_crop_arr(pil_image: Image.Image, image_size: int) -> Image.Image:
    """ADM's centre crop: box-filter halving while the short side >= 2 * image_size,
    bicubic resize of the short side to image_size, then the central square."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[crop_y:crop_y + image_size, crop_x:crop_x + image_size])


def _item_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(index)]).generate_state(1, np.uint32)[0])


class ImageFolderPIL(Dataset):
    """ImageFolder without torchvision: items are (float32 [3, S, S] in [-1, 1], label, index).

    The horizontal flip of item i is drawn from a generator seeded by (seed, i).
    """

    def __init__(self, root, image_size: int, seed: int = 0, flip: bool = True):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"--data-path {str(self.root)!r} is not a directory")
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir())
        if not self.classes:
            raise ValueError(f"--data-path {str(self.root)!r} has no class sub-folders (expected DATA/<class>/<image>)")
        self.samples: List[Tuple[Path, int]] = []
        for label, name in enumerate(self.classes):
            for dirpath, _, files in sorted(os.walk(self.root / name, followlinks=True)):
                for f in sorted(files):
                    if f.lower().endswith(IMG_EXTENSIONS):
                        self.samples.append((Path(dirpath) / f, label))
        if not self.samples:
            raise ValueError(f"--data-path {str(self.root)!r}: no images ({', '.join(IMG_EXTENSIONS)}) "
                             "in its class folders")
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.flip = bool(flip)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
        except OSError as e:
            raise ValueError(f"{path}: cannot read the image ({e})") from None
        arr = np.asarray(center_crop_arr(im, self.image_size), dtype=np.float32)
        if self.flip and np.random.default_rng(_item_seed(self.seed, index)).random() < 0.5:
            arr = arr[:, ::-1]
        x = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))) / 127.5 - 1.0
        return x, label, index


class _ReadErrorsAsItems(Dataset):
    """The items of ``dataset`` at ``indices`` as ``(x, label, index, error)``: ``error`` is "", or
    the message of the ``ValueError`` that reading the image raised (x then zeros). A loader's
    worker process hands an exception to the main process as a many-line traceback; as an item,
    the message alone gets there, and the main process raises it as with ``--num-workers 0``."""

    def __init__(self, dataset: ImageFolderPIL, indices: Sequence[int]):
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        index = self.indices[k]
        try:
            x, label, _ = self.dataset[index]
        except ValueError as e:
            size = self.dataset.image_size
            return torch.zeros(3, size, size), -1, index, str(e)
        return x, label, index, ""


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = ArgumentParser("python -m edt.extract_features", __doc__)
    p.add_argument("--data-path", required=True, help="ImageFolder root: DATA/<class>/<image>")
    p.add_argument("--vae", required=True, help="local diffusers AutoencoderKL folder (e.g. sd-vae-ft-ema)")
    p.add_argument("--features-path", required=True, help="output folder")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--name", default=None, help="folder prefix: NAME_features/ and NAME_labels/ "
                   "(default imagenet<image-size>)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--seed", type=int, default=0, help="seeds the flips and the latent samples")
    p.add_argument("--no-flip", action="store_true", help="no random horizontal flip")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    with p.usage_errors():
        latent_size(args.image_size)
    if args.batch_size < 1 or args.num_workers < 0:
        p.error("--batch-size must be >= 1 and --num-workers >= 0")
    with p.usage_errors():
        check_output_path("--features-path", args.features_path)
    if args.name is None:
        args.name = f"imagenet{args.image_size}"
    return args


def load_vae(path: str, device: torch.device):
    """A local diffusers AutoencoderKL folder, in eval mode on ``device``."""
    if not Path(path).is_dir():
        raise ValueError(f"--vae {path!r} is not a directory (a diffusers AutoencoderKL folder)")
    try:
        from diffusers.models import AutoencoderKL
    except ImportError:
        raise ValueError("--vae needs the diffusers package (pip install diffusers)") from None
    try:
        vae = AutoencoderKL.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"--vae {path!r}: cannot load an AutoencoderKL ({e})") from None
    return vae.to(device).eval()


@torch.no_grad()
def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Extract; returns ``{"written", "skipped", "total", "features_dir", "labels_dir"}`` (this rank's counts)."""
    args = parse_args(argv)
    with process_group(args.device, barrier_on_exit=True) as d:
        return _extract(args, d)


def _run_config(args, dataset: ImageFolderPIL) -> dict:
    """What determines the features: a resumed run must match it."""
    return {"data_path": str(Path(args.data_path).resolve()), "classes": dataset.classes,
            "num_images": len(dataset), "vae": str(Path(args.vae).resolve()), "image_size": args.image_size,
            "seed": args.seed, "flip": not args.no_flip}


def _extract(args, d) -> dict:
    rank, world, device = d.rank, d.world, d.device
    dataset = ImageFolderPIL(args.data_path, args.image_size, seed=args.seed, flip=not args.no_flip)
    vae = load_vae(args.vae, device)
    out = Path(args.features_path)
    check_run_config(out / f"{args.name}_config.json", _run_config(args, dataset), d,
                     f"{args.name}_features/ and {args.name}_labels/ of another extraction",
                     "or another --features-path or --name")
    feat_dir, lab_dir = out / f"{args.name}_features", out / f"{args.name}_labels"
    feat_dir.mkdir(parents=True, exist_ok=True)
    lab_dir.mkdir(parents=True, exist_ok=True)
    mine = [i for i in range(rank, len(dataset), world)
            if not ((feat_dir / f"{i}.npy").is_file() and (lab_dir / f"{i}.npy").is_file())]
    skipped = len(range(rank, len(dataset), world)) - len(mine)
    loader = DataLoader(_ReadErrorsAsItems(dataset, mine), batch_size=args.batch_size, shuffle=False,
                        num_workers=args.num_workers, pin_memory=device.type == "cuda")
    written = 0
    bar = progress_bar(loader, total=len(loader), desc=f"rank {rank} encoding", disable=args.no_progress)
    for x, y, idx, errors in bar:
        error = next((e for e in errors if e), None)
        if error:
            raise ValueError(error)
        posterior = vae.encode(x.to(device)).latent_dist
        # latent_dist.sample() is mean + std * N(0, I); the noise of image i comes from its own seed
        eps = torch.stack([torch.randn(posterior.mean.shape[1:], generator=torch.Generator().manual_seed(
            _item_seed(args.seed + 1, int(i))), dtype=posterior.mean.dtype) for i in idx]).to(device)
        z = ((posterior.mean + posterior.std * eps) * VAE_SCALE_FACTOR).float().cpu().numpy()
        for k, i in enumerate(idx.tolist()):
            label, latent = np.asarray([int(y[k])], dtype=np.int64), z[k:k + 1]
            atomic_write(lab_dir / f"{i}.npy", lambda f: np.save(f, label))
            atomic_write(feat_dir / f"{i}.npy", lambda f: np.save(f, latent))
            written += 1
    if rank == 0:
        print(f"rank 0: wrote {written}, skipped {skipped} existing, of {len(dataset)} images in "
              f"{len(dataset.classes)} classes (world size {world}) -> {feat_dir}, {lab_dir}")
    return {"written": written, "skipped": skipped, "total": len(dataset),
            "features_dir": str(feat_dir), "labels_dir": str(lab_dir), "classes": dataset.classes}


if __name__ == "__main__":
    sys.exit(run_command(main, sys.argv[1:]))
