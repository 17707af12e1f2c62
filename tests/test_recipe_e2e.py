"""The whole recipe on tiny data: images -> extract_features (tiny VAE) -> train -> sample -> evaluate."""
import json
import math

import numpy as np
import torch

from edt import evaluate, extract_features, sample, train
from edt.extract_features import center_crop_arr
from test_extract_features import make_tiny_vae

# Published EDT-S/2 stage layout at tiny widths, plain-PyTorch path (as tests/test_train.py).
EDT_TINY = {"dims": [32, 48, 64, 48, 32], "num_heads": [2, 2, 2, 2, 2], "hidden_size": 32, "backend": "eager"}
IMAGE = 64  # latent 8x8
CLASSES = 2


class RandomFeatures(torch.nn.Module):
    """A random-weight stand-in for the FID Inception: pool, spatial and logit features of uint8 NHWC images."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 16, 5, stride=2)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, images):
        x = torch.relu(self.conv(images.permute(0, 3, 1, 2).float() / 127.5 - 1))
        pool = x.mean(dim=(2, 3))
        return {"pool": pool, "spatial": x[:, :2, ::8, ::8].flatten(1), "logits_unbiased": self.fc(pool)}


def test_extract_train_sample_evaluate(tmp_path, one_thread):
    from PIL import Image

    rng = np.random.default_rng(0)
    ref = []
    for c in range(CLASSES):
        (tmp_path / "images" / f"class{c}").mkdir(parents=True)
        for k in range(4):
            arr = np.clip(rng.normal(80 + 100 * c, 40, (IMAGE + 8 * k, IMAGE, 3)), 0, 255).astype(np.uint8)
            im = Image.fromarray(arr)
            im.save(tmp_path / "images" / f"class{c}" / f"{k}.png")
            ref.append(np.asarray(center_crop_arr(im, IMAGE)))
    vae = make_tiny_vae(tmp_path / "vae")

    ext = extract_features.main(["--data-path", str(tmp_path / "images"), "--vae", str(vae), "--features-path",
                                 str(tmp_path / "features"), "--image-size", str(IMAGE), "--no-progress",
                                 "--device", "cpu"])
    assert ext["written"] == 8

    run = train.main(["--model", "EDT-S/2", "--model-kwargs", json.dumps(EDT_TINY), "--image-size", str(IMAGE),
                      "--num-classes", str(CLASSES), "--data-path", str(tmp_path / "features"),
                      "--global-batch-size", "4", "--max-steps", "2", "--log-every", "1", "--lr", "1e-3",
                      "--results-dir", str(tmp_path / "run"), "--no-progress", "--device", "cpu"])
    assert run["step"] == 2 and all(math.isfinite(h["loss"]) for h in run["history"])

    out = sample.main(["--ckpt", run["checkpoint"], "--num-samples", "4", "--batch-size", "4",
                       "--num-sampling-steps", "2", "--vae", str(vae), "--out-dir", str(tmp_path / "samples"),
                       "--no-progress", "--device", "cpu"])
    images = np.load(out["npz"])["arr_0"]
    assert images.shape == (4, IMAGE, IMAGE, 3) and images.dtype == np.uint8

    np.savez(tmp_path / "ref.npz", arr_0=np.stack(ref))
    metrics = evaluate.evaluate_files(str(tmp_path / "ref.npz"), out["npz"], RandomFeatures().eval())
    assert set(metrics) >= {"fid", "sfid", "inception_score", "precision", "recall"}
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    assert metrics["fid"] > 0 and metrics["inception_score"] >= 1.0
    assert 0 <= metrics["precision"] <= 1 and 0 <= metrics["recall"] <= 1
    assert (metrics["num_reference"], metrics["num_samples"]) == (8, 4)
