"""Real images that need no download: the UCI handwritten digits, and a judge of samples.

scikit-learn ships the UCI digits (``sklearn.datasets.load_digits``: 1,797
grey 8x8 images of the digits 0-9, values 0..16). Here they become a small
diffusion training set:

* a held-out split fixed by a seed (:data:`HELDOUT_FRACTION` of every class,
  drawn by ``numpy.random.default_rng([seed, DATA_TAG])``), the rest training;
* each image upsampled to :data:`DIGITS_SIZE` x :data:`DIGITS_SIZE` (bilinear,
  ``align_corners=False``) and mapped from [0, 16] to [-1, 1]; one channel;
* written once in the flat latent-folder layout ``edt.data.LatentFolder``
  reads (``labels.npy`` + ``<i>.npy`` of float32 ``[1, 16, 16]``) under a cache
  folder (:func:`prepare_digits_folder`), so training goes through the same
  loader as VAE latents. The images stand in for the latents (no VAE): a model
  with ``in_channels=1`` and ``input_size=16`` learns them directly, which
  ``edt.train`` spells ``--image-size 128`` (its latent side is image size / 8).

The judge (:class:`DigitsJudge`) is a small CNN classifier trained on the
training split only, with a fixed seed, and never on generated images; its
weights are cached per seed (:func:`load_judge`). Its penultimate features
(:data:`JUDGE_FEATURES` wide) define the Fréchet distance FD-digits between
generated and held-out images (``edt.evaluate.frechet_distance``, the FID
code), its predictions the class accuracy of conditional samples. The floor
of FD-digits is the FD of the held-out split against the training split:
two samples of the real distribution.

:data:`DIGITS_MODELS` holds the matched tiny EDT and MDTv2 configurations
(published architectures at small widths, 16x16x1 input, patch 2: an 8x8
token grid that EDT's two 2x2 down-samplings take to 2x2).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["DIGITS_SIZE", "NUM_CLASSES", "HELDOUT_FRACTION", "DIGITS_MODELS", "JUDGE_FEATURES",
           "load_digits_split", "prepare_digits_folder", "cache_dir", "DigitsJudge", "train_judge",
           "load_judge", "judge_report", "fd_digits", "class_accuracy"]

#: Side of the upsampled images (the models' input_size).
DIGITS_SIZE = 16
NUM_CLASSES = 10
#: Share of every class kept out of training (the FD reference and the judge's test set).
HELDOUT_FRACTION = 0.2
#: Mixed into the split's seed, so that it differs from other draws seeded by the same number.
DATA_TAG = 0xD161
#: Width of the judge's penultimate layer (the feature space of FD-digits).
JUDGE_FEATURES = 64
#: The judge's training: epochs, batch, Adam learning rate; inputs shifted by up to 1 pixel.
JUDGE_EPOCHS = 12
JUDGE_BATCH = 64
JUDGE_LR = 2e-3
#: Bumped when the judge's architecture or training changes, so cached weights are not reused.
JUDGE_VERSION = 1

#: The tiny models of the digits runs: (registered name, constructor overrides). Plain
#: PyTorch (``backend="eager"``), one input channel. EDT: stages 2-2-2-3-3 at widths
#: 32-48-64-48-32, 2 heads (0.50M parameters); MDTv2: 6 blocks of width 60, 2 heads
#: (decode_layer 2, its published mask ratio 0.3; 0.53M). Within 10 % of each other
#: (tests/test_digits.py checks it). Small enough that one CPU core trains either at a few
#: steps per second, which is what a run of minutes needs.
DIGITS_MODELS: Dict[str, Tuple[str, Dict]] = {
    "EDT": ("EDT-S/2", {"in_channels": 1, "hidden_size": 32, "dims": [32, 48, 64, 48, 32],
                        "num_heads": [2, 2, 2, 2, 2], "backend": "eager"}),
    "MDTv2": ("MDTv2-S/2", {"in_channels": 1, "hidden_size": 60, "depth": 6, "num_heads": 2,
                            "decode_layer": 2, "backend": "eager"}),
}


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------

def load_digits_split(seed: int = 0, size: int = DIGITS_SIZE) -> Dict[str, torch.Tensor]:
    """``{"train_x", "train_y", "test_x", "test_y"}``: float32 [N, 1, size, size] in [-1, 1]
    and int64 [N]; the held-out split takes ``round(HELDOUT_FRACTION * n_k)`` of class k."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ValueError("the digits data needs scikit-learn (pip install scikit-learn, or the digits "
                         "extra)") from None
    if size < 8:
        raise ValueError(f"size must be >= 8 (the digits are 8x8), got {size}")
    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32))[:, None] / 8.0 - 1.0  # [0, 16] -> [-1, 1]
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    labels = np.asarray(bunch.target, dtype=np.int64)
    rng = np.random.default_rng([int(seed), DATA_TAG])
    held = np.zeros(len(labels), dtype=bool)
    for k in range(NUM_CLASSES):
        idx = np.flatnonzero(labels == k)
        held[rng.permutation(idx)[:int(round(HELDOUT_FRACTION * len(idx)))]] = True
    labels_t = torch.from_numpy(labels)
    train, test = torch.from_numpy(~held), torch.from_numpy(held)
    return {"train_x": images[train].contiguous(), "train_y": labels_t[train],
            "test_x": images[test].contiguous(), "test_y": labels_t[test]}


def cache_dir(root=None) -> Path:
    """``root``, else ``$EDT_CACHE_DIR``, else ``$XDG_CACHE_HOME/edt-kernels`` (``~/.cache/edt-kernels``)."""
    if root is not None:
        return Path(root)
    if os.environ.get("EDT_CACHE_DIR"):
        return Path(os.environ["EDT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "edt-kernels"


def prepare_digits_folder(split: str = "train", seed: int = 0, size: int = DIGITS_SIZE, root=None) -> Path:
    """The folder of one split in the flat latent-folder layout, written on first use.

    ``CACHE/digits<size>-seed<seed>/<split>/``; written to a temporary folder and
    renamed, so a killed run leaves either the whole folder or none of it."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    base = cache_dir(root) / f"digits{size}-seed{seed}"
    out = base / split
    if (out / "labels.npy").is_file():
        return out
    data = load_digits_split(seed, size)
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{split}-", dir=base))
    try:
        x, y = data[f"{split}_x"].numpy(), data[f"{split}_y"].numpy()
        for i in range(len(x)):
            np.save(tmp / f"{i}.npy", x[i])
        np.save(tmp / "labels.npy", y)
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / "labels.npy").is_file():  # not a concurrent writer that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------
# The judge
# ---------------------------------------------------------------------------

class DigitsJudge(nn.Module):
    """A small CNN classifier of 16x16 digits: three 3x3 conv layers (16-32-32, two 2x2 max
    pools), a ``JUDGE_FEATURES``-wide penultimate layer (``features``), a linear classifier."""

    def __init__(self, size: int = DIGITS_SIZE):
        super().__init__()
        self.size = size
        self.conv = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(32 * (size // 4) ** 2, JUDGE_FEATURES), nn.ReLU())
        self.head = nn.Linear(JUDGE_FEATURES, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """float32 [N, JUDGE_FEATURES] of images [N, 1, S, S] in [-1, 1]."""
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, self.size, self.size):
            raise ValueError(f"images must have shape [N, 1, {self.size}, {self.size}], got {list(x.shape)}")
        return self.fc(self.conv(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Every image shifted by up to one pixel in each direction (edge padding)."""
    n, _, h, w = x.shape
    pad = F.pad(x, (1, 1, 1, 1), mode="replicate")
    dy, dx = torch.randint(0, 3, (2, n), generator=g)
    rows = (dy[:, None] + torch.arange(h)[None])[:, None, :, None].expand(n, 1, h, w + 2)
    pad = pad.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None])[:, None, None, :].expand(n, 1, h, w)
    return pad.gather(3, cols)


def train_judge(data: Dict[str, torch.Tensor], seed: int = 0, epochs: Optional[int] = None) -> DigitsJudge:
    """A judge trained on ``data["train_x"]`` only (Adam, shuffles and shifts from ``seed``;
    ``JUDGE_EPOCHS`` epochs unless given)."""
    epochs = JUDGE_EPOCHS if epochs is None else int(epochs)
    torch.manual_seed(seed)
    judge = DigitsJudge(data["train_x"].shape[-1])
    opt = torch.optim.Adam(judge.parameters(), lr=JUDGE_LR)
    g = torch.Generator().manual_seed(seed)
    x, y = data["train_x"], data["train_y"]
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * (len(x) // JUDGE_BATCH))
    judge.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - JUDGE_BATCH + 1, JUDGE_BATCH):
            idx = perm[i:i + JUDGE_BATCH]
            loss = F.cross_entropy(judge(_shift(x[idx], g)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return judge.eval().requires_grad_(False)


def _judge_key(seed: int, size: int) -> str:
    spec = json.dumps({"version": JUDGE_VERSION, "seed": seed, "size": size, "heldout": HELDOUT_FRACTION,
                       "features": JUDGE_FEATURES, "epochs": JUDGE_EPOCHS, "batch": JUDGE_BATCH,
                       "lr": JUDGE_LR, "torch": torch.__version__.split("+")[0]}, sort_keys=True)
    return hashlib.sha256(spec.encode()).hexdigest()[:12]


def load_judge(seed: int = 0, size: int = DIGITS_SIZE, root=None,
               data: Optional[Dict[str, torch.Tensor]] = None) -> DigitsJudge:
    """The judge of split ``seed``: cached weights ``CACHE/digits-judge/seed<seed>-<key>.pt`` (key:
    a hash of its training settings), else trained (about a CPU minute) and written atomically."""
    path = cache_dir(root) / "digits-judge" / f"seed{seed}-{size}px-{_judge_key(seed, size)}.pt"
    judge = DigitsJudge(size)
    if path.is_file():
        try:
            judge.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return judge.eval().requires_grad_(False)
        except (OSError, RuntimeError, ValueError):
            pass  # unreadable: train again and replace it
    judge = train_judge(data if data is not None else load_digits_split(seed, size), seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".judge-", suffix=".pt", dir=path.parent)
    os.close(fd)
    try:
        torch.save(judge.state_dict(), tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return judge


@torch.no_grad()
def _features_and_predictions(judge: DigitsJudge, images: torch.Tensor, batch: int = 512):
    feats, preds = [], []
    for i in range(0, len(images), batch):
        f = judge.features(images[i:i + batch].float())
        feats.append(f)
        preds.append(judge.head(f).argmax(1))
    return torch.cat(feats).double().numpy(), torch.cat(preds)


def fd_digits(judge: DigitsJudge, images: torch.Tensor, reference: torch.Tensor) -> float:
    """FD-digits: the Fréchet distance of the judge's features of ``images`` and ``reference``."""
    from .evaluate import frechet_distance

    return frechet_distance(_features_and_predictions(judge, images)[0],
                            _features_and_predictions(judge, reference)[0])


def class_accuracy(judge: DigitsJudge, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of ``images`` the judge classifies as their ``labels``."""
    preds = _features_and_predictions(judge, images)[1]
    return float((preds == labels.to(preds.device)).double().mean())


#: Random subsets of the training split behind :func:`judge_report`'s ``fd_real_n``.
REAL_SUBSETS = 5


def judge_report(judge: DigitsJudge, data: Dict[str, torch.Tensor], n: Optional[int] = None,
                 seed: int = 0) -> Dict[str, float]:
    """The judge's held-out accuracy and the FD floor (held-out vs the whole training split).

    With ``n``: also ``fd_real_n`` (mean, min, max), the FD-digits of ``n`` real training images
    (:data:`REAL_SUBSETS` random subsets drawn from ``seed``) against the held-out split: what a
    perfect model scores with ``n`` samples, since a Fréchet distance estimated from fewer
    images is biased upwards (64 feature dimensions)."""
    out = {"heldout_accuracy": class_accuracy(judge, data["test_x"], data["test_y"]),
           "fd_floor": fd_digits(judge, data["test_x"], data["train_x"]),
           "n_train": len(data["train_x"]), "n_heldout": len(data["test_x"])}
    if n is not None:
        if not 2 <= n <= len(data["train_x"]):
            raise ValueError(f"n must be in [2, {len(data['train_x'])}] (the training split), got {n}")
        g = torch.Generator().manual_seed(seed)
        fds = [fd_digits(judge, data["train_x"][torch.randperm(len(data["train_x"]), generator=g)[:n]],
                         data["test_x"]) for _ in range(REAL_SUBSETS)]
        out.update(n_real=n, fd_real_n=float(np.mean(fds)), fd_real_n_min=min(fds), fd_real_n_max=max(fds))
    return out
