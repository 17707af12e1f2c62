"""Kill it anywhere, run the same command again: real processes, SIGKILL at random moments.

edt.train with ``--resume auto`` ends bit-equal to an uninterrupted run (model, EMA, optimiser,
timestep sampler, RNG states) and leaves no unloadable checkpoint; edt.sample and
edt.extract_features end with the same samples / latents; a rank of a distributed run that dies
stops the other with a clear error. A few kills here (CI's budget); ``run_train_kills(steps=100, kills=10)`` is the
long version (see its docstring).
"""
import json
import shutil
from pathlib import Path

import numpy as np
import torch

from edt import train
from edt.utils import TMP_SUFFIX
from helpers.kill_runs import Child, child_env, python_module, run_killed, time_run

EDT_TINY = {"dims": [32, 48, 64, 48, 32], "num_heads": [2, 2, 2, 2, 2], "hidden_size": 32, "backend": "eager"}
READY = "mask strategy"  # edt.train's set-up line: what follows is the steps


def _train_cmd(results: Path, steps: int, ckpt_every: int):
    # the edt recipe: Adan, loss-second-moment timesteps (their states are checkpointed), EMA
    return python_module("edt.train", "--model", "EDT-S/2", "--model-kwargs", json.dumps(EDT_TINY),
                         "--image-size", "64", "--num-classes", "4", "--global-batch-size", "8",
                         "--max-steps", str(steps), "--synthetic", "--synthetic-size", "40",
                         "--ckpt-every", str(ckpt_every), "--log-every", "5", "--threads", "1",
                         "--no-progress", "--results-dir", str(results), "--resume", "auto")


def _assert_equal(a, b, where: str) -> None:
    """Bit-equal, through dicts, lists and tuples (tensors by ``torch.equal``, the rest by ``==``)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys differ"
        for k in a:
            _assert_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _assert_same_state(a: dict, b: dict) -> None:
    """Everything a run carries on with: weights, EMA, optimiser, sampler, every rank's RNG states."""
    for key in ("step", "model", "ema", "opt", "schedule_sampler", "rng", "world_size"):
        _assert_equal(a[key], b[key], key)


def run_train_kills(tmp: Path, *, steps: int, kills: int, ckpt_every: int, seed: int):
    """An uninterrupted run, then the same command SIGKILLed ``kills`` times at random moments and
    run again each time; the final checkpoints are compared bit for bit and every checkpoint left
    must load. Returns the kill log. The long version, by hand:
    ``cd tests && PYTHONPATH=.. python -c "from pathlib import Path; import tempfile, test_kill_resume as t;
    print(t.run_train_kills(Path(tempfile.mkdtemp()), steps=100, kills=10, ckpt_every=5, seed=1))"``"""
    env = child_env(tmp / "build")
    timing = time_run(_train_cmd(tmp / "whole", steps, ckpt_every), env, READY)
    killed = tmp / "killed"

    def remaining():
        done = train.latest_checkpoint(killed)
        return 1.0 - (int(Path(done).stem) / steps if done else 0.0)

    log = run_killed(_train_cmd(killed, steps, ckpt_every), env, kills=kills, timing=timing, ready=READY,
                     seed=seed, remaining=remaining, reset=lambda: shutil.rmtree(killed, ignore_errors=True))
    final = f"{steps:07d}.pt"
    _assert_same_state(train.read_checkpoint(str(tmp / "whole/checkpoints" / final)),
                       train.read_checkpoint(str(killed / "checkpoints" / final)))
    for path in sorted((killed / "checkpoints").iterdir()):
        assert not path.name.endswith(TMP_SUFFIX), f"left behind: {path}"
        assert train.read_checkpoint(str(path))["step"] == int(path.stem)  # every one loads
    return log


def test_training_killed_at_random_moments_ends_bit_equal(tmp_path):
    log = run_train_kills(tmp_path, steps=8, kills=3, ckpt_every=2, seed=0)
    assert len(log.kills) == 3


def test_resume_auto_without_a_checkpoint_starts_afresh(tmp_path, capsys):
    cmd = _train_cmd(tmp_path, 1, 1)[3:]  # the arguments
    out = train.main(cmd)
    assert "no checkpoint in" in capsys.readouterr().out and out["step"] == 1
    out = train.main([*cmd[:cmd.index("--max-steps") + 1], "2", *cmd[cmd.index("--max-steps") + 2:]])
    assert f"continuing from {tmp_path / 'checkpoints' / '0000001.pt'}" in capsys.readouterr().out
    assert out["step"] == 2


def test_sampling_killed_at_random_moments_ends_with_the_same_samples(tmp_path):
    def cmd(out: Path):
        return python_module("edt.sample", "--model", "EDT-S/2", "--model-kwargs", json.dumps(EDT_TINY),
                             "--image-size", "64", "--num-classes", "4", "--num-samples", "12",
                             "--batch-size", "2", "--num-sampling-steps", "4", "--device", "cpu",
                             "--no-progress", "--out-dir", str(out))

    env = child_env(tmp_path / "build")
    timing = time_run(cmd(tmp_path / "whole"), env, ready=None)
    run_killed(cmd(tmp_path / "killed"), env, kills=2, timing=timing, ready=None, seed=0)
    for name in ("samples.npz", "labels.npy"):
        a, b = np.load(tmp_path / "whole" / name), np.load(tmp_path / "killed" / name)
        if name.endswith(".npz"):
            a, b = a["arr_0"], b["arr_0"]
        assert np.array_equal(a, b), name
    assert sorted(p.name for p in (tmp_path / "killed/shards").iterdir()) == \
        sorted(p.name for p in (tmp_path / "whole/shards").iterdir())


def test_a_rank_that_dies_stops_the_others_with_a_clear_error(tmp_path):
    """Two gloo processes (torchrun's environment set by hand, so that nothing but edt.train
    reacts): rank 1 SIGKILLed mid-run; rank 0 exits 1 within seconds with one error line."""
    import signal
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(child_env(tmp_path / "build"), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2",
               EDT_DIST_TIMEOUT_S="60")
    cmd = _train_cmd(tmp_path / "run", 100000, 1000)
    cmd[cmd.index("--log-every") + 1] = "1"
    ranks = [Child(cmd, dict(env, RANK=str(r), LOCAL_RANK=str(r)), ready="(step=0000001)") for r in (0, 1)]
    try:
        assert ranks[0].ready_event.wait(300) and ranks[0].proc.poll() is None, ranks[0].stderr[-3000:]
        ranks[1].proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        rc = ranks[0].wait(120)
        took = time.monotonic() - killed
    finally:
        for r in ranks:
            if r.proc.poll() is None:
                r.proc.kill()
                r.proc.wait()
    err = ranks[0].stderr.strip().splitlines()
    assert rc == 1 and err and err[-1].startswith("error: rank 0: another process of this distributed job died"), \
        ranks[0].stderr[-3000:]
    assert "--resume auto" in err[-1]
    assert took < 30, took  # gloo notices the closed connection at the next collective


def test_feature_extraction_killed_at_random_moments_ends_with_the_same_latents(tmp_path):
    from test_extract_features import SIZE, cli, make_image_folder, make_tiny_vae, read_all

    data, vae = make_image_folder(tmp_path / "images"), make_tiny_vae(tmp_path / "vae")

    def cmd(out: Path):
        return python_module("edt.extract_features", *cli(data, vae, out, "--batch-size", "1"))

    env = child_env(tmp_path / "build")
    timing = time_run(cmd(tmp_path / "whole"), env, ready=None)
    run_killed(cmd(tmp_path / "killed"), env, kills=2, timing=timing, ready=None, seed=0)
    (fa, la), (fb, lb) = read_all(tmp_path / "whole", 6), read_all(tmp_path / "killed", 6)
    for a, b in zip(fa + la, fb + lb):
        assert np.array_equal(a, b)
    for sub in ("features", "labels"):
        names = sorted(p.name for p in (tmp_path / f"killed/imagenet{SIZE}_{sub}").iterdir())
        assert names == sorted(f"{i}.npy" for i in range(6)), names  # a temporary file is never left as one
