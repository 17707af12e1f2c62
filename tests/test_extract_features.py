"""python -m edt.extract_features on a few generated images and a tiny random AutoencoderKL."""
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edt.data import VAE_SCALE_FACTOR, LatentFolder
from edt.extract_features import ImageFolderPIL, center_crop_arr, load_vae, main

REPO = Path(__file__).resolve().parents[1]
SIZE = 32


def make_tiny_vae(path: Path) -> Path:
    """An AutoencoderKL with the SD VAE's structure (4 latent channels, x8 down-sampling), tiny widths."""
    AutoencoderKL = pytest.importorskip("diffusers.models", reason="diffusers is not installed (the eval extra)"
                                        ).AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, sample_size=SIZE)
    vae.save_pretrained(path)
    return path


def make_image_folder(root: Path) -> Path:
    """2 classes x 3 images: different sizes (one needs the box-filter halving), one greyscale, one JPEG."""
    rng = np.random.default_rng(0)
    specs = {"cat": [(40, 64, "RGB", "png"), (130, 70, "RGB", "png"), (32, 32, "L", "png")],
             "dog": [(50, 45, "RGB", "jpg"), (64, 80, "RGB", "png"), (33, 90, "RGB", "png")]}
    for cls, items in specs.items():
        (root / cls).mkdir(parents=True)
        for k, (w, h, mode, ext) in enumerate(items):
            shape = (h, w) if mode == "L" else (h, w, 3)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / cls / f"{k}.{ext}")
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    base = tmp_path_factory.mktemp("extract")
    return make_image_folder(base / "images"), make_tiny_vae(base / "vae")


def cli(data, vae, out, *extra):
    return ["--data-path", str(data), "--vae", str(vae), "--features-path", str(out), "--image-size", str(SIZE),
            "--no-progress", "--device", "cpu", *extra]


def read_all(out: Path, n: int):
    f, l = out / f"imagenet{SIZE}_features", out / f"imagenet{SIZE}_labels"
    return [np.load(f / f"{i}.npy") for i in range(n)], [np.load(l / f"{i}.npy") for i in range(n)]


def test_center_crop_arr_matches_adm_steps():
    rng = np.random.default_rng(1)
    im = Image.fromarray(rng.integers(0, 256, (70, 130, 3), dtype=np.uint8))  # W 130, H 70
    # 70 >= 2 * 32: halve with a box filter -> 65 x 35; then bicubic to short side 32 -> 59 x 32 (round(65*32/35))
    step = im.resize((65, 35), resample=Image.BOX).resize((59, 32), resample=Image.BICUBIC)
    expected = np.asarray(step)[:, 13:45]  # (59 - 32) // 2 = 13
    np.testing.assert_array_equal(np.asarray(center_crop_arr(im, 32)), expected)
    small = Image.fromarray(rng.integers(0, 256, (40, 64, 3), dtype=np.uint8))  # no halving: 64*0.8 = 51.2
    expected = np.asarray(small.resize((51, 32), resample=Image.BICUBIC))[:, 9:41]
    np.testing.assert_array_equal(np.asarray(center_crop_arr(small, 32)), expected)


def test_dataset_order_range_and_seeded_flip(assets):
    data, _ = assets
    ds = ImageFolderPIL(data, SIZE, seed=3)
    plain = ImageFolderPIL(data, SIZE, flip=False)
    assert ds.classes == ["cat", "dog"] and len(ds) == 6
    assert [label for _, label in ds.samples] == [0, 0, 0, 1, 1, 1]
    flips = []
    for i in range(len(ds)):
        x, y, idx = ds[i]
        x0, _, _ = plain[i]
        assert x.shape == (3, SIZE, SIZE) and x.dtype == torch.float32 and idx == i and y == ds.samples[i][1]
        assert x.min() >= -1 and x.max() <= 1
        flipped = torch.equal(x, x0.flip(-1))
        assert flipped or torch.equal(x, x0)
        flips.append(flipped)
        assert torch.equal(ImageFolderPIL(data, SIZE, seed=3)[i][0], x)  # the flip is a function of (seed, i)
    assert 0 < sum(flips) < 6
    # pixels map to [-1, 1] as x / 127.5 - 1 of the centre crop
    arr = np.asarray(center_crop_arr(Image.open(ds.samples[0][0]).convert("RGB"), SIZE), dtype=np.float32)
    torch.testing.assert_close(plain[0][0], torch.from_numpy(arr.transpose(2, 0, 1) / 127.5 - 1), rtol=0, atol=1e-6)


def test_extract_writes_train_layout_with_scaled_posterior_samples(assets, tmp_path):
    data, vae_dir = assets
    res = main(cli(data, vae_dir, tmp_path / "a", "--batch-size", "4"))
    assert (res["written"], res["skipped"], res["total"]) == (6, 0, 6)
    feats, labels = read_all(tmp_path / "a", 6)
    assert all(f.shape == (1, 4, SIZE // 8, SIZE // 8) and f.dtype == np.float32 for f in feats)
    assert [int(l[0]) for l in labels] == [0, 0, 0, 1, 1, 1] and labels[0].dtype == np.int64
    # z / 0.18215 is a sample of the encoder's posterior N(mean, std^2): standardised, it is N(0, 1)
    vae = load_vae(str(vae_dir), torch.device("cpu"))
    ds = ImageFolderPIL(data, SIZE, seed=0)
    with torch.no_grad():
        post = vae.encode(torch.stack([ds[i][0] for i in range(6)])).latent_dist
    z = torch.from_numpy(np.concatenate(feats))
    eps = (z / VAE_SCALE_FACTOR - post.mean) / post.std
    assert abs(eps.mean().item()) < 0.2 and abs(eps.std().item() - 1) < 0.15
    # independent of batching: batch size 1 writes the same latents (to float32 convolution rounding)
    main(cli(data, vae_dir, tmp_path / "b", "--batch-size", "1"))
    for x, y in zip(feats, read_all(tmp_path / "b", 6)[0]):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)
    # edt.train's reader takes the folder as it is
    folder = LatentFolder(tmp_path / "a", (4, SIZE // 8, SIZE // 8), num_classes=2)
    assert len(folder) == 6 and folder.validate() == []
    assert int(folder[4][1]) == 1


def test_extract_resumes_skipping_written_files(assets, tmp_path):
    data, vae_dir = assets
    out = tmp_path / "r"
    main(cli(data, vae_dir, out))
    feats, _ = read_all(out, 6)
    fdir = out / f"imagenet{SIZE}_features"
    (fdir / "2.npy").unlink()
    (out / f"imagenet{SIZE}_labels" / "5.npy").unlink()
    marker = np.full((1, 4, 4, 4), 7.0, dtype=np.float32)
    np.save(fdir / "0.npy", marker)  # an existing file is not rewritten
    res = main(cli(data, vae_dir, out))
    assert (res["written"], res["skipped"]) == (2, 4)
    again, _ = read_all(out, 6)
    np.testing.assert_array_equal(again[0], marker)
    for i in (2, 5):
        np.testing.assert_array_equal(again[i], feats[i])
    assert sorted(p.name for p in fdir.iterdir()) == [f"{i}.npy" for i in range(6)]  # no temporary files left


@pytest.mark.parametrize("change, differs", [
    (["--seed", "1"], "seed"),
    (["--no-flip"], "flip"),
    (["--image-size", "16", "--name", f"imagenet{SIZE}"], "image_size"),
    (["--data-path", "OTHER"], "data_path"),  # a copy of the same images, elsewhere
], ids=["seed", "no-flip", "image-size", "data-path"])
def test_resume_with_other_settings_is_refused(assets, tmp_path, change, differs):
    """The features of another extraction are not mixed in: a rerun into the same folder with other
    settings is refused, and nothing there is touched."""
    data, vae_dir = assets
    out = tmp_path / "out"
    main(cli(data, vae_dir, out))
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    change = [str(make_image_folder(tmp_path / "other")) if c == "OTHER" else c for c in change]
    with pytest.raises(ValueError, match=rf"^{re.escape(str(out))}: holds imagenet{SIZE}_features/ and imagenet{SIZE}_labels/ "
                                         rf"of another extraction \(differs in: {differs}\); expected the same "
                                         rf"settings to resume it, or another --features-path or --name$"):
        main(cli(data, vae_dir, out, *change))
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before


def test_two_ranks_share_the_images(assets, tmp_path):
    data, vae_dir = assets
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "edt.extract_features",
           *cli(data, vae_dir, tmp_path / "ddp")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wrote 3" in proc.stdout
    main(cli(data, vae_dir, tmp_path / "one"))
    for x, y in zip(read_all(tmp_path / "ddp", 6)[0], read_all(tmp_path / "one", 6)[0]):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)


def _error_cases(assets, tmp_path):
    data, vae_dir = assets
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    (tmp_path / "a_file").write_text("")
    corrupt = make_image_folder(tmp_path / "corrupt") / "dog" / "1.png"
    corrupt.write_bytes(b"not a png")
    return {"no-data": (cli(tmp_path / "missing", vae_dir, tmp_path / "o"), "is not a directory"),
            "no-vae": (cli(data, tmp_path / "novae", tmp_path / "o"), "--vae"),
            "bad-size": (cli(data, vae_dir, tmp_path / "o") + ["--image-size", "30"], "multiple of 8"),
            "empty": (cli(tmp_path / "empty", vae_dir, tmp_path / "o"), "no images"),
            # read in a loader's worker process: its one line all the same
            "unreadable-image": (cli(tmp_path / "corrupt", vae_dir, tmp_path / "o", "--num-workers", "1"),
                                 f"^{re.escape(str(corrupt))}: cannot read the image \\(cannot identify image file"),
            "features-path-is-a-file": (cli(data, vae_dir, tmp_path / "a_file"),
                                        f"--features-path '{tmp_path / 'a_file'}' is a file; expected a directory"),
            "features-path-under-a-file": (cli(data, vae_dir, tmp_path / "a_file" / "o"),
                                           f"'{tmp_path / 'a_file'}' is a file; expected a directory there")}


@pytest.mark.parametrize("case", ["no-data", "bad-size", "features-path-is-a-file", "features-path-under-a-file"])
def test_cli_errors_are_one_line(assets, tmp_path, case):
    args, message = _error_cases(assets, tmp_path)[case]
    proc = subprocess.run([sys.executable, "-m", "edt.extract_features", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr


@pytest.mark.parametrize("case", ["no-data", "no-vae", "empty", "unreadable-image"])
def test_bad_inputs_raise_value_error(assets, tmp_path, case):
    """What the command turns into its one-line error (tested above on some cases)."""
    args, message = _error_cases(assets, tmp_path)[case]
    with pytest.raises(ValueError, match=message) as err:
        main(args)
    assert "\n" not in str(err.value), str(err.value)
