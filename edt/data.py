"""Training data: a folder of pre-extracted VAE latents, or a built-in synthetic set.

Latent folder layouts (both hold latents already multiplied by the VAE scale
factor 0.18215, as the DiT/fast-DiT feature extractor writes them):

1. **fast-DiT layout** (``extract_features.py`` of fast-DiT)::

       ROOT/<name>_features/<k>.npy    float  [C, H, W]  (or [1, C, H, W])
       ROOT/<name>_labels/<k>.npy      int    []  or [1]

   e.g. ``imagenet256_features/`` + ``imagenet256_labels/``; features and
   labels are paired by file name.

2. **flat layout**::

       ROOT/labels.npy                 int    [N]
       ROOT/<i>.npy                    float  [C, H, W]   for i = 0 .. N-1

   (file names are decimal indices, zero-padding allowed: ``000123.npy``).

``LatentFolder(...).validate()`` reads every file's header and the labels
(with ``check_values=True`` also every latent, to refuse NaN / inf) and
returns the errors, each naming its file: wrong shape or dtype, non-finite
values, labels out of ``[0, num_classes)``, missing pairs.

The synthetic set (:class:`SyntheticLatents`) is generated on the fly from
``(seed, index)``: class k is a Gaussian blob with a class-specific centre and
channel signature, jittered per sample, plus a little noise; values lie in
about [-1, 1]. It is learnable in minutes and needs no download.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["LatentFolder", "SyntheticLatents", "find_layout", "VAE_SCALE_FACTOR", "VAE_DOWNSAMPLE", "latent_size"]

#: Stable Diffusion VAE latent scale (DiT/MDT/EDT multiply encoder samples by it).
VAE_SCALE_FACTOR = 0.18215
#: The SD VAE downsamples by 8: a 256px image is a 32x32 latent.
VAE_DOWNSAMPLE = 8
_INDEX_RE = re.compile(r"^(\d+)\.npy$")


def latent_size(image_size: int) -> int:
    """The latent side of ``image_size`` px images; ``ValueError`` naming ``--image-size`` unless it
    is a positive multiple of :data:`VAE_DOWNSAMPLE`."""
    if image_size < VAE_DOWNSAMPLE or image_size % VAE_DOWNSAMPLE:
        raise ValueError(f"--image-size must be a positive multiple of {VAE_DOWNSAMPLE}, got {image_size}")
    return image_size // VAE_DOWNSAMPLE


def _natural_key(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def find_layout(root: Path) -> Tuple[str, Path, Path]:
    """("fastdit", features_dir, labels_dir) or ("flat", root, root/labels.npy)."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"data path {str(root)!r} is not a directory")
    feats = sorted(p for p in root.iterdir() if p.is_dir() and p.name.endswith("_features"))
    for f in feats:
        lab = root / (f.name[: -len("_features")] + "_labels")
        if lab.is_dir():
            return "fastdit", f, lab
    if (root / "labels.npy").is_file():
        return "flat", root, root / "labels.npy"
    raise ValueError(f"{str(root)!r} holds neither <name>_features/ + <name>_labels/ folders "
                     f"(fast-DiT layout) nor labels.npy + <i>.npy files (flat layout)")


def _npy_header(path: Path) -> Tuple[Tuple[int, ...], np.dtype]:
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable .npy file ({e})") from None
    return tuple(shape), np.dtype(dtype)


class LatentFolder(Dataset):
    """Pre-extracted latents with labels; items are (float32 [C, H, W], int64 label)."""

    def __init__(self, root, latent_shape: Sequence[int], num_classes: int):
        self.root = Path(root)
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.num_classes = int(num_classes)
        self.layout, a, b = find_layout(self.root)
        if self.layout == "fastdit":
            self.features_dir, self.labels_dir = a, b
            feat = sorted((p.name for p in a.iterdir() if p.suffix == ".npy"), key=_natural_key)
            labs = set(p.name for p in b.iterdir() if p.suffix == ".npy")
            missing = [n for n in feat if n not in labs]
            if missing:
                raise ValueError(f"{a / missing[0]}: no matching label file {b / missing[0]}")
            extra = sorted(labs.difference(feat), key=_natural_key)
            if extra:
                raise ValueError(f"{b / extra[0]}: label file without a matching feature file")
            self.files = [a / n for n in feat]
            self.label_files: Optional[List[Path]] = [b / n for n in feat]
            self.labels: Optional[np.ndarray] = None
        else:
            self.labels_path = b
            indexed = {}
            for p in a.iterdir():
                m = _INDEX_RE.match(p.name)
                if m:
                    i = int(m.group(1))
                    if i in indexed:
                        raise ValueError(f"{p}: index {i} also given by {indexed[i]}")
                    indexed[i] = p
            self.files = [indexed[i] for i in sorted(indexed)]
            self.label_files = None
            try:
                self.labels = np.load(b, allow_pickle=False)
            except (OSError, ValueError) as e:
                raise ValueError(f"{b}: not a readable .npy file ({e})") from None
            n = len(self.files)
            if sorted(indexed) != list(range(n)):
                gap = next(i for i in range(n + 1) if i not in indexed)
                raise ValueError(f"{a}: latent files must be numbered 0..N-1; {gap}.npy is missing")
            if self.labels.ndim != 1 or self.labels.shape[0] != n:
                raise ValueError(f"{b}: labels must have shape [{n}] (one per latent file), "
                                 f"got {list(self.labels.shape)}")
        if not self.files:
            raise ValueError(f"{self.root}: no latent .npy files found ({self.layout} layout)")

    def __len__(self) -> int:
        return len(self.files)

    def _check_shape(self, path: Path) -> None:
        shape, dtype = _npy_header(path)
        if shape not in (self.latent_shape, (1, *self.latent_shape)):
            raise ValueError(f"{path}: latent has shape {list(shape)}, expected {list(self.latent_shape)} "
                             f"(or [1, ...]) for this model and image size")
        if dtype.kind != "f":
            raise ValueError(f"{path}: latent dtype {dtype} is not floating point")

    def _check_label(self, value, where: str) -> None:
        v = np.asarray(value)
        if v.dtype.kind in "fc" and not np.isfinite(v).all():
            bad = np.flatnonzero(~np.isfinite(v))
            raise ValueError(f"{where}: label {v.reshape(-1)[bad[0]]} is not finite"
                             + (f" at index {int(bad[0])}" if v.ndim else "") + "; labels must be integers")
        if v.dtype.kind not in "iu":
            raise ValueError(f"{where}: labels must be integers, got dtype {v.dtype}")
        bad = np.flatnonzero((v < 0) | (v >= self.num_classes))
        if bad.size:
            raise ValueError(f"{where}: label {int(v.reshape(-1)[bad[0]])} out of range [0, {self.num_classes})"
                             + (f" at index {int(bad[0])}" if v.ndim else ""))

    def _check_values(self, path: Path) -> None:
        x = np.load(path, allow_pickle=False)
        finite = np.isfinite(x)
        if not finite.all():
            n_bad = int(x.size - finite.sum())
            first = np.unravel_index(int(np.flatnonzero(~finite)[0]), x.shape)
            raise ValueError(f"{path}: latent holds {n_bad} non-finite value(s) (first {x[first]} at "
                             f"{list(map(int, first))}); expected finite floats (--skip-data-check skips this scan)")

    def validate(self, rank: int = 0, world_size: int = 1, check_values: bool = False) -> List[str]:
        """Check this rank's share of the files (every ``world_size``-th); return the errors found.

        Reads each file's header and the labels; ``check_values=True`` also reads
        every latent and refuses NaN / inf values (one pass over the data)."""
        errors: List[str] = []
        if self.labels is not None and rank == 0:
            try:
                self._check_label(self.labels, str(self.labels_path))
            except ValueError as e:
                errors.append(str(e))
        for i in range(rank, len(self.files), world_size):
            try:
                self._check_shape(self.files[i])
                if check_values:
                    self._check_values(self.files[i])
                if self.label_files is not None:
                    path = self.label_files[i]
                    try:
                        lab = np.load(path, allow_pickle=False)
                    except (OSError, ValueError) as e:
                        raise ValueError(f"{path}: not a readable .npy file ({e})") from None
                    if lab.size != 1:
                        raise ValueError(f"{path}: label file must hold one integer, got shape {list(lab.shape)}")
                    self._check_label(lab.reshape(()), str(path))
            except ValueError as e:
                errors.append(str(e))
                break
        return errors

    def __getitem__(self, index: int):
        x = np.load(self.files[index], allow_pickle=False).astype(np.float32, copy=False)
        x = x.reshape(self.latent_shape)
        if self.labels is not None:
            y = int(self.labels[index])
        else:
            y = int(np.load(self.label_files[index], allow_pickle=False).reshape(()))
        return torch.from_numpy(np.ascontiguousarray(x)), torch.tensor(y, dtype=torch.long)


class SyntheticLatents(Dataset):
    """Class-conditional Gaussian blobs in latent space, generated deterministically on the fly.

    Sample ``i`` has label ``i % num_classes``; its blob centre is the class's
    centre jittered by up to a pixel, its amplitude per channel the class's
    signature (+/- 10%), plus N(0, 0.05^2) noise.
    """

    def __init__(self, size: int = 4096, latent_shape: Sequence[int] = (4, 32, 32), num_classes: int = 10,
                 seed: int = 0):
        if size < 1 or num_classes < 1:
            raise ValueError(f"size and num_classes must be >= 1, got {size}, {num_classes}")
        self.size = int(size)
        self.latent_shape = tuple(int(s) for s in latent_shape)
        if len(self.latent_shape) != 3:
            raise ValueError(f"latent_shape must be (C, H, W), got {self.latent_shape}")
        self.num_classes = int(num_classes)
        self.seed = int(seed)
        C, H, W = self.latent_shape
        rng = np.random.default_rng([self.seed, 0x5EED])
        margin = 0.2
        self.centres = rng.uniform(margin, 1 - margin, size=(self.num_classes, 2)) * np.array([H - 1, W - 1])
        self.signatures = rng.choice([-0.9, -0.5, 0.5, 0.9], size=(self.num_classes, C))
        self.widths = rng.uniform(0.12, 0.25, size=self.num_classes) * max(H, W)
        self._yy, self._xx = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        if not 0 <= index < self.size:
            raise IndexError(index)
        k = index % self.num_classes
        rng = np.random.default_rng([self.seed, 1, index])
        cy, cx = self.centres[k] + rng.uniform(-1, 1, size=2)
        blob = np.exp(-((self._yy - cy) ** 2 + (self._xx - cx) ** 2) / (2 * self.widths[k] ** 2))
        amp = self.signatures[k] * rng.uniform(0.9, 1.1, size=self.signatures.shape[1])
        x = amp[:, None, None] * blob[None] + 0.05 * rng.standard_normal(self.latent_shape)
        return torch.from_numpy(x.astype(np.float32)), torch.tensor(k, dtype=torch.long)

    def class_means(self) -> torch.Tensor:
        """Noise-free, un-jittered latent of every class: float32 [num_classes, C, H, W]."""
        out = []
        for k in range(self.num_classes):
            cy, cx = self.centres[k]
            blob = np.exp(-((self._yy - cy) ** 2 + (self._xx - cx) ** 2) / (2 * self.widths[k] ** 2))
            out.append(self.signatures[k][:, None, None] * blob[None])
        return torch.from_numpy(np.stack(out).astype(np.float32))


def write_latent_folder(root, latents: np.ndarray, labels: np.ndarray, layout: str = "fastdit",
                        name: str = "imagenet256") -> None:
    """Write latents [N, C, H, W] and labels [N] in one of the two layouts (for tests and tools)."""
    root = Path(root)
    latents, labels = np.asarray(latents), np.asarray(labels)
    if layout == "fastdit":
        f, l = root / f"{name}_features", root / f"{name}_labels"
        os.makedirs(f, exist_ok=True)
        os.makedirs(l, exist_ok=True)
        for i in range(len(latents)):
            np.save(f / f"{i}.npy", latents[i:i + 1])
            np.save(l / f"{i}.npy", labels[i:i + 1])
    elif layout == "flat":
        os.makedirs(root, exist_ok=True)
        for i in range(len(latents)):
            np.save(root / f"{i}.npy", latents[i])
        np.save(root / "labels.npy", labels)
    else:
        raise ValueError(f"layout must be 'fastdit' or 'flat', got {layout!r}")
