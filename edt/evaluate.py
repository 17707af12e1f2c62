"""FID, sFID, Inception Score, precision and recall of a sample batch: ``python -m edt.evaluate``.

    python -m edt.evaluate VIRTUAL_imagenet256_labeled.npz samples.npz \\
        --inception weights-inception-2015-12-05-6726825d.pth [--json metrics.json]

Both .npz files hold ``arr_0``: uint8 images ``[N, H, W, 3]`` (ADM's format, as
``edt.sample`` writes it). The metrics follow ADM's evaluator
(openai/guided-diffusion ``evaluations/evaluator.py``):

* features from the Inception-v3 of the FID literature (the 2015-12-05
  TensorFlow graph; here a PyTorch port whose weights are read from a local
  ``--inception`` file: the state dict of pytorch-fid's
  ``pt_inception-2015-12-05-6726825d.pth`` or torch-fidelity's
  ``weights-inception-2015-12-05-6726825d.pth``, torchvision's parameter
  names, 1008 classes). Images are resized to 299 x 299 with TensorFlow 1's
  bilinear resize (no half-pixel offset) and mapped by (x - 128) / 128;
* FID: Frechet distance between Gaussians fitted to the 2048-d pool features,
  ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)) (computed by
  torchmetrics' FrechetInceptionDistance on the features);
* sFID: the same on the first 7 channels of ``mixed_6/conv`` (the 1x1 branch
  of the third 17 x 17 block, torchvision's ``Mixed_6d.branch1x1``),
  flattened: 17 * 17 * 7 = 2023 dimensions;
* IS: exp(E_x KL(p(y|x) || p(y))) with p(y|x) the softmax of the pool
  features times the classifier weights (no bias, 1008 classes), averaged
  over consecutive splits of 5000 samples;
* precision / recall (Kynkaanniemi et al. 2019): a sample is "precise" when it
  lies within the k-th nearest-neighbour radius (k = 3, squared Euclidean
  distances of pool features) of some reference point; recall swaps the roles.

The FID of this port agrees with the TensorFlow graph's to the precision of
the port (the weights are a conversion of the same graph); the reference
statistics are recomputed from the reference images, so ADM's stored
``mu``/``sigma`` are not mixed with ours.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import zipfile
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .cli import ArgumentParser, check_output_path, run_command
from .utils import progress_bar

__all__ = [
    "main", "parse_args", "InceptionV3FID", "load_inception", "load_images", "iter_npz_images", "npz_image_shape",
    "compute_activations", "frechet_distance", "inception_score", "manifold_radii",
    "precision_recall", "evaluate_activations", "evaluate_files", "tf1_resize_bilinear",
]

#: Input side of the FID Inception network.
INCEPTION_SIZE = 299
#: Classes of the 2015 Inception graph's classifier.
INCEPTION_CLASSES = 1008
#: Channels of mixed_6/conv kept for sFID.
SPATIAL_CHANNELS = 7
#: ADM's evaluator: IS over consecutive splits of this many samples; k of the k-NN manifold.
IS_SPLIT_SIZE = 5000
NEAREST_K = 3


# ---------------------------------------------------------------------------
# Inception-v3 of the FID literature
# ---------------------------------------------------------------------------

class BasicConv2d(nn.Module):
    """conv (no bias) + batch norm (eps 1e-3, as TensorFlow's) + ReLU."""

    def __init__(self, cin: int, cout: int, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg3(x):
    # TensorFlow's average pooling ignores the padding
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg3(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = layer(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg3(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """The 8 x 8 blocks; the last one of the FID graph max-pools its pool branch."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pool)], 1)


def tf1_resize_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    """TensorFlow 1's ``resize_bilinear`` (align_corners=False, no half-pixel centres) of NCHW ``x``
    to ``size`` x ``size``, with TensorFlow's arithmetic: output pixel i reads the float32 position
    i * (in / out), lo = floor, hi = min(lo + 1, in - 1), value = top + (bottom - top) * frac,
    interpolated along x first."""

    def axis(n_in: int):
        src = torch.arange(size, dtype=torch.float32) * torch.tensor(n_in / size, dtype=torch.float32)
        lo = src.floor().long().clamp(max=n_in - 1)
        hi = (lo + 1).clamp(max=n_in - 1)
        return lo.to(x.device), hi.to(x.device), (src - lo.float()).to(device=x.device, dtype=x.dtype)

    y0, y1, fy = axis(x.shape[-2])
    x0, x1, fx = axis(x.shape[-1])
    top, bottom = x[..., y0, :], x[..., y1, :]
    top = top[..., x0] + (top[..., x1] - top[..., x0]) * fx
    bottom = bottom[..., x0] + (bottom[..., x1] - bottom[..., x0]) * fx
    return top + (bottom - top) * fy[:, None]


class InceptionV3FID(nn.Module):
    """The Inception-v3 of the FID literature (parameter names as torchvision's ``Inception3``).

    ``forward(uint8 or float images NHWC in [0, 255])`` returns a dict: ``pool``
    [N, 2048], ``spatial`` [N, 2023] (mixed_6/conv, first 7 channels, NHWC order),
    ``logits_unbiased`` [N, 1008] (pool times the classifier weights, no bias).
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, INCEPTION_CLASSES)

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be [N, H, W, 3], got {tuple(images.shape)}")
        x = images.permute(0, 3, 1, 2).float()                                 # (N, 3, H, W) in [0, 255]
        x = tf1_resize_bilinear(x, INCEPTION_SIZE)
        x = (x - 128.0) / 128.0
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)                                       # (N, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))                     # (N, 768, 17, 17)
        spatial = self.Mixed_6d.branch1x1(x)[:, :SPATIAL_CHANNELS]             # (N, 7, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(x))
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))                     # (N, 2048, 8, 8)
        pool = x.mean(dim=(2, 3))
        return {"pool": pool, "spatial": spatial.permute(0, 2, 3, 1).reshape(len(pool), -1),
                "logits_unbiased": pool @ self.fc.weight.t()}


def load_inception(path: str, device="cpu") -> InceptionV3FID:
    """The FID Inception with the weights of a local state-dict file (see the module docstring)."""
    if not Path(path).is_file():
        raise ValueError(f"--inception {path!r} is not a file (the FID Inception weights, e.g. "
                         "pt_inception-2015-12-05-6726825d.pth)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise ValueError(f"--inception {path!r}: cannot read a state dict ({type(e).__name__}: {e})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"--inception {path!r}: expected a state dict, got {type(state).__name__}")
    model = InceptionV3FID()
    ours = model.state_dict()
    missing = sorted(set(ours) - set(state))
    unexpected = sorted(k for k in set(state) - set(ours) if not k.startswith("AuxLogits."))
    shapes = [k for k in ours if k in state and tuple(state[k].shape) != tuple(ours[k].shape)]
    if missing or unexpected or shapes:
        raise ValueError(f"--inception {path!r} is not an FID Inception-v3 state dict: "
                         f"{len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected "
                         f"{unexpected[:3]}, {len(shapes)} of another shape {shapes[:3]}")
    model.load_state_dict({k: state[k] for k in ours})
    return model.to(device).eval()


# ---------------------------------------------------------------------------
# Metrics on activations
# ---------------------------------------------------------------------------

def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """FID between Gaussians fitted (mean, unbiased covariance) to two [N, D] feature sets."""
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError:
        raise ValueError("FID needs the torchmetrics package (pip install torchmetrics, or the eval extra)") from None

    class _Features(nn.Module):
        """The metric's "feature extractor": the features are already computed."""

        def __init__(self, dim: int):
            super().__init__()
            self.num_features = dim

        def forward(self, x):
            return x

    a, b = np.asarray(feats_a, dtype=np.float64), np.asarray(feats_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError(f"feature sets must be [N, D] with one D and N >= 2, got {a.shape} and {b.shape}")
    metric = FrechetInceptionDistance(feature=_Features(a.shape[1])).set_dtype(torch.float64)
    metric.update(torch.from_numpy(a), real=True)
    metric.update(torch.from_numpy(b), real=False)
    return float(metric.compute())


def inception_score(logits: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
    """mean over consecutive splits of exp(mean_x KL(softmax(logits_x) || mean softmax))."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    preds = torch.softmax(logits, dim=1)
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i:i + split_size]
        kl = part * (torch.log(part) - torch.log(part.mean(0, keepdim=True)))
        scores.append(math.exp(kl.sum(1).mean().item()))
    return float(np.mean(scores))


def _sq_distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    d = (u * u).sum(1)[:, None] - 2 * u @ v.t() + (v * v).sum(1)[None, :]
    return d.clamp_min(0)


def manifold_radii(features: np.ndarray, k: int = NEAREST_K, batch: int = 10000) -> np.ndarray:
    """Squared distance of each point to its k-th nearest other point of the same set."""
    f = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    if len(f) <= k:
        raise ValueError(f"the k-NN manifold needs more than k = {k} points, got {len(f)}")
    out = []
    for s in range(0, len(f), batch):
        d = _sq_distances(f[s:s + batch], f)
        out.append(d.kthvalue(k + 1, dim=1).values)  # the 1st smallest is the point itself (0)
    return torch.cat(out).numpy()


def precision_recall(ref: np.ndarray, samples: np.ndarray, k: int = NEAREST_K,
                     batch: int = 10000) -> Dict[str, float]:
    """Improved precision/recall: precision = share of samples inside some reference point's
    k-NN ball, recall = share of reference points inside some sample's k-NN ball."""
    r = torch.as_tensor(np.asarray(ref), dtype=torch.float64)
    s = torch.as_tensor(np.asarray(samples), dtype=torch.float64)
    radii_r = torch.from_numpy(manifold_radii(ref, k, batch))
    radii_s = torch.from_numpy(manifold_radii(samples, k, batch))
    s_in = torch.zeros(len(s), dtype=torch.bool)
    r_in = torch.zeros(len(r), dtype=torch.bool)
    for i in range(0, len(r), batch):
        for j in range(0, len(s), batch):
            d = _sq_distances(r[i:i + batch], s[j:j + batch])          # (ref, sample)
            s_in[j:j + batch] |= (d <= radii_r[i:i + batch, None]).any(0)
            r_in[i:i + batch] |= (d <= radii_s[None, j:j + batch]).any(1)
    return {"precision": float(s_in.double().mean()), "recall": float(r_in.double().mean())}


def evaluate_activations(ref: Dict[str, np.ndarray], samples: Dict[str, np.ndarray]) -> Dict[str, float]:
    """All five metrics from the activations (dicts with pool, spatial, logits_unbiased)."""
    pr = precision_recall(ref["pool"], samples["pool"])
    return {"inception_score": inception_score(samples["logits_unbiased"]),
            "fid": frechet_distance(samples["pool"], ref["pool"]),
            "sfid": frechet_distance(samples["spatial"], ref["spatial"]),
            "precision": pr["precision"], "recall": pr["recall"]}


# ---------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------

def _npz_member(path: str):
    if not Path(path).is_file():
        raise ValueError(f"{path!r} is not a file (an .npz with arr_0 uint8 [N, H, W, 3])")
    try:
        zf = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path!r}: not a readable .npz ({e})") from None
    if "arr_0.npy" not in zf.namelist():
        names = zf.namelist()[:5]
        zf.close()
        raise ValueError(f"{path!r} has no arr_0 (holds {names})")
    return zf


def _read_header(f, path: str):
    try:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
    except ValueError as e:
        raise ValueError(f"{path!r}: arr_0 is not a readable .npy ({e})") from None
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or fortran:
        raise ValueError(f"{path!r}: arr_0 must be uint8 [N, H, W, 3] (C order), got {dtype} {list(shape)}")
    if shape[0] <= NEAREST_K:
        raise ValueError(f"{path!r}: {shape[0]} images; the metrics need more than {NEAREST_K}")
    return tuple(int(v) for v in shape)


def npz_image_shape(path: str) -> tuple:
    """Shape of ``arr_0`` of an ADM .npz (uint8 [N, H, W, 3], checked), read from its header only."""
    with _npz_member(path) as zf, zf.open("arr_0.npy") as f:
        return _read_header(f, path)


def iter_npz_images(path: str, batch_size: int):
    """``arr_0`` of an ADM .npz in batches of uint8 [<= batch_size, H, W, 3], streamed from the file
    (a 50,000-image batch is never held in memory whole)."""
    with _npz_member(path) as zf, zf.open("arr_0.npy") as f:
        shape = _read_header(f, path)
        per_image = int(np.prod(shape[1:]))
        for start in range(0, shape[0], batch_size):
            count = min(batch_size, shape[0] - start)
            data = f.read(count * per_image)
            if len(data) != count * per_image:
                raise ValueError(f"{path!r}: arr_0 ends after {start + len(data) // per_image} of {shape[0]} images")
            yield np.frombuffer(data, dtype=np.uint8).reshape(count, *shape[1:])


def load_images(path: str) -> np.ndarray:
    """``arr_0`` of an ADM .npz: uint8 [N, H, W, 3] (whole, in memory)."""
    n = npz_image_shape(path)[0]
    return np.concatenate(list(iter_npz_images(path, max(1, n))))


@torch.no_grad()
def compute_activations(images, network: Callable[[torch.Tensor], Dict[str, torch.Tensor]],
                        batch_size: int = 250, device="cpu", progress: bool = False,
                        desc: str = "activations") -> Dict[str, np.ndarray]:
    """Features of uint8 [N, H, W, 3] images: an array, or a path to an ADM .npz (streamed)."""
    if isinstance(images, (str, Path)):
        n = npz_image_shape(str(images))[0]
        batches = iter_npz_images(str(images), batch_size)
    else:
        n = len(images)
        batches = (images[s:s + batch_size] for s in range(0, n, batch_size))
    outs: Dict[str, list] = {}
    for batch in progress_bar(batches, total=math.ceil(n / batch_size), desc=desc, disable=not progress):
        batch = torch.from_numpy(np.require(batch, requirements=["C", "W"])).to(device)  # read-only arrays copied
        for key, value in network(batch).items():
            outs.setdefault(key, []).append(value.double().cpu().numpy())
    return {k: np.concatenate(v) for k, v in outs.items()}


def evaluate_files(ref_path: str, sample_path: str, network: Callable[[torch.Tensor], Dict[str, torch.Tensor]],
                   batch_size: int = 250, device="cpu", progress: bool = False) -> Dict[str, float]:
    """The metrics of two ADM .npz batches with any feature network (the FID Inception by default
    on the command line) returning ``pool``, ``spatial`` and ``logits_unbiased``."""
    n_ref, n_samples = npz_image_shape(ref_path)[0], npz_image_shape(sample_path)[0]
    acts = [compute_activations(path, network, batch_size, device, progress, desc=name)
            for path, name in ((ref_path, "reference"), (sample_path, "samples"))]
    metrics = evaluate_activations(acts[0], acts[1])
    metrics.update(num_reference=int(n_ref), num_samples=int(n_samples))
    return metrics


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = ArgumentParser("python -m edt.evaluate", __doc__)
    p.add_argument("ref_batch", help="reference .npz (arr_0 uint8 [N, H, W, 3]), e.g. ADM's "
                   "VIRTUAL_imagenet256_labeled.npz")
    p.add_argument("sample_batch", help="samples .npz in the same format (edt.sample writes it)")
    p.add_argument("--inception", required=True, help="local FID Inception-v3 weights (state dict .pth)")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    if args.json:
        with p.usage_errors():
            check_output_path("--json", args.json, kind="file")
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, float]:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked but no CUDA device is available")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    npz_image_shape(args.ref_batch), npz_image_shape(args.sample_batch)  # bad files fail before the network loads
    network = load_inception(args.inception, device)
    metrics = evaluate_files(args.ref_batch, args.sample_batch, network, args.batch_size, device,
                             progress=not args.no_progress)
    print(f"Inception Score: {metrics['inception_score']:.4f}")
    print(f"FID: {metrics['fid']:.4f}")
    print(f"sFID: {metrics['sfid']:.4f}")
    print(f"Precision: {metrics['precision']:.4f}")
    print(f"Recall: {metrics['recall']:.4f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    sys.exit(run_command(main, sys.argv[1:]))
