"""Gaussian diffusion against closed-form facts (float64 where the maths allows)."""
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edt.diffusion import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    LossAwareSampler,
    LossSecondMomentResampler,
    UniformSampler,
    create_diffusion,
    create_named_schedule_sampler,
    get_named_beta_schedule,
    space_timesteps,
)
from edt.diffusion.gaussian_diffusion import discretized_gaussian_log_likelihood, mean_flat, normal_kl
from helpers.poison import poison  # noqa: F401 - fixture
from tolerances import FWD_TOL, GRAD_TOL, assert_close, assert_within_torch_error

T = 1000
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base():
    return create_diffusion("")


def perfect_eps_model(x0: torch.Tensor, base_abar: np.ndarray, var_values: float = 0.0):
    """A model that knows x0: eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t), at the ORIGINAL t."""
    abar = torch.from_numpy(base_abar)

    def model(x, t, **kwargs):
        a = abar[t].to(x.dtype).view(-1, 1, 1, 1)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return torch.cat([eps, torch.full_like(eps, var_values)], dim=1)

    return model


def test_linear_schedule_and_cumprod(base):
    betas = np.linspace(1e-4, 0.02, T)
    np.testing.assert_allclose(base.betas, betas, rtol=0, atol=1e-15)
    np.testing.assert_allclose(base.alphas_cumprod, np.cumprod(1 - betas), rtol=1e-12)
    np.testing.assert_allclose(base.alphas_cumprod_prev[0], 1.0)
    np.testing.assert_allclose(base.alphas_cumprod_prev[1:], base.alphas_cumprod[:-1])
    assert base.num_timesteps == T
    # the schedule for 500 steps is the 1000-step one stretched: same end points x2
    b500 = get_named_beta_schedule("linear", 500)
    np.testing.assert_allclose([b500[0], b500[-1]], [2e-4, 4e-2])
    with pytest.raises(ValueError, match="unknown beta schedule"):
        get_named_beta_schedule("quadratic", 10)


def test_posterior_matches_bayes_rule(base):
    """q(x_{t-1}|x_t,x_0) ∝ N(x_t; sqrt(a_t) x_{t-1}, b_t) N(x_{t-1}; sqrt(abar_{t-1}) x0, 1-abar_{t-1})."""
    t = np.array([1, 2, 10, 500, 999])
    a, b = 1 - base.betas[t], base.betas[t]
    abar_prev = base.alphas_cumprod[t - 1]
    precision = a / b + 1 / (1 - abar_prev)
    var = 1 / precision
    np.testing.assert_allclose(base.posterior_variance[t], var, rtol=1e-10)
    x0, xt = 0.7, -1.3
    mean = var * (np.sqrt(a) / b * xt + np.sqrt(abar_prev) / (1 - abar_prev) * x0)
    tt = torch.from_numpy(t)
    m, v, logv = base.q_posterior_mean_variance(torch.full((5, 1), x0, dtype=torch.float64),
                                                torch.full((5, 1), xt, dtype=torch.float64), tt)
    np.testing.assert_allclose(m[:, 0].numpy(), mean, rtol=1e-10)
    np.testing.assert_allclose(v[:, 0].numpy(), var, rtol=1e-10)
    assert base.posterior_variance[0] == 0.0
    assert base.posterior_log_variance_clipped[0] == base.posterior_log_variance_clipped[1]


def test_normal_kl_facts():
    g = torch.Generator().manual_seed(0)
    m, lv = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    torch.testing.assert_close(normal_kl(m, lv, m, lv), torch.zeros(50, dtype=torch.float64), rtol=0, atol=1e-15)
    m2, lv2 = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(m, (0.5 * lv).exp()),
                                                 torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m, lv, m2, lv2), expected, rtol=1e-12, atol=1e-12)


def test_discretized_likelihood_sums_to_one_over_256_bins():
    bins = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, log_scale in [(0.0, math.log(0.3)), (0.8, math.log(0.05)), (-0.95, math.log(1.5))]:
        lp = discretized_gaussian_log_likelihood(bins, means=torch.full_like(bins, mean),
                                                 log_scales=torch.full_like(bins, log_scale))
        torch.testing.assert_close(lp.exp().sum(), torch.tensor(1.0, dtype=torch.float64), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="one shape"):
        discretized_gaussian_log_likelihood(bins, means=bins[:3], log_scales=bins)


def test_q_sample_moments(base):
    x0 = torch.full((20000, 1, 1, 1), 0.5, dtype=torch.float64)
    t = torch.full((20000,), 300)
    xt = base.q_sample(x0, t, generator=torch.Generator().manual_seed(1))
    abar = base.alphas_cumprod[300]
    assert abs(xt.mean().item() - math.sqrt(abar) * 0.5) < 0.02
    assert abs(xt.var().item() - (1 - abar)) < 0.03
    torch.testing.assert_close(base.q_sample(x0[:2], t[:2], noise=torch.zeros_like(x0[:2])),
                               torch.full_like(x0[:2], math.sqrt(abar) * 0.5), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="t must be a 1-d tensor of 2"):
        base.q_sample(x0[:2], t[:3])


@pytest.mark.parametrize("copy_with", ["pickle", "deepcopy"])
def test_a_copied_diffusion_reads_its_own_tables(copy_with):
    """A pickled or deep-copied diffusion gathers from its own schedule, not the original's."""
    import copy
    import pickle

    original = create_diffusion("250")
    x0, t = torch.full((2, 1, 1, 1), 0.5, dtype=torch.float64), torch.tensor([3, 200])
    noise = torch.zeros_like(x0)
    original.q_sample(x0, t, noise=noise)  # its device tables made
    twin = pickle.loads(pickle.dumps(original)) if copy_with == "pickle" else copy.deepcopy(original)
    twin.sqrt_alphas_cumprod = twin.sqrt_alphas_cumprod * 0.5
    assert torch.equal(twin.q_sample(x0, t, noise=noise), original.q_sample(x0, t, noise=noise) * 0.5)


@pytest.mark.parametrize("spec,count", [("250", 250), ("ddim50", 50), ("10,15,20", 45), ([5, 5], 10)])
def test_respacing_keeps_alphas_cumprod(base, spec, count):
    steps = space_timesteps(T, spec)
    assert len(steps) == count and 0 in steps
    spaced = create_diffusion(spec)
    keep = sorted(steps)
    assert spaced.timestep_map == keep and spaced.num_timesteps == count
    np.testing.assert_allclose(spaced.alphas_cumprod, base.alphas_cumprod[keep], rtol=1e-12)


def test_space_timesteps_rejects_impossible():
    with pytest.raises(ValueError, match="cannot keep"):
        space_timesteps(10, "11")
    with pytest.raises(ValueError, match="exactly 7"):
        space_timesteps(10, "ddim7")


def test_learned_range_interpolates_between_posterior_and_beta(base):
    x = torch.zeros(3, 2, 4, 4)
    t = torch.tensor([0, 10, 999])
    for v, table in [(-1.0, base.posterior_log_variance_clipped), (1.0, np.log(base.betas))]:
        out = base.p_mean_variance(lambda x, t: torch.cat([x, torch.full_like(x, v)], 1), x, t)
        np.testing.assert_allclose(out["log_variance"][:, 0, 0, 0].numpy(), table[t.numpy()], rtol=1e-6)
    with pytest.raises(ValueError, match=r"model output must have shape \(3, 4, 4, 4\)"):
        base.p_mean_variance(lambda x, t: x, x, t)


@pytest.mark.parametrize("spec", ["", "25"])
def test_perfect_model_predicts_x0_at_every_step(base, spec):
    diff = create_diffusion(spec)
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(2, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    model = perfect_eps_model(x0, base.alphas_cumprod)
    for k in [0, 1, diff.num_timesteps // 2, diff.num_timesteps - 1]:
        t = torch.full((2,), k)
        xt = diff.q_sample(x0, t, generator=g)
        out = diff.p_mean_variance(model, xt, t, clip_denoised=False)
        torch.testing.assert_close(out["pred_xstart"], x0, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(out["mean"], diff.q_posterior_mean_variance(x0, xt, t)[0], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_perfect_model_denoises_known_x0(base, sampler):
    diff = create_diffusion("ddim20" if sampler == "ddim" else "20")
    x0 = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2 - 1
    model = perfect_eps_model(x0, base.alphas_cumprod)
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    loop = diff.ddim_sample_loop if sampler == "ddim" else diff.p_sample_loop
    out = loop(model, (2, 3, 4, 4), noise=noise, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(out, x0, rtol=1e-9, atol=1e-9)
    # DDIM (eta 0) with this model follows x_t = sqrt(abar) x0 + sqrt(1-abar) eps with a constant eps
    if sampler == "ddim":
        outs = list(diff.ddim_sample_loop_progressive(model, (2, 3, 4, 4), noise=noise))
        k = diff.num_timesteps // 2
        a = diff.alphas_cumprod_prev[diff.num_timesteps - 1 - k]
        eps = (noise - math.sqrt(diff.alphas_cumprod[-1]) * x0) / math.sqrt(1 - diff.alphas_cumprod[-1])
        torch.testing.assert_close(outs[k]["sample"], math.sqrt(a) * x0 + math.sqrt(1 - a) * eps,
                                   rtol=1e-9, atol=1e-9)


def test_training_losses_of_perfect_model_vanish(base):
    x0 = torch.rand(4, 3, 4, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64) * 2 - 1
    model = perfect_eps_model(x0, base.alphas_cumprod, var_values=-1.0)  # variance = posterior's
    t = torch.tensor([1, 5, 400, 999])
    terms = base.training_losses(model, x0, t, generator=torch.Generator().manual_seed(7))
    assert set(terms) == {"loss", "mse", "vb"}
    torch.testing.assert_close(terms["mse"], torch.zeros(4, dtype=torch.float64), rtol=0, atol=1e-20)
    torch.testing.assert_close(terms["vb"], torch.zeros(4, dtype=torch.float64), rtol=0, atol=1e-9)


def test_vb_term_at_t0_is_decoder_nll(base):
    x0 = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    model = perfect_eps_model(x0, base.alphas_cumprod, var_values=-1.0)
    t = torch.zeros(1, dtype=torch.long)
    noise = torch.zeros_like(x0)
    terms = base.training_losses(model, x0, t, noise=noise)
    # mean = x0 = 0 exactly, log sigma^2 = log beta~_1 (clipped): NLL of the central bin in bits
    sigma = math.exp(0.5 * base.posterior_log_variance_clipped[0])
    expected = -discretized_gaussian_log_likelihood(x0, means=x0, log_scales=torch.full_like(x0, math.log(sigma)))
    torch.testing.assert_close(terms["vb"], mean_flat(expected) / math.log(2), rtol=1e-5, atol=0)


def test_vb_gradient_reaches_variance_only(base):
    x0 = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(8))
    out = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(9), requires_grad=True)
    t = torch.tensor([3, 700])
    terms = base.training_losses(lambda x, t: out * 1.0, x0, t)
    (gv,) = torch.autograd.grad(terms["vb"].sum(), out, retain_graph=True)
    assert torch.equal(gv[:, :2], torch.zeros_like(gv[:, :2])) and gv[:, 2:].abs().sum() > 0
    (gm,) = torch.autograd.grad(terms["mse"].sum(), out)
    assert torch.equal(gm[:, 2:], torch.zeros_like(gm[:, 2:])) and gm[:, :2].abs().sum() > 0


def test_same_noise_gives_same_loss_and_kl_variant(base):
    x0 = torch.randn(2, 2, 4, 4)
    t = torch.tensor([10, 20])
    noise = torch.randn_like(x0)
    model = lambda x, t, **kw: torch.cat([x * 0.3, x * 0.0], 1)  # noqa: E731
    a = base.training_losses(model, x0, t, noise=noise)["loss"]
    b = base.training_losses(model, x0, t, noise=noise)["loss"]
    assert torch.equal(a, b)
    kl = create_diffusion("", use_kl=True).training_losses(model, x0, t, noise=noise)
    assert set(kl) == {"loss"} and torch.isfinite(kl["loss"]).all()
    fixed = create_diffusion("", learn_sigma=False)
    with pytest.raises(ValueError, match="does not match the target"):
        fixed.training_losses(model, x0, t, noise=noise)


def test_spaced_model_sees_original_timesteps_and_cfg_kwargs():
    diff = create_diffusion("10")
    seen = []

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward_with_cfg(self, x, t, y, cfg_scale):
            seen.append((t.tolist(), y.tolist(), cfg_scale))
            return torch.cat([x * self.w, torch.zeros_like(x)], 1)

    net = Net()
    y = torch.tensor([3, 7, 1000, 1000])
    out = diff.p_sample_loop(net.forward_with_cfg, (4, 2, 4, 4), model_kwargs={"y": y, "cfg_scale": 4.0})
    assert out.shape == (4, 2, 4, 4)
    ts = [s[0][0] for s in seen]
    assert ts == sorted(diff.timestep_map, reverse=True) and ts[0] == 999 and ts[-1] == 0
    assert all(s[1] == y.tolist() and s[2] == 4.0 for s in seen)


def test_uniform_sampler():
    s = UniformSampler(1000)
    t, w = s.sample(4096, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.int64 and t.min() >= 0 and t.max() < 1000 and torch.equal(w, torch.ones(4096))
    assert len(t.unique()) > 900


def test_enum_variants_build():
    betas = get_named_beta_schedule("cosine", 100)
    assert betas.max() <= 0.999
    d = GaussianDiffusion(betas=betas, model_mean_type=ModelMeanType.START_X,
                          model_var_type=ModelVarType.FIXED_SMALL, loss_type=LossType.MSE)
    x0 = torch.randn(2, 1, 2, 2)
    terms = d.training_losses(lambda x, t: x0, x0, torch.tensor([0, 50]))
    torch.testing.assert_close(terms["loss"], torch.zeros(2), rtol=0, atol=0)
    with pytest.raises(ValueError, match="betas"):
        GaussianDiffusion(betas=[0.0, 0.1])


# ---------------------------------------------------------------------------
# Schedule samplers
# ---------------------------------------------------------------------------

class _Steps:
    """Stands in for a diffusion object: the samplers only read num_timesteps."""

    def __init__(self, n):
        self.num_timesteps = n


def second_moment_weights_reference(history, n, per_term=10, uniform_prob=0.001):
    """p_t of the loss-second-moment sampler, written from its definition: uniform until every
    timestep has per_term losses; then the root mean square of each timestep's last per_term losses,
    normalised to sum 1, mixed with the uniform distribution (mass uniform_prob)."""
    if any(len(history[t]) < per_term for t in range(n)):
        return np.ones(n)
    rms = np.array([math.sqrt(sum(v * v for v in history[t][-per_term:]) / per_term) for t in range(n)])
    return (1 - uniform_prob) * rms / rms.sum() + uniform_prob / n


def test_create_named_schedule_sampler():
    d = _Steps(12)
    assert isinstance(create_named_schedule_sampler("uniform", d), UniformSampler)
    s = create_named_schedule_sampler("loss-second-moment", d)
    assert isinstance(s, LossSecondMomentResampler) and isinstance(s, LossAwareSampler)
    assert (s.history_per_term, s.uniform_prob, s.num_timesteps) == (10, 0.001, 12)
    with pytest.raises(ValueError, match="unknown schedule sampler 'lsm'"):
        create_named_schedule_sampler("lsm", d)
    with pytest.raises(TypeError, match="num_timesteps"):
        UniformSampler("1000")


def test_loss_second_moment_weights_equal_reference_after_same_history():
    n = 7
    rng = np.random.default_rng(0)
    s = LossSecondMomentResampler(_Steps(n))
    history = {t: [] for t in range(n)}
    for step in range(40):
        ts = rng.integers(0, n, size=5)
        # losses on very different scales per timestep, so the weights are far from uniform
        losses = rng.random(5) * (1.0 + 10.0 * ts)
        s.update_with_all_losses(ts.tolist(), losses.tolist())
        for t, v in zip(ts, losses):
            history[int(t)].append(float(v))
        ref = second_moment_weights_reference(history, n)
        np.testing.assert_allclose(s.weights(), ref, rtol=1e-13, atol=0)
    assert all(len(h) > 10 for h in history.values())  # the histories did overflow (oldest shifted out)
    w = s.weights()
    assert not np.allclose(w, w[0])
    # importance weights of a draw: 1 / (T p_t)
    t, iw = s.sample(64, generator=torch.Generator().manual_seed(1))
    p = w / w.sum()
    assert t.dtype == torch.int64 and iw.dtype == torch.float32
    torch.testing.assert_close(iw, torch.from_numpy(1 / (n * p[t.numpy()])).float(), rtol=0, atol=0)


def test_loss_second_moment_uniform_until_every_step_is_full():
    s = LossSecondMomentResampler(_Steps(3), history_per_term=2)
    s.update_with_all_losses([0, 0, 1, 1, 2], [1.0, 2.0, 3.0, 4.0, 5.0])
    np.testing.assert_array_equal(s.weights(), np.ones(3))
    s.update_with_all_losses([2], [6.0])
    rms = np.sqrt([(1 + 4) / 2, (9 + 16) / 2, (25 + 36) / 2])
    np.testing.assert_allclose(s.weights(), 0.999 * rms / rms.sum() + 0.001 / 3, rtol=1e-14)
    with pytest.raises(ValueError, match="timestep 3 outside"):
        s.update_with_all_losses([3], [1.0])
    with pytest.raises(ValueError, match="non-finite loss"):
        s.update_with_all_losses([1], [float("nan")])
    with pytest.raises(ValueError, match="one length"):
        s.update_with_local_losses(torch.tensor([0, 1]), torch.tensor([1.0]))


def test_sampler_draws_follow_p_and_numpy_path_is_adms():
    n = 5
    s = LossSecondMomentResampler(_Steps(n), history_per_term=1, uniform_prob=0.1)
    s.update_with_all_losses(range(n), [1.0, 2.0, 3.0, 4.0, 10.0])
    p = s.weights() / s.weights().sum()
    t, w = s.sample(200_000, generator=torch.Generator().manual_seed(2))
    freq = np.bincount(t.numpy(), minlength=n) / len(t)
    np.testing.assert_allclose(freq, p, atol=4 * np.sqrt(p * (1 - p) / len(t)).max())
    # importance weights make the sampled mean of a per-timestep quantity unbiased
    f = np.arange(n, dtype=np.float64) ** 2
    assert abs(float((w.double() * torch.from_numpy(f[t.numpy()])).mean()) - f.mean()) < 0.05 * f.mean()
    # without a generator the draw is np.random.choice on the global numpy RNG
    state = np.random.get_state()
    try:
        np.random.seed(3)
        t1, _ = s.sample(50)
        np.random.seed(3)
        expected = np.random.choice(n, size=(50,), p=p)
    finally:
        np.random.set_state(state)
    np.testing.assert_array_equal(t1.numpy(), expected)
    with pytest.raises(ValueError, match="batch_size"):
        s.sample(0)


def test_sampler_state_dict_resumes_exactly(tmp_path):
    n = 6
    rng = np.random.default_rng(4)
    batches = [(rng.integers(0, n, 8).tolist(), rng.random(8).tolist()) for _ in range(30)]
    a = LossSecondMomentResampler(_Steps(n), history_per_term=3)
    for ts, ls in batches[:15]:
        a.update_with_local_losses(torch.tensor(ts), torch.tensor(ls, dtype=torch.float64))
    torch.save(a.state_dict(), tmp_path / "s.pt")
    b = LossSecondMomentResampler(_Steps(n), history_per_term=3)
    b.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    for ts, ls in batches[15:]:
        a.update_with_all_losses(ts, ls)
        b.update_with_all_losses(ts, ls)
        np.testing.assert_array_equal(a.weights(), b.weights())
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert all(torch.equal(x, y) for x, y in zip(a.sample(16, generator=g1), b.sample(16, generator=g2)))
    with pytest.raises(ValueError, match="history_per_term"):
        LossSecondMomentResampler(_Steps(n)).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="kind"):
        b.load_state_dict(UniformSampler(n).state_dict())


_GATHER_SCRIPT = """
import sys, torch, torch.distributed as dist
from edt.diffusion import LossSecondMomentResampler
dist.init_process_group("gloo")
rank = dist.get_rank()
s = LossSecondMomentResampler(4, history_per_term=2)
# unequal batch sizes per rank: 3 on rank 0, 5 on rank 1
for step in range(3):
    n = 3 if rank == 0 else 5
    ts = torch.arange(n) % 4
    losses = (torch.arange(n, dtype=torch.float32) + 1) * (rank + 1) + step
    s.update_with_local_losses(ts, losses)
torch.save(s.state_dict(), sys.argv[1])
dist.destroy_process_group()
"""


def test_update_with_local_losses_gathers_all_ranks(tmp_path):
    """Two gloo ranks with different batch sizes end with one history: the rank-ordered
    concatenation of every rank's (t, loss) pairs, as update_with_all_losses applies it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = tmp_path / "gather.py"
    script.write_text(_GATHER_SCRIPT)
    procs = []
    for rank in range(2):
        env = dict(os.environ, PYTHONPATH=str(REPO), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   RANK=str(rank), WORLD_SIZE="2", OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(script), str(tmp_path / f"r{rank}.pt")], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
    states = [torch.load(tmp_path / f"r{r}.pt", weights_only=True) for r in range(2)]
    ref = LossSecondMomentResampler(4, history_per_term=2)
    for step in range(3):
        ts, ls = [], []
        for rank, n in ((0, 3), (1, 5)):
            ts += [i % 4 for i in range(n)]
            ls += [float(np.float32((i + 1) * (rank + 1) + step)) for i in range(n)]
        ref.update_with_all_losses(ts, ls)
    for st in states:
        torch.testing.assert_close(st["loss_history"], ref.state_dict()["loss_history"], rtol=0, atol=0)
        torch.testing.assert_close(st["loss_counts"], ref.state_dict()["loss_counts"], rtol=0, atol=0)


# ---------------------------------------------------------------------------
# Min-SNR weighted training loss, against a transcription of the authors' formula
# ---------------------------------------------------------------------------

def _tanh_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def authors_training_loss(abar, model, x0, t, model_t, noise, predict_x0=False, gamma=5.0):
    """loss_i = w(t_i) * mean((target - pred)^2) + vb_i for a learned-range-variance model, from the
    maths of EDT's/MDTv2's gaussian_diffusion.py: snr = abar / (1 - abar), w = min(snr, gamma) / snr
    (eps target) or min(snr, gamma) (x0 target); vb = KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) in
    bits/dim with the mean frozen, or at t = 0 the discretised decoder NLL (tanh-approximated CDF,
    bins of half-width 1/255). ``abar`` is the float64 cumulative product of the process used."""
    abar = torch.as_tensor(abar, dtype=torch.float64)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    beta = 1 - abar / abar_prev
    post_var = beta * (1 - abar_prev) / (1 - abar)
    post_logvar = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
    coef1 = beta * abar_prev.sqrt() / (1 - abar)
    coef2 = (1 - abar_prev) * (1 - beta).sqrt() / (1 - abar)

    def at(table):
        return table[t].view(-1, 1, 1, 1)

    x_t = at(abar).sqrt() * x0 + (1 - at(abar)).sqrt() * noise
    out = model(x_t, model_t)
    C = x0.shape[1]
    pred, v = out[:, :C], out[:, C:]
    frac = (v + 1) / 2
    model_logvar = frac * at(beta.log()) + (1 - frac) * at(post_logvar)
    pred_x0 = pred if predict_x0 else (x_t - (1 - at(abar)).sqrt() * pred) / at(abar).sqrt()
    model_mean = at(coef1) * pred_x0 + at(coef2) * x_t
    true_mean = at(coef1) * x0 + at(coef2) * x_t
    true_logvar = at(post_logvar)
    kl = 0.5 * (-1 + model_logvar - true_logvar + (true_logvar - model_logvar).exp()
                + (true_mean - model_mean) ** 2 * (-model_logvar).exp())
    inv_std = (-0.5 * model_logvar).exp()
    cdf_plus = _tanh_normal_cdf(inv_std * (x0 - model_mean + 1 / 255))
    cdf_min = _tanh_normal_cdf(inv_std * (x0 - model_mean - 1 / 255))
    log_p = torch.where(x0 < -0.999, cdf_plus.clamp(min=1e-12).log(),
                        torch.where(x0 > 0.999, (1 - cdf_min).clamp(min=1e-12).log(),
                                    (cdf_plus - cdf_min).clamp(min=1e-12).log()))
    dims = (1, 2, 3)
    vb = torch.where(t == 0, -log_p.mean(dims), kl.mean(dims)) / math.log(2)
    snr = abar[t] / (1 - abar[t])
    w = torch.minimum(snr, torch.full_like(snr, gamma))
    if not predict_x0:
        w = w / snr
    target = x0 if predict_x0 else noise
    return w * ((target - pred) ** 2).mean(dims) + vb


def _smooth_model(x, t, **kwargs):
    tt = t.to(x.dtype).view(-1, 1, 1, 1) / 1000
    return torch.cat([torch.tanh(0.7 * x + tt), 0.9 * torch.sin(2 * x - tt)], dim=1)


@pytest.mark.parametrize("spec,predict_x0", [("", False), ("", True), ("25", False)],
                         ids=["eps-1000", "x0-1000", "eps-spaced25"])
def test_min_snr_loss_equals_authors_formula(spec, predict_x0):
    diff = create_diffusion(spec, predict_xstart=predict_x0)
    assert diff.mse_loss_weight_type == "min_snr_5"
    g = torch.Generator().manual_seed(11)
    n = diff.num_timesteps
    t = torch.tensor([0, 1, 2, n // 10, n // 2, n - 1])
    x0 = (torch.rand(len(t), 3, 5, 4, generator=g, dtype=torch.float64) * 2.2 - 1.1).clamp(-1, 1)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    ours = diff.training_losses(_smooth_model, x0, t, noise=noise)
    model_t = torch.tensor(diff.timestep_map)[t]
    ref = authors_training_loss(diff.alphas_cumprod, _smooth_model, x0, t, model_t, noise, predict_x0)
    torch.testing.assert_close(ours["loss"], ref, rtol=1e-10, atol=1e-12)
    # float32 inputs (the training dtype) agree with the float64 transcription to 1e-6 away
    # from t = 0, whose decoder NLL (a variance of ~1e-4 over 1/255-wide bins) float32 cannot
    # resolve to that precision in either implementation
    ours32 = diff.training_losses(_smooth_model, x0.float(), t, noise=noise.float())["loss"]
    torch.testing.assert_close(ours32[1:].double(), ref[1:], rtol=1e-6, atol=1e-6)
    # the weighting matters here: the unweighted loss is different, and is mse + vb
    plain = create_diffusion(spec, predict_xstart=predict_x0, mse_loss_weight_type="constant")
    un = plain.training_losses(_smooth_model, x0, t, noise=noise)
    torch.testing.assert_close(un["vb"], ours["vb"], rtol=0, atol=0)
    assert (un["mse"] - ours["mse"]).abs().max() > 1e-3
    ratio = ours["mse"] / un["mse"]
    abar = torch.from_numpy(diff.alphas_cumprod)[t]
    snr = abar / (1 - abar)
    expected = snr.clamp(max=5) if predict_x0 else snr.clamp(max=5) / snr
    torch.testing.assert_close(ratio, expected, rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------
# The fused loss (edt_kernels.diffusion_loss) that training_losses(backend=...) computes
# ---------------------------------------------------------------------------

def _fused_loss_case(spec: str):
    """Every branch: t = 0 (decoder NLL, with x0 in both edge bins) and t > 0 (KL)."""
    diff = create_diffusion(spec)
    g = torch.Generator().manual_seed(5)
    n = diff.num_timesteps
    t = torch.tensor([0, 1, 2, n // 10, n // 2, n - 1, 0])
    x0 = (torch.rand(len(t), 3, 5, 7, generator=g, dtype=torch.float64) * 2.2 - 1.1).clamp(-1, 1)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    out = 0.5 * torch.randn(len(t), 6, 5, 7, generator=g, dtype=torch.float64)
    return diff, x0, t, noise, out


def _loss_and_grad(diff, x0, t, noise, out, backend, dtype=torch.float64):
    o = out.to(dtype).requires_grad_(True)
    loss = diff.training_losses(lambda x, tt: o * 1.0, x0.to(dtype), t, noise=noise.to(dtype),
                                backend=backend)["loss"]
    w = torch.linspace(0.5, 2.0, len(t), dtype=loss.dtype)
    (grad,) = torch.autograd.grad((loss * w).sum(), o)
    return loss, grad


@pytest.mark.parametrize("spec", ["", "25"], ids=["1000", "spaced25"])
def test_fused_loss_equals_the_terms(spec):
    diff, x0, t, noise, out = _fused_loss_case(spec)
    assert diff.fused_loss()
    ref, gref = _loss_and_grad(diff, x0, t, noise, out, None)
    for backend in ("torch", "eager"):
        loss, grad = _loss_and_grad(diff, x0, t, noise, out, backend)
        assert_close(loss, ref, torch.float64, FWD_TOL, name=f"{backend} loss")
        assert_close(grad, gref, torch.float64, GRAD_TOL, name=f"{backend} grad")


def test_fused_loss_on_triton(poison):
    from edt_kernels import available_backends

    if "triton" not in available_backends():
        pytest.skip("triton backend not available (triton not importable)")
    diff, x0, t, noise, out = _fused_loss_case("")
    ref, gref = _loss_and_grad(diff, x0, t, noise, out, None)
    low, glow = _loss_and_grad(diff, x0, t, noise, out, None, torch.float32)
    loss, grad = _loss_and_grad(diff, x0, t, noise, out, "triton", torch.float32)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    assert_within_torch_error(loss, low, ref, torch.float32, name="loss")
    assert_within_torch_error(grad, glow, gref, torch.float32, name="grad")
    x0, noise, out = x0.float(), noise.float(), out.float()
    x_t = diff.q_sample(x0, t, noise=noise)
    coef = diff._loss_coefficients(t, torch.float32)
    torch.library.opcheck(torch.ops.edt_kernels.diffusion_loss.default, (out, x0, x_t, noise, coef, 1.0, True),
                          test_utils=("test_schema", "test_faketensor"))


def test_fused_loss_bad_input_names_the_argument():
    import edt_kernels

    out, x = torch.zeros(2, 8, 4, 4), torch.zeros(2, 4, 4, 4)
    coef = torch.zeros(2, 8)
    with pytest.raises(ValueError, match="output must be"):
        edt_kernels.diffusion_loss(torch.zeros(2, 7, 4, 4), x, x, x, coef)
    with pytest.raises(ValueError, match="noise must be"):
        edt_kernels.diffusion_loss(out, x, x, x[:, :3], coef)
    with pytest.raises(ValueError, match="coef must be"):
        edt_kernels.diffusion_loss(out, x, x, x, coef[:, :5])
    with pytest.raises(ValueError, match="output must be .* positive"):
        edt_kernels.diffusion_loss(torch.zeros(2, 0, 4, 4), x[:, :0], x[:, :0], x[:, :0], coef)
    with pytest.raises(TypeError, match="vb_scale must be a number"):
        edt_kernels.diffusion_loss(out, x, x, x, coef, vb_scale="1")
    with pytest.raises(ValueError, match="vb_scale must be finite"):
        edt_kernels.diffusion_loss(out, x, x, x, coef, vb_scale=float("nan"))


@pytest.mark.parametrize("backend", ["auto", "torch", "eager"])
def test_fused_loss_of_an_empty_batch_is_empty(backend):
    import edt_kernels

    x = torch.zeros(0, 4, 4, 4)
    loss = edt_kernels.diffusion_loss(torch.zeros(0, 8, 4, 4), x, x, x, torch.zeros(0, 8), backend=backend)
    assert loss.shape == (0,)


def test_mse_loss_weight_type_validation():
    with pytest.raises(ValueError, match="mse_loss_weight_type must be 'constant' or 'min_snr_<gamma>'"):
        create_diffusion("", mse_loss_weight_type="min_snr_")
    with pytest.raises(ValueError, match="got 'snr'"):
        create_diffusion("", mse_loss_weight_type="snr")
    with pytest.raises(ValueError, match="gamma > 0"):
        create_diffusion("", mse_loss_weight_type="min_snr_-1")
    d = create_diffusion("", mse_loss_weight_type="min_snr_1.5")
    snr = d.alphas_cumprod / (1 - d.alphas_cumprod)
    np.testing.assert_allclose(d.mse_loss_weight, np.minimum(snr, 1.5) / snr, rtol=1e-15)
    # where snr = 0 (a beta of 1 zeroes abar) the weight is 1, not 0/0
    with np.errstate(divide="ignore"):
        z = GaussianDiffusion(betas=[0.1, 1.0], model_var_type=ModelVarType.FIXED_LARGE)
    np.testing.assert_array_equal(np.isfinite(z.mse_loss_weight), [True, True])
    assert z.mse_loss_weight[1] == 1.0
