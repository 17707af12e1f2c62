"""Small helpers shared by training and sampling: progress bar, PNG writing, image grids.

No hard dependencies beyond torch and numpy: tqdm and PIL are used when installed.
"""
from __future__ import annotations

import contextlib
import json
import os
import struct
import sys
import time
import zlib
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Optional

import numpy as np
import torch

__all__ = ["progress_bar", "write_png", "make_grid", "latents_to_uint8", "pixels_to_uint8", "atomic_write",
           "TMP_SUFFIX", "check_run_config"]


class _SimpleProgress:
    """Fallback progress bar: one line on stderr at about every 10% (and at the end)."""

    def __init__(self, iterable: Iterable, total: Optional[int], desc: str, initial: int = 0):
        self.iterable = iterable
        self.total = total
        self.desc = desc
        self.n = initial
        self._start = time.time()
        self._next_report = initial
        self._postfix = ""

    def _report(self):
        elapsed = time.time() - self._start
        of = f"/{self.total}" if self.total else ""
        print(f"{self.desc}: {self.n}{of} [{elapsed:.0f}s]{self._postfix}", file=sys.stderr, flush=True)

    def set_postfix_str(self, s: str):
        self._postfix = f" {s}"

    def update(self, n: int = 1):
        self.n += n
        step = max(1, (self.total or 100) // 10)
        if self.n >= self._next_report + step or (self.total and self.n == self.total):
            self._next_report = self.n
            self._report()

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def close(self):
        pass


class _NoProgress(_SimpleProgress):
    def _report(self):
        pass


def progress_bar(iterable: Optional[Iterable] = None, *, total: Optional[int] = None, desc: str = "",
                 disable: bool = False, initial: int = 0):
    """tqdm when installed, else a line-per-10% fallback; ``disable`` gives a silent wrapper."""
    if iterable is None:
        iterable = ()
    if disable:
        return _NoProgress(iterable, total, desc, initial)
    try:
        from tqdm.auto import tqdm  # optional
    except ImportError:
        return _SimpleProgress(iterable, total, desc, initial)
    return tqdm(iterable, total=total, desc=desc, initial=initial, dynamic_ncols=True)


# ---------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------

def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_png(path, image: np.ndarray) -> None:
    """Write a uint8 [H, W, 3] (RGB) or [H, W] (grey) array as a PNG (PIL if present, else zlib)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise TypeError(f"image must be uint8, got {image.dtype}")
    if image.ndim == 2:
        color_type = 0
    elif image.ndim == 3 and image.shape[2] == 3:
        color_type = 2
    else:
        raise ValueError(f"image must have shape [H, W, 3] or [H, W], got {image.shape}")
    try:
        from PIL import Image  # optional
    except ImportError:
        Image = None
    if Image is not None:
        Image.fromarray(image).save(str(path), format="PNG")  # whatever the file name's suffix
        return
    h, w = image.shape[:2]
    rows = np.ascontiguousarray(image).reshape(h, -1)
    raw = b"".join(b"\x00" + rows[i].tobytes() for i in range(h))  # filter type 0 on every row
    header = struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(_png_chunk(b"IHDR", header))
        f.write(_png_chunk(b"IDAT", zlib.compress(raw, 6)))
        f.write(_png_chunk(b"IEND", b""))


def make_grid(images: np.ndarray, nrow: int = 8, padding: int = 2, pad_value: int = 0) -> np.ndarray:
    """Tile uint8 [N, H, W, 3] images into one [rows*(H+p)+p, nrow*(W+p)+p, 3] image."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must have shape [N, H, W, 3], got {images.shape}")
    n, h, w, _ = images.shape
    ncol = max(1, min(nrow, n))
    nrows = (n + ncol - 1) // ncol
    grid = np.full((nrows * (h + padding) + padding, ncol * (w + padding) + padding, 3), pad_value, np.uint8)
    for i in range(n):
        r, c = divmod(i, ncol)
        y0, x0 = padding + r * (h + padding), padding + c * (w + padding)
        grid[y0:y0 + h, x0:x0 + w] = images[i]
    return grid


def pixels_to_uint8(x) -> np.ndarray:
    """Images in [-1, 1], torch [N, 3, H, W] -> uint8 [N, H, W, 3] (round half up, as DiT/ADM)."""
    import torch

    x = torch.clamp(127.5 * x.detach().float() + 128.0, 0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def latents_to_uint8(z) -> np.ndarray:
    """Render latents [N, C, H, W] without a VAE: the first 3 channels (grey if C < 3) as RGB.

    Values are taken as lying in about [-1, 1] (the built-in synthetic data does).
    """
    import torch

    z = z.detach().float()
    if z.shape[1] >= 3:
        z = z[:, :3]
    else:
        z = z[:, :1].expand(-1, 3, -1, -1)
    return pixels_to_uint8(torch.clamp(z, -1.0, 1.0))


# ---------------------------------------------------------------------------
# Models and checkpoints
# ---------------------------------------------------------------------------

def model_family(name: str) -> str:
    """"edt", "mdt" or "other" (a custom ``module:factory`` model)."""
    if name.startswith("EDT"):
        return "edt"
    if name.startswith("MDT"):
        return "mdt"
    return "other"


def build_model(name: str, *, input_size: int, num_classes: int, learn_sigma: bool = True, **kwargs):
    """Instantiate a registered model, or a ``package.module:factory`` one.

    Unknown names raise ``ValueError`` listing the valid ones, and so do constructor arguments
    (``kwargs``) the model does not take.
    """
    if ":" in name:
        import importlib

        module, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"cannot load model factory {name!r}: {e}") from None
    else:
        from .models import all_models

        if name not in all_models:
            raise ValueError(f"unknown model {name!r}; valid names: {', '.join(sorted(all_models))} "
                             f"(or 'package.module:factory')")
        factory = all_models[name]
    try:
        return factory(input_size=input_size, num_classes=num_classes, learn_sigma=learn_sigma, **kwargs)
    except TypeError as e:
        if not kwargs:  # the arguments every model takes: not the caller's mistake
            raise
        raise ValueError(f"model {name!r} cannot be built with the constructor arguments "
                         f"{', '.join(sorted(kwargs))} ({e}); expected --model-kwargs that this model "
                         f"takes") from None


# ---------------------------------------------------------------------------
# Compiled steps
# ---------------------------------------------------------------------------

#: ``--compile`` of edt.train and edt.sample.
COMPILE_MODES = ("none", "default", "max-autotune", "reduce-overhead")


def compile_step(fn: Callable, mode: str, device: torch.device, fullgraph: bool = True) -> Callable:
    """``fn`` (a module or a bound method) under ``torch.compile`` in ``mode`` (one of
    :data:`COMPILE_MODES`; ``none``: ``fn`` itself).  ``reduce-overhead`` replays the step as CUDA
    graphs on CUDA and is ``default`` elsewhere.  The module itself is left as it was (its
    ``state_dict`` keys too): only the returned callable is compiled."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    if mode == "none":
        return fn
    if mode == "reduce-overhead" and device.type != "cuda":
        mode = "default"
    return torch.compile(fn, fullgraph=fullgraph, mode=None if mode == "default" else mode)


@contextlib.contextmanager
def frozen(model: torch.nn.Module):
    """``model``'s parameters take no gradient inside the block, and take again after it those that
    did: a sampling step of a model in training runs as a frozen sampler's does (the attention
    kernels re-use a packed table from call to call only for a table that takes no gradient)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p in trainable:
            p.requires_grad_(True)


# ---------------------------------------------------------------------------
# Files that a killed process cannot leave half-written
# ---------------------------------------------------------------------------

#: ``atomic_write`` writes ``<name>`` through ``<name>`` + this suffix.
TMP_SUFFIX = ".tmp"


def atomic_write(path, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` whole or not at all.

    ``write(f)`` fills ``<path>.tmp`` (opened ``"wb"``), which is flushed, fsynced and renamed over
    ``path``; then the directory is fsynced, so that the new name survives a crash of the machine
    too. A process killed at any moment leaves ``path`` as it was (or absent) and at most the
    temporary file, which the next write of ``path`` replaces. One writer per path."""
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if os.name == "posix":  # a directory cannot be opened for fsync on Windows
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ---------------------------------------------------------------------------
# The settings of a resumable run
# ---------------------------------------------------------------------------

def check_run_config(path, config: dict, d, holds: str, otherwise: str) -> None:
    """Record a resumable run's settings (``config``, JSON values) in ``path``, or check them
    against the ones recorded there.

    Rank 0 writes ``path`` (and its folder) when it is absent, else compares; a difference raises
    ``ValueError`` on every rank of ``d`` (an :class:`edt.distributed.Dist`): ``"<folder>: holds
    <holds> (differs in: <keys>); expected the same settings to resume it, <otherwise>"``."""
    path = Path(path)
    config = json.loads(json.dumps(config))
    error = None
    if d.rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            try:
                old = json.loads(path.read_text())
            except (OSError, ValueError):
                old = None
            if old != config:
                diff = sorted(k for k in config if not isinstance(old, dict) or old.get(k) != config[k])
                error = (f"{path.parent}: holds {holds} (differs in: {', '.join(diff) or 'format'}); "
                         f"expected the same settings to resume it, {otherwise}")
        else:
            atomic_write(path, lambda f: f.write(json.dumps(config, indent=1).encode()))
    if d.distributed:
        import torch.distributed as dist

        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise ValueError(error)


# ---------------------------------------------------------------------------
# Checkpoint files
# ---------------------------------------------------------------------------

def load_checkpoint_file(path, expected: str):
    """``torch.load(path, weights_only=True)`` on the CPU, with one ``ValueError`` per kind of bad file.

    The message reads ``"<path>: <what is wrong>; expected <expected>"`` for a
    missing file, a directory, and a truncated or foreign file (``torch.load``
    reports those with half a dozen exception types). ``argparse.Namespace`` is
    allowed inside the file: the authors' training scripts store their
    arguments as one.
    """
    import argparse
    import os

    import torch

    if not os.path.exists(path):
        raise ValueError(f"{path}: no such file; expected {expected}")
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a directory; expected {expected}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # RuntimeError (zip), EOFError, KeyError, UnpicklingError, ...
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        size = os.path.getsize(path)
        raise ValueError(f"{path}: not a readable PyTorch file ({size} bytes; truncated, or another "
                         f"format: {type(e).__name__}: {reason}); expected {expected}") from None
