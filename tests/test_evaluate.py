"""python -m edt.evaluate: each metric against closed forms or hand-worked toy data, and the
whole command on random-weight Inception features."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edt.evaluate import (InceptionV3FID, frechet_distance, inception_score, iter_npz_images, load_images,
                          load_inception, main, manifold_radii, npz_image_shape, precision_recall,
                          tf1_resize_bilinear)

REPO = Path(__file__).resolve().parents[1]


def with_exact_moments(mu, cov, n, rng):
    """n points whose sample mean is mu and unbiased sample covariance exactly cov."""
    d = len(mu)
    z = rng.standard_normal((n, d))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.atleast_2d(np.cov(z, rowvar=False)))).T  # whitened: cov(z) = I
    return mu + z @ np.linalg.cholesky(cov).T


def gaussian_frechet(mu1, s1, mu2, s2):
    """d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), symmetric square roots by eigh."""
    def sqrt_psd(a):
        w, v = np.linalg.eigh(a)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    r = sqrt_psd(s1)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(sqrt_psd(r @ s2 @ r)))


def two_gaussians(d: int = 6):
    """(mu1, s1, mu2, s2, rng): two random Gaussians in d dimensions, well conditioned."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((d, d)), rng.standard_normal((d, d))
    s1, s2 = a @ a.T + 0.1 * np.eye(d), b @ b.T + 0.1 * np.eye(d)
    return rng.standard_normal(d), s1, rng.standard_normal(d), s2, rng


def test_closed_form_matches_scipys_general_square_root():
    """The eigh closed form used below, cross-checked against scipy's general matrix square root."""
    scipy_linalg = pytest.importorskip("scipy.linalg", reason="scipy is not installed (the eval extra)")
    mu1, s1, mu2, s2, _ = two_gaussians()
    assert gaussian_frechet(mu1, s1, mu2, s2) == pytest.approx(
        float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2) - 2 * np.trace(scipy_linalg.sqrtm(s1 @ s2).real)),
        rel=1e-9)


def test_fid_equals_closed_form_between_known_gaussians():
    pytest.importorskip("torchmetrics", reason="torchmetrics is not installed (the eval extra)")
    mu1, s1, mu2, s2, rng = two_gaussians()
    x1, x2 = with_exact_moments(mu1, s1, 200, rng), with_exact_moments(mu2, s2, 300, rng)
    expected = gaussian_frechet(mu1, s1, mu2, s2)
    assert expected > 1
    assert frechet_distance(x1, x2) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(x2, x1) == pytest.approx(expected, rel=1e-9)
    assert abs(frechet_distance(x1, x1)) < 1e-9
    # 1-d: (m1 - m2)^2 + (sd1 - sd2)^2; diagonal covariances: sum of (sqrt a_i - sqrt b_i)^2
    y1 = with_exact_moments(np.array([1.0]), np.array([[4.0]]), 50, rng)
    y2 = with_exact_moments(np.array([-2.0]), np.array([[9.0]]), 70, rng)
    assert frechet_distance(y1, y2) == pytest.approx(9.0 + 1.0, rel=1e-10)
    da, db = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 1.0])
    z1 = with_exact_moments(np.zeros(3), np.diag(da), 40, rng)
    z2 = with_exact_moments(np.zeros(3), np.diag(db), 40, rng)
    assert frechet_distance(z1, z2) == pytest.approx(((np.sqrt(da) - np.sqrt(db)) ** 2).sum(), rel=1e-9)
    with pytest.raises(ValueError, match="one D"):
        frechet_distance(x1, x2[:, :3])


def test_inception_score_known_values_and_torchmetrics():
    k = 7
    # confident, every class equally often: IS = k; identical predictions: IS = 1
    confident = np.tile(np.eye(k) * 60.0, (3, 1))
    assert inception_score(confident) == pytest.approx(k, rel=1e-12)
    assert inception_score(np.ones((10, k))) == pytest.approx(1.0, abs=1e-12)
    # consecutive splits of split_size, averaged
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((23, k)) * 3
    parts = [inception_score(logits[i:i + 10], split_size=10) for i in (0, 10, 20)]
    assert inception_score(logits, split_size=10) == pytest.approx(np.mean(parts), rel=1e-12)
    # one split: torchmetrics' InceptionScore on the same logits
    InceptionScore = pytest.importorskip("torchmetrics.image.inception",
                                         reason="torchmetrics is not installed (the eval extra)").InceptionScore

    class Logits(torch.nn.Module):
        def forward(self, x):
            return x

    metric = InceptionScore(feature=Logits(), splits=1)
    metric.update(torch.from_numpy(logits))
    assert inception_score(logits) == pytest.approx(float(metric.compute()[0]), rel=1e-10)


def test_precision_recall_hand_worked_1d():
    """k = 3, squared distances. ref {0,1,2,3,4}: radii 9,4,4,4,9. samples {0.5,10,11,12,13}:
    only 0.5 lies in a ref ball -> precision 1/5; the sample 0.5 has radius 11.5^2, which covers
    every ref point -> recall 1."""
    ref = np.stack([np.arange(5.0), np.zeros(5)], 1)
    smp = np.stack([np.array([0.5, 10, 11, 12, 13]), np.zeros(5)], 1)
    np.testing.assert_allclose(manifold_radii(ref), [9, 4, 4, 4, 9])
    np.testing.assert_allclose(manifold_radii(smp), [11.5 ** 2, 9, 4, 4, 9])
    assert precision_recall(ref, smp) == {"precision": 0.2, "recall": 1.0}
    assert precision_recall(smp, ref) == {"precision": 1.0, "recall": 0.2}
    # batching does not change the answer
    assert precision_recall(ref, smp, batch=2) == {"precision": 0.2, "recall": 1.0}
    with pytest.raises(ValueError, match="more than k = 3 points"):
        manifold_radii(ref[:3])


def test_precision_recall_disjoint_and_identical_clouds():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((60, 4))
    assert precision_recall(a, a) == {"precision": 1.0, "recall": 1.0}
    assert precision_recall(a, a + 100.0) == {"precision": 0.0, "recall": 0.0}


def test_tf1_bilinear_resize():
    """TensorFlow 1's arithmetic: float32 source position i * in / out, lerp along x then y."""
    x = torch.arange(2 * 4 * 5, dtype=torch.float64).reshape(1, 2, 4, 5) ** 1.5
    out = tf1_resize_bilinear(x, 7)
    ref = np.zeros((1, 2, 7, 7))
    xn = x.numpy()
    for i in range(7):
        sy = float(np.float32(i) * np.float32(4 / 7))
        y0 = int(math.floor(sy))
        fy, y1 = sy - y0, min(y0 + 1, 3)
        for j in range(7):
            sx = float(np.float32(j) * np.float32(5 / 7))
            x0 = int(math.floor(sx))
            fx, x1 = sx - x0, min(x0 + 1, 4)
            top = xn[..., y0, x0] + (xn[..., y0, x1] - xn[..., y0, x0]) * fx
            bot = xn[..., y1, x0] + (xn[..., y1, x1] - xn[..., y1, x0]) * fx
            ref[..., i, j] = top + (bot - top) * fy
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-12)
    torch.testing.assert_close(tf1_resize_bilinear(x[..., :4, :4], 4), x[..., :4, :4], rtol=0, atol=0)
    # a constant image stays constant
    c = torch.full((1, 3, 32, 48), 17.0)
    torch.testing.assert_close(tf1_resize_bilinear(c, 299), torch.full((1, 3, 299, 299), 17.0), rtol=0, atol=0)


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed], ids=["npz", "compressed"])
def test_npz_images_stream_in_batches(tmp_path, save):
    imgs = np.random.default_rng(4).integers(0, 256, (11, 6, 5, 3), dtype=np.uint8)
    save(tmp_path / "x.npz", arr_0=imgs, labels=np.arange(11))
    assert npz_image_shape(str(tmp_path / "x.npz")) == (11, 6, 5, 3)
    batches = list(iter_npz_images(str(tmp_path / "x.npz"), 4))
    assert [len(b) for b in batches] == [4, 4, 3]
    np.testing.assert_array_equal(np.concatenate(batches), imgs)
    np.testing.assert_array_equal(load_images(str(tmp_path / "x.npz")), imgs)
    save(tmp_path / "y.npz", arr_1=imgs)
    with pytest.raises(ValueError, match="has no arr_0"):
        npz_image_shape(str(tmp_path / "y.npz"))
    save(tmp_path / "z.npz", arr_0=imgs[:3])
    with pytest.raises(ValueError, match="need more than 3"):
        npz_image_shape(str(tmp_path / "z.npz"))
    (tmp_path / "w.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable .npz"):
        npz_image_shape(str(tmp_path / "w.npz"))


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("inception") / "random_inception.pth"
    torch.save(InceptionV3FID().state_dict(), path)
    return path


def test_evaluate_command_with_random_inception(random_inception, tmp_path, one_thread):
    pytest.importorskip("torchmetrics", reason="torchmetrics is not installed (the eval extra)")
    rng = np.random.default_rng(3)
    ref = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    smp = np.concatenate([ref[:2], rng.integers(0, 64, (2, 32, 32, 3), dtype=np.uint8)])
    np.savez(tmp_path / "ref.npz", arr_0=ref)
    np.savez(tmp_path / "smp.npz", arr_0=smp)
    out = main([str(tmp_path / "ref.npz"), str(tmp_path / "smp.npz"), "--inception", str(random_inception),
                "--device", "cpu", "--no-progress", "--json", str(tmp_path / "m.json")])
    assert set(out) >= {"fid", "sfid", "inception_score", "precision", "recall"}
    assert all(math.isfinite(v) for v in out.values())
    assert out["fid"] > 0 and out["sfid"] > 0 and out["inception_score"] >= 1.0
    assert 0.4 <= out["precision"] <= 1.0 and 0.4 <= out["recall"] <= 1.0  # 2 of 4 samples are reference images
    assert json.loads((tmp_path / "m.json").read_text()) == out
    # the network: shapes and the features the metrics read
    net = load_inception(str(random_inception))
    with torch.no_grad():
        feats = net(torch.from_numpy(ref[:1]))
    assert feats["pool"].shape == (1, 2048) and feats["spatial"].shape == (1, 17 * 17 * 7)
    torch.testing.assert_close(feats["logits_unbiased"], feats["pool"] @ net.fc.weight.t())


def _error_cases(tmp_path):
    np.savez(tmp_path / "ok.npz", arr_0=np.zeros((5, 8, 8, 3), np.uint8))
    np.savez(tmp_path / "bad.npz", arr_0=np.zeros((5, 8, 8), np.float32))
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "wrong.pth")
    ok, inc = str(tmp_path / "ok.npz"), ["--inception", str(tmp_path / "wrong.pth")]
    return {"missing-npz": ([str(tmp_path / "none.npz"), ok, *inc], "is not a file"),
            "bad-array": ([ok, str(tmp_path / "bad.npz"), *inc], "must be uint8"),
            "missing-weights": ([ok, ok, "--inception", str(tmp_path / "none.pth")], "is not a file"),
            "wrong-weights": ([ok, ok, *inc], "not an FID Inception-v3 state dict"),
            "bad-flag": ([ok, ok, *inc, "--batch-size", "0"], "--batch-size must be >= 1"),
            # refused before the evaluation (the weights are never read)
            "json-is-a-directory": ([ok, ok, *inc, "--json", str(tmp_path)],
                                    f"--json '{tmp_path}' is a directory; expected a file path"),
            "json-under-a-file": ([ok, ok, *inc, "--json", f"{ok}/m.json"],
                                  f"--json '{ok}/m.json': '{ok}' is a file; expected a directory there")}


@pytest.mark.parametrize("case", ["missing-npz", "bad-flag", "json-is-a-directory", "json-under-a-file"])
def test_cli_errors_are_one_line(tmp_path, case):
    args, message = _error_cases(tmp_path)[case]
    proc = subprocess.run([sys.executable, "-m", "edt.evaluate", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr


@pytest.mark.parametrize("case", ["missing-npz", "bad-array", "missing-weights", "wrong-weights"])
def test_bad_inputs_raise_value_error(tmp_path, case):
    """What the command turns into its one-line error (tested above on two cases)."""
    args, message = _error_cases(tmp_path)[case]
    with pytest.raises(ValueError, match=message):
        main(args)
