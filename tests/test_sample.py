"""``python -m edt.sample``: PNG grid + ADM-style npz, CFG, DDIM, AMM switch, checkpoint formats."""
import json
import struct
import sys
import types
import zlib

import numpy as np
import pytest
import torch

from edt import sample, train
from edt.utils import make_grid, write_png

# fused=False: the plain-PyTorch path of the models (on a CPU test box the fused token/adaLN
# kernels run through the Triton interpreter, far too slow for hundreds of steps; fused == plain
# is the models' own test).
EDT_TINY = {"dims": [32, 48, 64, 48, 32], "num_heads": [2, 2, 2, 2, 2], "hidden_size": 32, "fused": False}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A 2-step training checkpoint of a tiny EDT (10 classes, 64px -> 8x8 latents)."""
    root = tmp_path_factory.mktemp("run")
    with torch.random.fork_rng():
        out = train.main(["--model", "EDT-S/2", "--model-kwargs", json.dumps(EDT_TINY), "--image-size", "64",
                          "--num-classes", "10", "--global-batch-size", "8", "--max-steps", "2", "--synthetic",
                          "--synthetic-size", "16", "--results-dir", str(root), "--no-progress", "--lr", "1e-2"])
    return out["checkpoint"]


def _unfilter(rows: np.ndarray, bpp: int = 3) -> np.ndarray:
    """Undo the PNG row filters (None, Sub, Up, Average, Paeth)."""
    h, w = rows.shape[0], rows.shape[1] - 1
    out = np.zeros((h, w), np.int64)
    for r in range(h):
        kind, line = rows[r, 0], rows[r, 1:].astype(np.int64)
        prev = out[r - 1] if r else np.zeros(w, np.int64)
        cur = np.zeros(w, np.int64)
        for i in range(w):
            a = cur[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if kind == 0:
                pred = 0
            elif kind == 1:
                pred = a
            elif kind == 2:
                pred = b
            elif kind == 3:
                pred = (a + b) // 2
            else:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
            cur[i] = (line[i] + pred) % 256
        out[r] = cur
    return out.astype(np.uint8)


def read_png(path):
    """Minimal PNG reader for 8-bit RGB files (no interlacing)."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, kind
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + n
    w, h, depth, color = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, color) == (8, 2) and b"IEND" in chunks
    raw = zlib.decompress(chunks[b"IDAT"])
    assert len(raw) == h * (1 + 3 * w)
    rows = np.frombuffer(raw, np.uint8).reshape(h, 1 + 3 * w)
    return _unfilter(rows).reshape(h, w, 3)


def run(ckpt, tmp_path, *extra):
    return sample.main(["--ckpt", ckpt, "--out-dir", str(tmp_path), "--num-sampling-steps", "4",
                        "--no-progress", *extra])


def test_writes_png_grid_and_adm_npz(ckpt, tmp_path):
    out = run(ckpt, tmp_path, "--num-samples", "5", "--batch-size", "3", "--cfg-scale", "2.0",
              "--grid-nrow", "4", "--class-labels", "1", "9")
    with np.load(tmp_path / "samples.npz") as z:
        assert list(z.keys()) == ["arr_0"]
        arr = z["arr_0"]
    assert arr.shape == (5, 8, 8, 3) and arr.dtype == np.uint8  # no VAE: the 8x8 latents
    assert np.array_equal(arr, out["images"]) and out["labels"].tolist() == [1, 9, 1, 9, 1]
    png = read_png(tmp_path / "samples.png")
    assert png.shape == (2 * 10 + 2, 4 * 10 + 2, 3)  # 2 rows x 4 columns of 8px + 2px padding
    assert np.array_equal(png, make_grid(arr, nrow=4))


def test_seed_reproducible_and_ddim(ckpt, tmp_path):
    a = run(ckpt, tmp_path / "a", "--num-samples", "3", "--ddim", "--seed", "1")["images"]
    b = run(ckpt, tmp_path / "b", "--num-samples", "3", "--ddim", "--seed", "1")["images"]
    c = run(ckpt, tmp_path / "c", "--num-samples", "3", "--ddim", "--seed", "2")["images"]
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_amm_switch(ckpt, tmp_path):
    on = run(ckpt, tmp_path / "on", "--num-samples", "2", "--amm")
    off = run(ckpt, tmp_path / "off", "--num-samples", "2", "--no-amm")
    assert on["amm_blocks"] == (7, 10) and off["amm_blocks"] == ()  # EDT-S placement, SPEC 3


def test_model_without_amm_switch_rejects_amm(ckpt, tmp_path, monkeypatch):
    class Plain(torch.nn.Module):
        def __init__(self, input_size, num_classes, learn_sigma, **kw):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x, t, y):
            return torch.cat([x, x], 1) * self.w

    mod = types.ModuleType("edt_test_plain_models")
    mod.Plain = Plain
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    with pytest.raises(ValueError, match="has no AMM switch"):
        sample.main(["--model", "edt_test_plain_models:Plain", "--model-kwargs", "{}", "--amm",
                     "--out-dir", str(tmp_path), "--num-sampling-steps", "2", "--no-progress"])
    out = sample.main(["--model", "edt_test_plain_models:Plain", "--model-kwargs", "{}", "--image-size", "16",
                       "--num-samples", "2", "--out-dir", str(tmp_path), "--num-sampling-steps", "2",
                       "--no-progress"])
    assert out["images"].shape == (2, 2, 2, 3) and "amm_blocks" not in out


def test_bare_state_dict_and_mismatch(ckpt, tmp_path):
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    torch.save(state["ema"], tmp_path / "published.pt")  # a published checkpoint is a bare state dict
    args = ["--model", "EDT-S/2", "--model-kwargs", json.dumps(EDT_TINY), "--image-size", "64",
            "--num-classes", "10", "--num-samples", "2"]
    out = run(str(tmp_path / "published.pt"), tmp_path / "bare", *args)
    ref = run(ckpt, tmp_path / "ema", "--num-samples", "2")
    assert np.array_equal(out["images"], ref["images"])  # EMA weights are the default
    del state["ema"]["y_embedder.embedding_table.weight"]
    torch.save(state["ema"], tmp_path / "broken.pt")
    with pytest.raises(ValueError, match=r"missing keys: y_embedder\.embedding_table\.weight"):
        run(str(tmp_path / "broken.pt"), tmp_path / "x", *args)
    with pytest.raises(ValueError, match=r"shape mismatches: .*y_embedder\.embedding_table\.weight"):
        run(ckpt, tmp_path / "x", "--num-classes", "20")


def test_bad_arguments(ckpt, tmp_path):
    with pytest.raises(ValueError, match=r"--class-labels \[10\] out of range \[0, 10\)"):
        run(ckpt, tmp_path, "--class-labels", "10")
    try:
        import diffusers  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="needs the diffusers package"):
            run(ckpt, tmp_path, "--vae", str(tmp_path))


def test_write_png_roundtrip(tmp_path):
    img = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    write_png(tmp_path / "x.png", img)
    assert np.array_equal(read_png(tmp_path / "x.png"), img)
    with pytest.raises(TypeError, match="uint8"):
        write_png(tmp_path / "y.png", img.astype(np.float32))
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        write_png(tmp_path / "y.png", img[..., :2])
