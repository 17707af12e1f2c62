"""``python -m edt.train`` on tiny models: convergence, bit-exact resume, DDP, data checks."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edt import train
from edt.data import LatentFolder, SyntheticLatents, write_latent_folder
from edt.train import ShardedSampler

REPO = Path(__file__).resolve().parents[1]
# Published EDT-S/2 stage layout (depths 2,2,2,3,3; AMM blocks 7, 10) at tiny widths.
# backend="eager": the plain-PyTorch path of the models (on a CPU test box the token/adaLN
# kernels run through the Triton interpreter, far too slow for hundreds of steps; kernels ==
# eager is the models' own test).
EDT_TINY = {"dims": [32, 48, 64, 48, 32], "num_heads": [2, 2, 2, 2, 2], "hidden_size": 32, "backend": "eager"}
MDT_TINY = {"hidden_size": 32, "depth": 4, "num_heads": 2, "decode_layer": 2, "backend": "eager"}
IMAGE = 64  # latent 8x8, token grids 4, 2, 1
LATENT = (4, 8, 8)


pytestmark = pytest.mark.usefixtures("one_thread")


def cli(tmp, *extra, model="EDT-S/2", kwargs=EDT_TINY, steps=4, batch=8, classes=4):
    return ["--model", model, "--model-kwargs", json.dumps(kwargs), "--image-size", str(IMAGE),
            "--num-classes", str(classes), "--global-batch-size", str(batch), "--max-steps", str(steps),
            "--results-dir", str(tmp), "--no-progress", "--lr", "1e-3", *extra]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_masked_training_loss_decreases_on_builtin_data(tmp_path):
    out = train.main(cli(tmp_path, "--synthetic", "--synthetic-size", "256", "--log-every", "25",
                         steps=300, batch=16))
    hist = out["history"]
    assert [h["step"] for h in hist] == list(range(25, 301, 25))
    first, last = hist[0], hist[-1]
    # both passes of EDT's strategy are trained; their sum falls well below its start
    assert first["loss_masked"] > 0 and last["loss_masked"] > 0
    assert last["loss"] < 0.4 * first["loss"], hist
    assert all(h["images_per_s"] > 0 for h in hist)
    log = (tmp_path / "log.txt").read_text()
    assert "mask strategy edt" in log and "images/s" in log
    assert out["checkpoint"].endswith("0000300.pt") and Path(out["checkpoint"]).is_file()


@pytest.mark.parametrize("strategy", ["edt", "mdt", "shared-noise", "none"])
def test_strategy_noising_and_passes(strategy):
    """shared-noise: the masked pass sees the SAME x_t as the full pass; edt and mdt: same t,
    fresh noise (both authors' scripts call training_losses twice, each drawing its noise)."""
    from edt.diffusion import create_diffusion

    calls = []

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def draw_ahead(self, batch, enable_mask, generator, device):
            return ("drawn", batch, enable_mask, generator)

        def forward(self, x, t, y, enable_mask=False, draws=None):
            calls.append((x.clone(), t.clone(), enable_mask, draws))
            return torch.cat([x * self.w, torch.zeros_like(x)], 1)

    loss_module = train.DiffusionTrainingLoss(Recorder(), create_diffusion(""), strategy)
    x, y = torch.randn(3, *LATENT), torch.zeros(3, dtype=torch.long)
    t, n1, n2 = torch.tensor([5, 500, 900]), torch.randn(3, *LATENT), torch.randn(3, *LATENT)
    g = torch.Generator()
    losses = loss_module(x, y, t, n1, n2, loss_module.draw_ahead(3, g, "cpu"))
    assert [c[2] for c in calls] == ([False] if strategy == "none" else [False, True])
    assert all(c[3] == ("drawn", 3, c[2], g) for c in calls)  # each pass its own draws
    if strategy != "none":
        assert torch.equal(calls[0][1], calls[1][1])
        assert torch.equal(calls[0][0], calls[1][0]) == (strategy == "shared-noise")
        assert losses[0].item() == pytest.approx(losses[1].item() + losses[2].item(), rel=1e-6)
    else:
        assert losses[2].item() == 0


def test_mdt_strategy_runs_full_and_masked_pass(tmp_path):
    out = train.main(cli(tmp_path, "--synthetic", "--synthetic-size", "32", "--log-every", "1",
                         model="MDTv2-S/2", kwargs=MDT_TINY, steps=2))
    assert "mask strategy mdt" in (tmp_path / "log.txt").read_text()
    h = out["history"][-1]
    assert h["loss_masked"] > 0 and h["loss"] == pytest.approx(h["loss_full"] + h["loss_masked"], rel=1e-6)


def test_linear_lr_schedule(tmp_path):
    out = train.main(cli(tmp_path, "--synthetic", "--synthetic-size", "16", "--lr-schedule", "linear",
                         "--lr-decay-steps", "4", "--min-lr", "0", model="MDTv2-S/2", kwargs=MDT_TINY, steps=3))
    # the step with index k (0-based) runs at lr * (1 - k/4): the third at lr / 2
    assert load(out["checkpoint"])["opt"]["param_groups"][0]["lr"] == pytest.approx(1e-3 / 2)


def test_resume_is_bit_exact(tmp_path):
    # 40 samples / batch 8 = 5 steps per epoch: the resumed half crosses an epoch boundary
    common = ("--synthetic", "--synthetic-size", "40", "--ckpt-every", "3", "--log-every", "1")
    whole = train.main(cli(tmp_path / "a", *common, steps=7))
    part = train.main(cli(tmp_path / "b", *common, "--resume", str(tmp_path / "a/checkpoints/0000003.pt"),
                          steps=7))
    a, b = load(whole["checkpoint"]), load(part["checkpoint"])
    assert a["step"] == b["step"] == 7
    for key in ("model", "ema"):
        for name, v in a[key].items():
            assert torch.equal(v, b[key][name]), f"{key}.{name} differs after resume"
    for i, st in a["opt"]["state"].items():
        for name, v in st.items():
            assert torch.equal(v, b["opt"]["state"][i][name]), f"optimizer state {i}.{name} differs"
    assert [h["loss"] for h in whole["history"][3:]] == [h["loss"] for h in part["history"]]
    # the EMA really is an average: it moved, but not as far as the model
    assert not torch.equal(a["ema"]["final_layer.linear.weight"], a["model"]["final_layer.linear.weight"])


def test_interrupted_run_checkpoints_and_resumes_exactly(tmp_path):
    """SIGINT mid-run: the step in flight finishes, a checkpoint is written, exit 130;
    resuming from it gives the uninterrupted run's weights bit for bit."""
    common = ("--synthetic", "--synthetic-size", "40", "--log-every", "1", "--ckpt-every", "1000")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "edt.train", *cli(tmp_path / "a", *common, steps=100000)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("(step=0000003)"):
                proc.send_signal(signal.SIGINT)
                break
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-3000:]
    m = re.search(r"interrupted \(signal \d+\) after step (\d+); continue with --resume (\S+)", out)
    assert m, out
    k, path = int(m.group(1)), m.group(2)
    assert k >= 3 and path.endswith(f"{k:07d}.pt")
    resumed = train.main(cli(tmp_path / "b", *common, "--resume", path, steps=k + 2))
    whole = train.main(cli(tmp_path / "c", *common, steps=k + 2))
    a, b = load(resumed["checkpoint"]), load(whole["checkpoint"])
    for key in ("model", "ema"):
        for name, v in a[key].items():
            assert torch.equal(v, b[key][name]), f"{key}.{name} differs"


def test_resume_with_other_model_names_keys(tmp_path):
    train.main(cli(tmp_path / "a", "--synthetic", "--synthetic-size", "16", steps=1))
    wider = dict(EDT_TINY, dims=[32, 64, 64, 64, 32])
    with pytest.raises(ValueError, match=r"\(model\) does not fit \w+: shape mismatches: "
                       r"blocks\.2\.attn\.qkv\.weight: checkpoint \[144, 48\] vs model \[192, 64\]"):
        train.main(cli(tmp_path / "b", "--synthetic", "--synthetic-size", "16", "--resume",
                       str(tmp_path / "a/checkpoints/0000001.pt"), kwargs=wider, steps=2))


def test_grad_checkpoint_gives_the_same_weights(tmp_path):
    """--grad-checkpoint all / selective: the weights of the run without it, bit for bit
    (masked passes on, so the same random masks must be drawn)."""
    common = ("--synthetic", "--synthetic-size", "16")
    runs = {c: train.main(cli(tmp_path / c, *common, "--grad-checkpoint", c, steps=2))
            for c in ("none", "all", "selective")}
    ref = load(runs["none"]["checkpoint"])["model"]
    for c in ("all", "selective"):
        got = load(runs[c]["checkpoint"])["model"]
        for name, v in ref.items():
            assert torch.equal(got[name], v), f"--grad-checkpoint {c}: {name} differs"


@pytest.mark.parametrize("flags, message", [
    (["--grad-checkpoint", "most"], "--grad-checkpoint: checkpoint must be"),
    (["--ema-decay", "5"], "--ema-decay must be in [0, 1], got 5"),
    (["--ema-decay", "-0.5"], "--ema-decay must be in [0, 1], got -0.5"),
    (["--max-steps", "-3"], "--max-steps must be >= 1, got -3"),
    (["--max-steps", "0"], "--max-steps must be >= 1, got 0"),
    (["--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["--epochs", "-1"], "--epochs must be >= 1, got -1"),
    (["--lr", "-1"], "--lr must be > 0, got -1"),  # Adan, the recipe's optimiser
    (["--lr", "0", "--optimizer", "adamw"], "--lr must be > 0, got 0"),
    (["--min-lr", "-0.0001", "--lr-schedule", "linear"], "--min-lr must be >= 0, got -0.0001"),
    (["--grad-clip", "-1"], "--grad-clip must be >= 0, got -1"),
    (["--weight-decay", "-0.1", "--optimizer", "adamw"], "--weight-decay must be >= 0, got -0.1"),
    (["--image-size", "0"], "--image-size must be a positive multiple of 8, got 0"),
    (["--results-dir", "TMP/a_file"], "--results-dir 'TMP/a_file' is a file; expected a directory"),
    (["--results-dir", "TMP/a_file/run"], "--results-dir 'TMP/a_file/run': 'TMP/a_file' is a file"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_bad_flag_value_is_a_usage_error(tmp_path, capsys, flags, message):
    """One error line, exit 2, before anything is written (TMP: a folder that holds a_file)."""
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as e:
        train.main(cli(tmp_path, "--synthetic", *(f.replace("TMP", str(tmp_path)) for f in flags)))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {message.replace('TMP', str(tmp_path))}"), err
    assert not (tmp_path / "checkpoints").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_restart_with_resume_auto_continues_bit_exactly(tmp_path):
    """2 gloo processes: a job stopped at step 2 and started again with the same command line plus
    ``--resume auto`` (rank 0 finds the newest checkpoint, every rank loads it) ends where the
    uninterrupted 4-step job ends, bit for bit."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    common = ("--synthetic", "--synthetic-size", "32", "--ckpt-every", "2", "--resume", "auto")

    def torchrun(out, steps):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               "-m", "edt.train", *cli(out, *common, steps=steps)]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout + proc.stderr

    torchrun(tmp_path / "whole", 4)
    first = torchrun(tmp_path / "restarted", 2)  # the job that was stopped after its step-2 checkpoint
    assert "starting afresh" in first
    again = torchrun(tmp_path / "restarted", 4)  # the same command started again
    assert f"continuing from {tmp_path / 'restarted/checkpoints/0000002.pt'}" in again, again[-2000:]
    a, b = load(tmp_path / "whole/checkpoints/0000004.pt"), load(tmp_path / "restarted/checkpoints/0000004.pt")
    for key in ("model", "ema"):
        for name, v in a[key].items():
            assert torch.equal(b[key][name], v), f"{key}.{name} differs after the restart"
    for i, st in a["opt"]["state"].items():
        for k, v in st.items():
            assert torch.equal(b["opt"]["state"][i][k], v), f"optimiser state {i}.{k} differs"


@pytest.mark.parametrize("grad_checkpoint", ["none", "all"])
def test_ddp_two_process_step_equals_single_process(tmp_path, grad_checkpoint):
    """2 gloo processes x 4 samples == 1 process x 8 samples (masking and label dropout off:
    their draws depend on the per-rank batch shape); also with every block checkpointed."""
    kwargs = dict(EDT_TINY, class_dropout_prob=0.0)
    common = ("--synthetic", "--synthetic-size", "32", "--log-every", "1", "--mask-strategy", "none",
              "--grad-checkpoint", grad_checkpoint)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "edt.train", *cli(tmp_path / "ddp", *common, kwargs=kwargs, steps=2)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world size 2" in (tmp_path / "ddp/log.txt").read_text()
    single = train.main(cli(tmp_path / "one", *common, kwargs=kwargs, steps=2))
    d, s = load(tmp_path / "ddp/checkpoints/0000002.pt"), load(single["checkpoint"])
    assert d["world_size"] == 2 and s["world_size"] == 1
    # gradients (AdamW's moments hold them) agree to float32 summation order ...
    for i, st in s["opt"]["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(d["opt"]["state"][i][key], st[key], rtol=1e-4, atol=1e-9)
    # ... and the weights to 1% of one AdamW step (lr 1e-3; Adam's g/sqrt(v) amplifies
    # rounding where a gradient is tiny)
    for name, v in s["model"].items():
        torch.testing.assert_close(d["model"][name], v, rtol=0, atol=1e-5, msg=lambda m: f"{name}: {m}")
    assert any(not torch.equal(v, s["ema"][n]) for n, v in s["model"].items())  # the step moved the weights
    ddp_log = (tmp_path / "ddp/log.txt").read_text()
    losses = [line for line in ddp_log.splitlines() if line.startswith("(step=0000002)")]
    assert losses and f"loss {single['history'][-1]['loss']:.4f}" in losses[0]


_AOT_EAGER_TRAIN = """
import sys
import torch
real = torch.compile
def aot_eager(fn, **kw):  # Inductor takes minutes per graph on this CPU; the tracing is the same
    kw.pop("mode", None)
    return real(fn, backend="aot_eager", **kw)
torch.compile = aot_eager
from edt.train import console_main
sys.exit(console_main(sys.argv[1:]))
"""


def test_ddp_with_compile_runs_the_compiled_step_inside_ddp(tmp_path):
    """2 gloo processes with ``--compile default``: DDP wraps the compiled loss module, whose step
    is one graph (``fullgraph=True``); compiling DDP itself fails at the first step (Dynamo cannot
    trace DDP's own forward whole). The checkpoint equals the eager DDP run's (torch.compile with
    the aot_eager backend here: the same tracing and autograd, no code generation)."""
    script = tmp_path / "train_aot_eager.py"
    script.write_text(_AOT_EAGER_TRAIN)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    common = ("--synthetic", "--synthetic-size", "32", "--log-every", "1")
    ckpts = {}
    for name, extra in (("compiled", ("--compile", "default")), ("eager", ())):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               str(script), *cli(tmp_path / name, *common, *extra, steps=2)]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        ckpts[name] = load(tmp_path / name / "checkpoints/0000002.pt")
    for key in ("model", "ema"):
        for n, v in ckpts["eager"][key].items():
            torch.testing.assert_close(ckpts["compiled"][key][n], v, rtol=0, atol=1e-5, msg=lambda m: f"{n}: {m}")


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------

def _latents(n, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, *LATENT)).astype(np.float32), rng.integers(0, classes, n)


@pytest.mark.parametrize("layout", ["fastdit", "flat"])
def test_latent_folder_trains(tmp_path, layout):
    x, y = _latents(16)
    write_latent_folder(tmp_path / "data", x, y, layout=layout)
    ds = LatentFolder(tmp_path / "data", LATENT, 4)
    assert ds.layout == layout and len(ds) == 16 and ds.validate() == []
    xi, yi = ds[5]
    assert torch.equal(xi, torch.from_numpy(x[5])) and yi.item() == y[5]
    out = train.main(cli(tmp_path / "run", "--data-path", str(tmp_path / "data"), steps=2))
    assert out["step"] == 2


def _bad_folder(tmp_path, kind):
    x, y = _latents(12)
    layout = "flat" if kind.startswith("flat") else "fastdit"
    root = tmp_path / "data"
    write_latent_folder(root, x, y, layout=layout)
    if kind == "shape":
        bad = root / "imagenet256_features/7.npy"
        np.save(bad, np.zeros((1, 4, 16, 16), np.float32))
        return bad, r"latent has shape \[1, 4, 16, 16\], expected \[4, 8, 8\]"
    if kind == "label":
        bad = root / "imagenet256_labels/3.npy"
        np.save(bad, np.array([4]))
        return bad, r"label 4 out of range \[0, 4\)"
    if kind == "unpaired":
        os.remove(root / "imagenet256_labels/9.npy")
        return root / "imagenet256_features/9.npy", "no matching label file"
    if kind == "flat_label":
        y[6] = -1
        np.save(root / "labels.npy", y)
        return root / "labels.npy", r"label -1 out of range \[0, 4\) at index 6"
    if kind == "flat_count":
        np.save(root / "labels.npy", y[:-1])
        return root / "labels.npy", r"labels must have shape \[12\]"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["shape", "label", "unpaired", "flat_label", "flat_count"])
def test_bad_latent_folder_fails_before_training(tmp_path, kind):
    bad, msg = _bad_folder(tmp_path, kind)
    with pytest.raises(ValueError, match=msg) as err:
        train.main(cli(tmp_path / "run", "--data-path", str(tmp_path / "data"), steps=1))
    assert str(bad) in str(err.value)
    assert not (tmp_path / "run/checkpoints").exists()


def test_missing_or_empty_data_path(tmp_path):
    with pytest.raises(ValueError, match="is not a directory"):
        train.main(cli(tmp_path / "run", "--data-path", str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither"):
        train.main(cli(tmp_path / "run", "--data-path", str(tmp_path / "empty")))


@pytest.mark.parametrize("model, kwargs, message", [
    ("EDT-M/2", EDT_TINY, r"unknown model 'EDT-M/2'.*EDT-S/2.*MDTv2-XL/2"),
    ("EDT-S/2", dict(EDT_TINY, bogus=1), r"model 'EDT-S/2' cannot be built with the constructor arguments "
                                         r"backend, bogus, dims, .*unexpected keyword argument 'bogus'"),
    ("MDTv2-S/2", EDT_TINY, r"model 'MDTv2-S/2' cannot be built .*unexpected keyword argument 'dims'.*; "
                            r"expected --model-kwargs that this model takes$"),
], ids=["unknown", "bogus-kwarg", "kwargs-of-another-model"])
def test_model_that_cannot_be_built_is_one_error_line(tmp_path, capsys, model, kwargs, message):
    code = train.console_main(cli(tmp_path / "run", "--synthetic", model=model, kwargs=kwargs))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and re.match(f"error: {message}", err[0]), err
    assert not (tmp_path / "run").exists()


def test_dataset_smaller_than_a_batch(tmp_path):
    with pytest.raises(ValueError, match="smaller than one global batch"):
        train.main(cli(tmp_path, "--synthetic", "--synthetic-size", "4", batch=8))


def test_synthetic_latents_are_deterministic_and_class_dependent():
    ds = SyntheticLatents(64, LATENT, num_classes=4, seed=3)
    x1, y1 = ds[9]
    x2, y2 = SyntheticLatents(64, LATENT, num_classes=4, seed=3)[9]
    assert torch.equal(x1, x2) and y1.item() == y2.item() == 1
    assert x1.shape == LATENT and x1.dtype == torch.float32 and x1.abs().max() < 1.5
    means = ds.class_means()
    # a sample is nearer to its own class's mean than to any other
    for i in range(16):
        x, y = ds[i]
        d = ((means - x) ** 2).flatten(1).sum(1)
        assert d.argmin().item() == y.item()


def test_sharded_sampler_deals_global_batches_like_one_process():
    one = list(ShardedSampler(20, 1, 0, seed=1))
    r0, r1 = list(ShardedSampler(20, 2, 0, seed=1)), list(ShardedSampler(20, 2, 1, seed=1))
    assert sorted(one) == list(range(20))
    local = 3  # global batch 6: the sample at position k goes to rank k % 2
    for b in range(3):
        merged = [v for pair in zip(r0[b * local:(b + 1) * local], r1[b * local:(b + 1) * local]) for v in pair]
        assert merged == one[b * 6:(b + 1) * 6]
    s = ShardedSampler(20, 2, 1, seed=1)
    s.set_epoch(0, start=4)
    assert list(s) == r1[4:] and len(s) == 6
    s.set_epoch(1)
    assert list(s) != r1


# ---------------------------------------------------------------------------
# Published recipes, Adan, the loss-second-moment sampler
# ---------------------------------------------------------------------------

def base(tmp, *extra, steps=2, batch=8):
    """Like ``cli`` without the explicit --lr: the recipe's values apply."""
    return ["--model", "EDT-S/2", "--model-kwargs", json.dumps(EDT_TINY), "--image-size", str(IMAGE),
            "--num-classes", "4", "--global-batch-size", str(batch), "--max-steps", str(steps),
            "--results-dir", str(tmp), "--no-progress", "--synthetic", "--synthetic-size", "32", *extra]


def test_recipe_values_and_explicit_flags_override():
    a = train.parse_args(["--model", "EDT-S/2"])
    assert (a.recipe, a.optimizer, a.lr, a.lr_schedule, a.min_lr, a.lr_decay_steps, a.weight_decay, a.grad_clip,
            a.schedule_sampler, a.ema_decay) == ("edt", "adan", 1e-3, "linear", 5e-5, 400_000, 0.0, 0.0,
                                                 "loss-second-moment", 0.9999)
    assert train.parse_args(["--model", "EDT-B/2"]).lr == 1e-3
    assert train.parse_args(["--model", "EDT-XL/2"]).lr == 5e-4
    m = train.parse_args(["--model", "MDTv2-S/2"])
    assert (m.recipe, m.optimizer, m.lr, m.lr_schedule, m.grad_clip, m.schedule_sampler, m.weight_decay) == \
        ("mdt", "adan", 5e-4, "constant", 1.0, "uniform", 0.0)
    o = train.parse_args(["--model", "EDT-XL/2", "--recipe", "mdt", "--optimizer", "adamw", "--lr", "2e-4",
                          "--grad-clip", "0"])
    assert (o.recipe, o.optimizer, o.lr, o.grad_clip, o.schedule_sampler) == ("mdt", "adamw", 2e-4, 0.0, "uniform")


def test_recipe_edt_runs_two_steps(tmp_path, capsys):
    out = train.main(base(tmp_path, "--recipe", "edt", "--log-every", "1"))
    ck = load(out["checkpoint"])
    assert ck["optimizer"] == "adan" and ck["step"] == 2
    group = ck["opt"]["param_groups"][0]
    assert group["betas"] == (0.98, 0.92, 0.99) and group["weight_decay"] == 0.0
    # the second step (index 1) ran at 1e-3 - (1e-3 - 5e-5) * 1 / 400000
    assert group["lr"] == pytest.approx(1e-3 - (1e-3 - 5e-5) / 400_000, rel=1e-12)
    assert set(next(iter(ck["opt"]["state"].values()))) >= {"exp_avg", "exp_avg_sq", "exp_avg_diff"}
    s = ck["schedule_sampler"]
    assert s["name"] == "loss-second-moment" and int(s["state"]["loss_counts"].sum()) == 2 * 8
    assert ck["args"]["ema_decay"] == 0.9999 and ck["args"]["grad_clip"] == 0.0
    assert "recipe edt (adan lr 0.001 -> 5e-05 over 400000 steps, loss-second-moment timesteps" in \
        (tmp_path / "log.txt").read_text()
    h = out["history"]
    assert [r["step"] for r in h] == [1, 2] and all(r["loss_masked"] > 0 for r in h)


class _ConstantDiffusion:
    """training_losses returns fixed per-sample losses (full pass / masked pass)."""
    num_timesteps = 4

    def __init__(self, full, masked):
        self.full, self.masked = full, masked

    def training_losses(self, model, x, t, model_kwargs=None, noise=None, backend=None):
        base_loss = self.masked if model_kwargs.get("enable_mask") else self.full
        return {"loss": base_loss * model(x, t, **{k: v for k, v in model_kwargs.items() if k != "generator"})}


def test_importance_weights_and_the_sum_fed_to_the_sampler():
    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, x, t, y, enable_mask=False):
            return self.w.expand(x.shape[0])

    full, masked = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 0.25, 4.0])
    w = torch.tensor([2.0, 1.0, 0.5])
    module = train.DiffusionTrainingLoss(One(), _ConstantDiffusion(full, masked), "edt")
    x, t = torch.zeros(3, 1), torch.tensor([0, 1, 2])
    losses, per_sample = module(x, torch.zeros(3, dtype=torch.long), t, torch.zeros(3, 1), torch.zeros(3, 1),
                                weights=w, per_sample=True)
    assert losses[1].item() == pytest.approx((w * full).mean().item())
    assert losses[2].item() == pytest.approx((w * masked).mean().item())
    assert torch.equal(per_sample, full + masked) and not per_sample.requires_grad


def test_loss_second_moment_sampler_resumes_exactly(tmp_path):
    """25 diffusion steps: the sampler's history (10 per t) fills within the first 40 steps of 16
    samples, so the resumed half draws t from non-uniform weights; the run and its resumed copy
    agree bit for bit."""
    common = ("--diffusion-steps", "25", "--ckpt-every", "40", "--log-every", "1")
    whole = train.main(base(tmp_path / "a", *common, steps=44, batch=16))
    part = train.main(base(tmp_path / "b", *common, "--resume", str(tmp_path / "a/checkpoints/0000040.pt"),
                           steps=44, batch=16))
    mid = load(tmp_path / "a/checkpoints/0000040.pt")["schedule_sampler"]["state"]
    assert (mid["loss_counts"] == 10).all()  # warmed up: the weights are no longer uniform
    a, b = load(whole["checkpoint"]), load(part["checkpoint"])
    for name, v in a["schedule_sampler"]["state"].items():
        assert (torch.equal(v, b["schedule_sampler"]["state"][name]) if isinstance(v, torch.Tensor)
                else v == b["schedule_sampler"]["state"][name]), name
    for key in ("model", "ema"):
        for name, v in a[key].items():
            assert torch.equal(v, b[key][name]), f"{key}.{name} differs after resume"
    assert [h["loss"] for h in whole["history"][40:]] == [h["loss"] for h in part["history"]]


def test_resume_with_another_optimizer_or_sampler_is_refused(tmp_path):
    train.main(base(tmp_path / "a", steps=1))
    ck = str(tmp_path / "a/checkpoints/0000001.pt")
    with pytest.raises(ValueError, match=r"checkpoint of an adan run; expected adamw \(pass --optimizer adan"):
        train.main(base(tmp_path / "b", "--resume", ck, "--optimizer", "adamw"))
    with pytest.raises(ValueError, match=r"loss-second-moment timestep sampler; expected uniform"):
        train.main(base(tmp_path / "b", "--resume", ck, "--schedule-sampler", "uniform"))
    assert not (tmp_path / "b").exists()


# ---------------------------------------------------------------------------
# Bad input on the command line, non-finite data and losses
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["missing", "directory", "truncated", "not_a_checkpoint", "state_dict",
                                  "other_model"])
def test_bad_resume_checkpoint_is_one_error_line(tmp_path, capsys, kind):
    path = tmp_path / f"{kind}.pt"
    extra = []
    if kind in ("truncated", "state_dict", "other_model"):
        good = train.main(base(tmp_path / "good", steps=1))["checkpoint"]
        capsys.readouterr()
        if kind == "truncated":
            data = Path(good).read_bytes()
            path.write_bytes(data[: len(data) - 100])
        elif kind == "state_dict":
            torch.save(load(good)["ema"], path)
        else:
            path = Path(good)
            extra = ["--model-kwargs", json.dumps(dict(EDT_TINY, dims=[32, 64, 64, 64, 32]))]
    elif kind == "directory":
        path.mkdir()
    elif kind == "not_a_checkpoint":
        path.write_text("this is not a checkpoint\n")
    what = {"missing": "no such file", "directory": "is a directory", "truncated": "not a readable PyTorch file",
            "not_a_checkpoint": "not a readable PyTorch file", "state_dict": "a published state dict is for",
            "other_model": "(model) does not fit"}[kind]
    code = train.console_main(base(tmp_path / "run", "--resume", str(path), *extra))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {path}") and what in err[0], err[0]
    if kind != "other_model":
        assert err[0].endswith("expected a training checkpoint of edt.train (format 'edt-train-v1')")
    assert not (tmp_path / "run").exists()


def test_command_line_exit_codes(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "edt.train", *base(tmp_path, "--resume", str(tmp_path / "x.pt"))],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'x.pt'}: no such file; expected a training "
                                                f"checkpoint of edt.train (format 'edt-train-v1')"]


def _nan_folder(root, n=16, where=5):
    x, y = _latents(n)
    x[where, 1, 2, 3] = np.nan
    x[where, 0, 0, 0] = np.inf
    write_latent_folder(root, x, y)
    return root / f"imagenet256_features/{where}.npy"


def test_non_finite_latents_refused_before_training(tmp_path):
    bad = _nan_folder(tmp_path / "data")
    with pytest.raises(ValueError, match=r"latent holds 2 non-finite value\(s\).*--skip-data-check") as err:
        train.main(cli(tmp_path / "run", "--data-path", str(tmp_path / "data"), steps=1))
    assert str(bad) in str(err.value)
    assert not (tmp_path / "run").exists()
    ds = LatentFolder(tmp_path / "data", LATENT, 4)
    assert ds.validate() == []  # headers and labels alone are fine: the values need the scan
    y = np.array([0.0, 1.0, np.nan, 2.0])
    np.save(tmp_path / "labels.npy", y)
    with pytest.raises(ValueError, match=r"label nan is not finite at index 2"):
        LatentFolder.__new__(LatentFolder)._check_label(y, "labels.npy")


@pytest.mark.parametrize("sampler", ["uniform", "loss-second-moment"])
def test_non_finite_loss_stops_without_overwriting_the_last_checkpoint(tmp_path, capsys, sampler):
    good = train.main(base(tmp_path / "run", "--schedule-sampler", sampler, steps=2))["checkpoint"]
    before = Path(good).read_bytes()
    x, y = _latents(16)
    x[:] = np.nan
    write_latent_folder(tmp_path / "nan", x, y)
    args = ["--model", "EDT-S/2", "--model-kwargs", json.dumps(EDT_TINY), "--image-size", str(IMAGE),
            "--num-classes", "4", "--global-batch-size", "8", "--max-steps", "6", "--results-dir",
            str(tmp_path / "run"), "--no-progress", "--data-path", str(tmp_path / "nan"), "--skip-data-check",
            "--resume", good, "--ckpt-every", "1", "--schedule-sampler", sampler]
    capsys.readouterr()
    assert train.console_main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the training loss is not finite at step 3"), err
    assert f"(it resumed from {good})" in err[0]
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir()) == ["0000002.pt"]
    assert Path(good).read_bytes() == before


# ---------------------------------------------------------------------------
# CPU demo, progress, help
# ---------------------------------------------------------------------------

def test_compile_flag_runs_the_step_compiled_whole(tmp_path, monkeypatch):
    """``--compile default`` hands the step (forward, both passes, loss) to torch.compile with
    fullgraph=True and mode None (Inductor's default; Dynamo's eager backend stands in for it here,
    Inductor takes minutes on this CPU), and trains to the losses of the uncompiled run."""
    compiled = []
    real_compile = torch.compile

    def recording_compile(fn, **kw):
        compiled.append((type(fn).__name__, kw))
        return real_compile(fn, fullgraph=kw["fullgraph"], backend="eager")

    args = ("--synthetic", "--synthetic-size", "32", "--log-every", "1")
    want = train.main(cli(tmp_path / "eager", *args, model="MDTv2-S/2", kwargs=MDT_TINY, steps=2))
    monkeypatch.setattr(torch, "compile", recording_compile)
    try:
        got = train.main(cli(tmp_path / "compiled", *args, "--compile", "default", model="MDTv2-S/2",
                             kwargs=MDT_TINY, steps=2))
    finally:
        torch._dynamo.reset()
    assert compiled == [("DiffusionTrainingLoss", {"fullgraph": True, "mode": None})]
    assert len(want["history"]) == 2
    assert [h["loss"] for h in got["history"]] == pytest.approx([h["loss"] for h in want["history"]], rel=1e-5)


def test_cpu_demo_preset_and_overrides(tmp_path, capsys):
    a = train.parse_args(["--preset", "cpu-demo"])
    assert (a.model, a.image_size, a.synthetic, a.global_batch_size, a.max_steps, a.device) == \
        ("EDT-S/2", 64, True, 16, train.PRESETS["cpu-demo"]["max_steps"], "cpu")
    assert a.model_kwargs["dims"] == [32, 48, 64, 48, 32] and a.optimizer == "adan" and a.threads == 1
    assert train.parse_args(["--preset", "cpu-demo", "--threads", "2"]).threads == 2
    out = train.main(["--preset", "cpu-demo", "--max-steps", "3", "--results-dir", str(tmp_path), "--log-every", "1"])
    assert out["step"] == 3 and out["checkpoint"].endswith("0000003.pt")
    err = capsys.readouterr().err
    # tqdm's bar: rate, ETA and the loss from the first step on
    assert "3/3" in err and "it/s" in err and "<00:" in err and re.search(r"loss \d+\.\d{4}", err), err[-2000:]


def test_help_states_true_defaults(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split()).replace("EDT- XL", "EDT-XL")  # argparse wraps at "-"
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "--lr LR default: from --recipe (edt: 0.001 (0.0005 for EDT-XL); mdt: 0.0005)" in text
    assert "--schedule-sampler {uniform,loss-second-moment} default: from --recipe (edt: loss-second-moment; " \
           "mdt: uniform)" in text
    assert "--global-batch-size GLOBAL_BATCH_SIZE samples per step over all processes (default: 256)" in text
