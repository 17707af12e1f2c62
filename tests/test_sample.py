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

# backend="eager": the plain-PyTorch path of the models (on a CPU test box the token/adaLN
# kernels run through the Triton interpreter, far too slow for hundreds of steps; kernels ==
# eager is the models' own test).
EDT_TINY = {"dims": [32, 48, 64, 48, 32], "num_heads": [2, 2, 2, 2, 2], "hidden_size": 32, "backend": "eager"}


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
    assert on["amm_blocks"] == (7, 10) and off["amm_blocks"] == ()  # EDT-S placement (blocks 7 and 10)


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
    # the checkpoint's constructor arguments (an EDT's) do not fit another model
    with pytest.raises(ValueError, match=r"model 'MDTv2-S/2' cannot be built .*unexpected keyword argument 'dims'"):
        run(ckpt, tmp_path, "--model", "MDTv2-S/2")
    try:
        import diffusers  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="needs the diffusers package"):
            run(ckpt, tmp_path, "--vae", str(tmp_path))


@pytest.mark.parametrize("flags, message", [
    (["--image-size", "0"], "--image-size must be a positive multiple of 8, got 0"),
    (["--image-size", "-8"], "--image-size must be a positive multiple of 8, got -8"),
    (["--num-classes", "0"], "--num-classes must be >= 1, got 0"),
    (["--num-classes", "-3"], "--num-classes must be >= 1, got -3"),
    (["--grid-nrow", "0"], "--grid-nrow must be >= 1, got 0"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--model-kwargs", "[1]"], "--model-kwargs must be a JSON object, got list '[1]'"),
    (["--model-kwargs", "{dims"], "--model-kwargs is not valid JSON: Expecting property name"),
    (["--out-dir", "TMP/a_file"], "--out-dir 'TMP/a_file' is a file; expected a directory"),
    (["--out-dir", "TMP/a_file/samples"], "--out-dir 'TMP/a_file/samples': 'TMP/a_file' is a file"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_bad_flag_value_is_a_usage_error(ckpt, tmp_path, capsys, flags, message):
    """A value given (0 too) is the value used: out of range, it is one error line, exit 2, before
    anything is written (TMP: a folder that holds a_file)."""
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as e:
        run(ckpt, tmp_path / "out", "--num-samples", "2", *(f.replace("TMP", str(tmp_path)) for f in flags))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {message.replace('TMP', str(tmp_path))}"), err
    assert not (tmp_path / "out").exists()


def test_write_png_roundtrip(tmp_path):
    img = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    write_png(tmp_path / "x.png", img)
    assert np.array_equal(read_png(tmp_path / "x.png"), img)
    with pytest.raises(TypeError, match="uint8"):
        write_png(tmp_path / "y.png", img.astype(np.float32))
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        write_png(tmp_path / "y.png", img[..., :2])


# ---------------------------------------------------------------------------
# Sampling at scale: shards over ranks, resume, image folder
# ---------------------------------------------------------------------------

import os  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _npz(path):
    with np.load(path) as z:
        return {k: z[k] for k in z.keys()}


def test_image_folder_and_labels(ckpt, tmp_path):
    out = run(ckpt, tmp_path, "--num-samples", "5", "--batch-size", "2", "--seed", "3")
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [f"{i:06d}.png" for i in range(5)]
    for i in range(5):
        assert np.array_equal(read_png(tmp_path / f"images/{i:06d}.png"), out["images"][i])
    assert np.array_equal(np.load(tmp_path / "labels.npy"), out["labels"])
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == \
        ["000000.npz", "000001.npz", "000002.npz", "config.json"]
    assert out["made"] == 3 and out["resumed"] == 0
    # a chunk's samples depend on (seed, chunk) only: batch 1 makes other chunks, batch 2 twice as many
    again = run(ckpt, tmp_path / "b", "--num-samples", "5", "--batch-size", "2", "--seed", "3", "--no-image-folder")
    assert np.array_equal(again["images"], out["images"]) and not (tmp_path / "b/images").exists()
    # the same run again with the image folder: the PNGs of the chunks found done come from their shards,
    # and only the missing ones are written
    resumed = run(ckpt, tmp_path / "b", "--num-samples", "5", "--batch-size", "2", "--seed", "3")
    assert resumed["resumed"] == 3 and resumed["made"] == 0
    names = [f"{i:06d}.png" for i in range(5)]
    assert sorted(p.name for p in (tmp_path / "b/images").iterdir()) == names
    for i in range(5):
        assert np.array_equal(read_png(tmp_path / f"b/images/{i:06d}.png"), out["images"][i])
    (tmp_path / "b/images/000003.png").unlink()
    kept = (tmp_path / "b/images/000000.png").stat().st_mtime_ns
    run(ckpt, tmp_path / "b", "--num-samples", "5", "--batch-size", "2", "--seed", "3")
    assert sorted(p.name for p in (tmp_path / "b/images").iterdir()) == names
    assert np.array_equal(read_png(tmp_path / "b/images/000003.png"), out["images"][3])
    assert (tmp_path / "b/images/000000.png").stat().st_mtime_ns == kept


def test_interrupted_sampling_resumes_where_it_stopped(ckpt, tmp_path, monkeypatch):
    common = ("--num-samples", "7", "--batch-size", "2", "--cfg-scale", "1.5", "--seed", "5")
    whole = run(ckpt, tmp_path / "whole", *common)
    made = []
    real = sample.sample_chunk

    def interrupted_after_two(*a, **k):
        if len(made) == 2:
            raise KeyboardInterrupt
        made.append(a[5])
        return real(*a, **k)

    monkeypatch.setattr(sample, "sample_chunk", interrupted_after_two)
    with pytest.raises(KeyboardInterrupt):
        run(ckpt, tmp_path / "part", *common)
    monkeypatch.setattr(sample, "sample_chunk", real)
    assert made == [0, 1] and not (tmp_path / "part/samples.npz").exists()
    # a half-written shard (the interruption hit np.savez) is not taken for a finished one
    (tmp_path / "part/shards/000002.npz").write_bytes(b"PK\x03\x04 truncated")
    before = (tmp_path / "part/shards/000000.npz").stat().st_mtime_ns
    part = run(ckpt, tmp_path / "part", *common)
    assert part["resumed"] == 2 and part["made"] == 2
    assert (tmp_path / "part/shards/000000.npz").stat().st_mtime_ns == before
    assert np.array_equal(part["images"], whole["images"])
    assert np.array_equal(_npz(tmp_path / "part/samples.npz")["arr_0"], whole["images"])
    # other settings in the same folder: refused, unless --overwrite
    with pytest.raises(ValueError, match=r"shards: holds the shards of another sampling run \(differs in: "
                                         r"cfg_scale\)"):
        run(ckpt, tmp_path / "part", "--num-samples", "7", "--batch-size", "2", "--cfg-scale", "2", "--seed", "5")
    fresh = run(ckpt, tmp_path / "part", "--num-samples", "3", "--batch-size", "2", "--seed", "5", "--overwrite")
    assert fresh["made"] == 2 and fresh["resumed"] == 0
    assert len(list((tmp_path / "part/images").iterdir())) == 3


def test_torchrun_two_processes_shard_the_samples(ckpt, tmp_path):
    """2 gloo processes make the chunks 0, 2, 4 / 1, 3: the same .npz as one process."""
    common = ["--ckpt", ckpt, "--num-sampling-steps", "3", "--no-progress", "--num-samples", "9",
              "--batch-size", "2", "--cfg-scale", "1.5", "--device", "cpu"]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "edt.sample", *common, "--out-dir", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = sample.main([*common, "--out-dir", str(tmp_path / "one")])
    arr = _npz(tmp_path / "ddp/samples.npz")
    assert list(arr) == ["arr_0"] and arr["arr_0"].shape == (9, 8, 8, 3) and arr["arr_0"].dtype == np.uint8
    assert np.array_equal(arr["arr_0"], single["images"])
    assert np.array_equal(np.load(tmp_path / "ddp/labels.npy"), single["labels"])
    assert len(list((tmp_path / "ddp/images").iterdir())) == 9
    assert proc.stdout.count("wrote ") == 1  # rank 0 assembles


# ---------------------------------------------------------------------------
# Bad checkpoints on the command line: one error line, exit 2
# ---------------------------------------------------------------------------

def _bad_ckpt(tmp_path, ckpt, kind):
    path = tmp_path / f"{kind}.pt"
    if kind == "missing":
        return path, "no such file"
    if kind == "directory":
        path.mkdir()
        return path, "is a directory"
    if kind == "truncated":
        data = Path(ckpt).read_bytes()
        path.write_bytes(data[:len(data) // 2])
        return path, "not a readable PyTorch file"
    if kind == "not_a_checkpoint":
        path.write_text("model: EDT-S/2\n")
        return path, "not a readable PyTorch file"
    if kind == "a_list":
        torch.save([torch.zeros(2)], path)
        return path, "holds a list"
    if kind == "other_model":  # the checkpoint of the tiny EDT, asked for a wider one
        return Path(ckpt), "does not fit"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing", "directory", "truncated", "not_a_checkpoint", "a_list",
                                  "other_model"])
def test_bad_checkpoint_is_one_error_line(ckpt, tmp_path, capsys, kind):
    path, what = _bad_ckpt(tmp_path, ckpt, kind)
    other = ["--model-kwargs", json.dumps(dict(EDT_TINY, dims=[32, 64, 64, 64, 32]))] if kind == "other_model" else []
    code = sample.console_main(["--ckpt", str(path), "--out-dir", str(tmp_path / "out"), "--num-sampling-steps",
                                "2", "--no-progress", *other])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {path}") and what in err[0], err[0]
    if kind != "other_model":
        assert "expected an edt.train checkpoint or a model state dict" in err[0]
    assert not (tmp_path / "out").exists()


def test_command_line_exit_code(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "edt.sample", "--ckpt", str(tmp_path / "nope.pt")], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == \
        [f"error: {tmp_path / 'nope.pt'}: no such file; expected an edt.train checkpoint or a model state dict (.pt)"]


def test_help_states_true_defaults(capsys):
    with pytest.raises(SystemExit):
        sample.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in help_text and "(default: False)" not in help_text
    assert "--no-amm AMM off (default: the model's own setting, which for EDT is on)" in help_text
    assert "--num-sampling-steps NUM_SAMPLING_STEPS respaced DDPM (or DDIM) steps (default: 250)" in help_text
