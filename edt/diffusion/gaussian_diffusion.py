"""Gaussian diffusion with a learned-range variance (ADM / DiT formulation).

Facts used (Ho et al. 2020, "DDPM"; Nichol & Dhariwal 2021, "Improved DDPM";
Song et al. 2021, "DDIM"; the DiT/ADM diffusion as EDT and MDTv2 train with it):

* forward process  q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)
* posterior        q(x_{t-1} | x_t, x_0) = N(c1_t x_0 + c2_t x_t, beta~_t I),
  beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t),
  c1_t = beta_t sqrt(abar_{t-1}) / (1 - abar_t),
  c2_t = (1 - abar_{t-1}) sqrt(alpha_t) / (1 - abar_t)
* learned range:   log sigma_t^2 = f log beta_t + (1 - f) log beta~_t,
  f = (v + 1) / 2 where v is the second half of the model output
* loss = w_t MSE(eps) + VB, the VB term being KL(q posterior || p) in bits per
  dimension, or the discretised Gaussian decoder NLL at t = 0; the VB term sees
  the mean prediction through a stop-gradient so that it trains the variance only.
* w_t is the Min-SNR-gamma weight (Hang et al. 2023, "Efficient Diffusion
  Training via Min-SNR Weighting Strategy"), as EDT's and MDTv2's training code
  apply it with gamma = 5: snr_t = abar_t / (1 - abar_t), w_t = min(snr_t, 5) / snr_t
  when the model predicts the noise, min(snr_t, 5) when it predicts x_0; the VB
  term is not weighted. ``mse_loss_weight_type="constant"`` gives w_t = 1 (DiT, ADM).

All schedule arithmetic is done in float64 (numpy) and the per-timestep values
are gathered and cast to float32 on the tensor's device.
"""
from __future__ import annotations

import enum
import math
from typing import Any, Callable, Dict, Iterator, Optional, Sequence

import numpy as np
import torch

from edt_kernels import diffusion_loss
from edt_kernels._tracing import constant_while_traced
from edt_kernels.reference.diffusion_loss import COEF_COLUMNS

from ..utils import progress_bar

#: The loss weighting of EDT's and MDTv2's training code: Min-SNR with gamma = 5.
DEFAULT_MSE_LOSS_WEIGHT_TYPE = "min_snr_5"

__all__ = [
    "ModelMeanType",
    "ModelVarType",
    "LossType",
    "GaussianDiffusion",
    "get_named_beta_schedule",
    "normal_kl",
    "approx_standard_normal_cdf",
    "discretized_gaussian_log_likelihood",
    "mean_flat",
    "mse_loss_weights",
    "DEFAULT_MSE_LOSS_WEIGHT_TYPE",
]

#: ADM's linear schedule for 1000 steps: beta from 1e-4 to 2e-2 (scaled for other lengths).
LINEAR_BETA_START = 1e-4
LINEAR_BETA_END = 2e-2
#: Half a quantisation bin of 8-bit data mapped to [-1, 1] (discretised decoder NLL).
HALF_BIN = 1.0 / 255.0
#: The name of the fused loss's per-timestep coefficient table among the device tables.
LOSS_COEFFICIENTS = "loss coefficients"


class ModelMeanType(enum.Enum):
    """What the first half of the model output predicts."""

    PREVIOUS_X = enum.auto()  # x_{t-1}
    START_X = enum.auto()  # x_0
    EPSILON = enum.auto()  # the noise


class ModelVarType(enum.Enum):
    """How the reverse-process variance is obtained."""

    LEARNED = enum.auto()  # model outputs log sigma^2
    FIXED_SMALL = enum.auto()  # beta~_t
    FIXED_LARGE = enum.auto()  # beta_t (beta~_1 at t = 0)
    LEARNED_RANGE = enum.auto()  # interpolation between the two (Improved DDPM)


class LossType(enum.Enum):
    MSE = enum.auto()  # MSE + VB when the variance is learned
    RESCALED_MSE = enum.auto()  # same, VB rescaled by num_timesteps / 1000
    KL = enum.auto()  # the variational bound only
    RESCALED_KL = enum.auto()

    def is_vb(self) -> bool:
        return self in (LossType.KL, LossType.RESCALED_KL)


# ---------------------------------------------------------------------------
# Schedules and closed-form helpers
# ---------------------------------------------------------------------------

def get_named_beta_schedule(name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """Betas (float64 [T]) of a named schedule: ``"linear"`` or ``"cosine"``."""
    if num_diffusion_timesteps < 1:
        raise ValueError(f"num_diffusion_timesteps must be >= 1, got {num_diffusion_timesteps}")
    if name == "linear":
        scale = 1000.0 / num_diffusion_timesteps
        return np.linspace(scale * LINEAR_BETA_START, scale * LINEAR_BETA_END,
                           num_diffusion_timesteps, dtype=np.float64)
    if name == "cosine":
        # Improved DDPM: abar(t) = cos^2(((t/T + s) / (1 + s)) * pi / 2), s = 0.008, beta <= 0.999
        s = 0.008

        def abar(u: float) -> float:
            return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

        T = num_diffusion_timesteps
        return np.array([min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)],
                        dtype=np.float64)
    raise ValueError(f"unknown beta schedule {name!r}; expected 'linear' or 'cosine'")


def mse_loss_weights(alphas_cumprod: np.ndarray, model_mean_type: "ModelMeanType",
                     weight_type: str = DEFAULT_MSE_LOSS_WEIGHT_TYPE) -> np.ndarray:
    """Per-timestep weight (float64 [T]) of the MSE term.

    ``"constant"``: 1. ``"min_snr_<gamma>"`` (e.g. ``"min_snr_5"``), with
    snr = abar / (1 - abar): min(snr, gamma) / snr for every target but x_0,
    min(snr, gamma) for an x_0 target. Where snr = 0 (abar = 0) the weight is 1,
    as in MDTv2's code.
    """
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    if not isinstance(weight_type, str):
        raise TypeError(f"mse_loss_weight_type must be a str, got {type(weight_type).__name__}")
    if weight_type == "constant":
        return np.ones_like(abar)
    prefix = "min_snr_"
    gamma = None
    if weight_type.startswith(prefix):
        try:
            gamma = float(weight_type[len(prefix):])
        except ValueError:
            gamma = None
    if gamma is None or not (math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"mse_loss_weight_type must be 'constant' or 'min_snr_<gamma>' with gamma > 0 "
                         f"(e.g. 'min_snr_5'), got {weight_type!r}")
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = abar / (1.0 - abar)
        clipped = np.minimum(snr, gamma)
        weights = clipped if model_mean_type == ModelMeanType.START_X else clipped / snr
    return np.where(snr == 0, 1.0, weights)


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the first."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    tensor = next((a for a in (mean1, logvar1, mean2, logvar2) if isinstance(a, torch.Tensor)), None)
    if tensor is None:
        raise TypeError("normal_kl needs at least one tensor argument")
    logvar1, logvar2 = (a if isinstance(a, torch.Tensor) else torch.tensor(a, dtype=tensor.dtype,
                                                                            device=tensor.device)
                        for a in (logvar1, logvar2))
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Tanh approximation of the standard normal CDF (as in ADM / PixelCNN++)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, *, means: torch.Tensor,
                                        log_scales: torch.Tensor) -> torch.Tensor:
    """Log-likelihood (nats, elementwise) of data in [-1, 1] quantised to 256 bins.

    The edge bins take the whole tail of the Gaussian.
    """
    if not (x.shape == means.shape == log_scales.shape):
        raise ValueError(f"x, means and log_scales must have one shape, got {tuple(x.shape)}, "
                         f"{tuple(means.shape)}, {tuple(log_scales.shape)}")
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + HALF_BIN))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - HALF_BIN))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def _randn(shape, *, like: Optional[torch.Tensor] = None, device=None, dtype=None,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    if like is not None:
        shape, device, dtype = like.shape, like.device, like.dtype
    return torch.randn(tuple(shape), device=device, dtype=dtype or torch.float32, generator=generator)


# ---------------------------------------------------------------------------
# The diffusion process
# ---------------------------------------------------------------------------

class GaussianDiffusion:
    """Forward process, reverse-process parameterisation, losses and samplers.

    Args:
        betas: float64 [T] noise schedule, each in (0, 1].
        model_mean_type, model_var_type, loss_type: see the enums.
        mse_loss_weight_type: ``"min_snr_5"`` (default, the authors' training
            code) or another ``"min_snr_<gamma>"``, or ``"constant"`` (unweighted
            MSE, as DiT and ADM); see ``mse_loss_weights``.
    A model is any callable ``model(x_t, t, **model_kwargs) -> Tensor`` where
    ``t`` holds integer timesteps in ``[0, T)``; with a learned variance it
    returns ``2 * C`` channels (mean part first).
    """

    def __init__(self, *, betas: Sequence[float], model_mean_type: ModelMeanType = ModelMeanType.EPSILON,
                 model_var_type: ModelVarType = ModelVarType.LEARNED_RANGE,
                 loss_type: LossType = LossType.MSE,
                 mse_loss_weight_type: str = DEFAULT_MSE_LOSS_WEIGHT_TYPE):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size == 0:
            raise ValueError(f"betas must be a non-empty 1-d array, got shape {betas.shape}")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must lie in (0, 1]")
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)

        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)

        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # beta~_0 = 0: clip the log at t = 0 with beta~_1 (only used for t = 0's decoder).
        if self.num_timesteps > 1:
            self.posterior_log_variance_clipped = np.log(
                np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        else:
            self.posterior_log_variance_clipped = np.log(np.maximum(self.posterior_variance, 1e-20))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = ((1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas)
                                     / (1.0 - self.alphas_cumprod))
        self.mse_loss_weight_type = mse_loss_weight_type
        self.mse_loss_weight = mse_loss_weights(self.alphas_cumprod, model_mean_type, mse_loss_weight_type)
        self._device_cache: Dict[Any, torch.Tensor] = {}
        self._bind_device_table()

    def _bind_device_table(self) -> None:
        # A constant of a compiled step: no copy to the device per call, no recompile when the
        # cache fills (bound to this object: the constant's arguments are then plain values).
        self._device_table = constant_while_traced(self._make_device_table)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__, _device_cache={})
        del state["_device_table"]  # a closure over this object, bound again by __setstate__
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._bind_device_table()

    # -- gathering schedule values --------------------------------------------
    def _extract(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``getattr(self, name)[t]`` on t's device, broadcast to ``like``'s shape.

        float32 (as ADM does), or float64 when ``like`` is float64.
        """
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        out = self._device_table(name, t.device, dtype)[t.long()]
        while out.ndim < like.ndim:
            out = out[..., None]
        return out.expand(like.shape)

    def _make_device_table(self, name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The per-step array ``name`` (a schedule array, or a respaced process's ``timestep_map``),
        or the fused loss's ``[T, K]`` columns (``LOSS_COEFFICIENTS``), on ``device`` in ``dtype``:
        made on the first call and kept."""
        key = (name, device, dtype)
        table = self._device_cache.get(key)
        if table is None:
            if name == LOSS_COEFFICIENTS:
                first = np.zeros(self.num_timesteps)
                first[0] = 1.0
                values = np.stack([first if column == "first_step" else np.asarray(getattr(self, column), np.float64)
                                   for column in COEF_COLUMNS], axis=1)
            else:
                values = np.asarray(getattr(self, name))
            table = self._device_cache[key] = torch.from_numpy(values).to(device=device, dtype=dtype)
        return table

    def _check_t(self, t: torch.Tensor, batch: int) -> None:
        if not isinstance(t, torch.Tensor) or t.ndim != 1 or t.shape[0] != batch:
            raise ValueError(f"t must be a 1-d tensor of {batch} timesteps, got "
                             f"{getattr(t, 'shape', type(t))}")

    # -- forward process --------------------------------------------------------
    def q_mean_variance(self, x_start: torch.Tensor, t: torch.Tensor):
        """Mean, variance and log-variance of q(x_t | x_0)."""
        mean = self._extract("sqrt_alphas_cumprod", t, x_start) * x_start
        variance = self._extract("alphas_cumprod", t, x_start)
        variance = 1.0 - variance
        log_variance = self._extract("log_one_minus_alphas_cumprod", t, x_start)
        return mean, variance, log_variance

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) (with the given noise when passed)."""
        self._check_t(t, x_start.shape[0])
        if noise is None:
            noise = _randn(None, like=x_start, generator=generator)
        elif noise.shape != x_start.shape:
            raise ValueError(f"noise must have the shape of x_start {tuple(x_start.shape)}, "
                             f"got {tuple(noise.shape)}")
        return (self._extract("sqrt_alphas_cumprod", t, x_start) * x_start
                + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start) * noise)

    def q_posterior_mean_variance(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        if x_start.shape != x_t.shape:
            raise ValueError(f"x_start {tuple(x_start.shape)} and x_t {tuple(x_t.shape)} differ in shape")
        mean = (self._extract("posterior_mean_coef1", t, x_t) * x_start
                + self._extract("posterior_mean_coef2", t, x_t) * x_t)
        variance = self._extract("posterior_variance", t, x_t)
        log_variance = self._extract("posterior_log_variance_clipped", t, x_t)
        return mean, variance, log_variance

    # -- reverse process ------------------------------------------------------------
    def _predict_xstart_from_eps(self, x_t, t, eps):
        return (self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t
                - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t) * eps)

    def _predict_xstart_from_xprev(self, x_t, t, xprev):
        # invert the posterior mean: xprev = c1 x0 + c2 x_t
        return ((xprev - self._extract("posterior_mean_coef2", t, x_t) * x_t)
                / self._extract("posterior_mean_coef1", t, x_t))

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return ((self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t - pred_xstart)
                / self._extract("sqrt_recipm1_alphas_cumprod", t, x_t))

    def _call_model(self, model: Callable, x: torch.Tensor, t: torch.Tensor, model_kwargs) -> torch.Tensor:
        out = model(x, t, **(model_kwargs or {}))
        if isinstance(out, tuple):  # (output, extra) models
            out = out[0]
        return out

    def p_mean_variance(self, model: Callable, x: torch.Tensor, t: torch.Tensor, *,
                        clip_denoised: bool = True, denoised_fn: Optional[Callable] = None,
                        model_kwargs: Optional[dict] = None,
                        model_output: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """p(x_{t-1} | x_t): mean, variance, log_variance, pred_xstart (and the raw output).

        ``model_output`` skips the model call (used for the VB term in training).
        """
        B, C = x.shape[:2]
        self._check_t(t, B)
        if model_output is None:
            model_output = self._call_model(model, x, t, model_kwargs)
        model_output = model_output.float() if model_output.dtype in (torch.float16, torch.bfloat16) \
            else model_output
        learned = self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE)
        expect_c = 2 * C if learned else C
        if model_output.shape[0] != B or model_output.shape[1] != expect_c or \
                model_output.shape[2:] != x.shape[2:]:
            raise ValueError(f"model output must have shape {(B, expect_c, *x.shape[2:])} "
                             f"({'learned' if learned else 'fixed'} variance), got {tuple(model_output.shape)}")
        if learned:
            mean_out, var_values = torch.split(model_output, C, dim=1)
            if self.model_var_type == ModelVarType.LEARNED:
                log_variance = var_values
            else:
                min_log = self._extract("posterior_log_variance_clipped", t, x)
                max_log = self._extract("betas_log", t, x)
                frac = (var_values + 1.0) / 2.0
                log_variance = frac * max_log + (1.0 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            mean_out = model_output
            if self.model_var_type == ModelVarType.FIXED_LARGE:
                variance = self._extract("fixed_large_variance", t, x)
                log_variance = self._extract("fixed_large_log_variance", t, x)
            else:
                variance = self._extract("posterior_variance", t, x)
                log_variance = self._extract("posterior_log_variance_clipped", t, x)

        def process(x0):
            if denoised_fn is not None:
                x0 = denoised_fn(x0)
            return x0.clamp(-1, 1) if clip_denoised else x0

        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            pred_xstart = process(self._predict_xstart_from_xprev(x, t, mean_out))
            mean = mean_out
        else:
            if self.model_mean_type == ModelMeanType.START_X:
                pred_xstart = process(mean_out)
            else:
                pred_xstart = process(self._predict_xstart_from_eps(x, t, mean_out))
            mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance,
                "pred_xstart": pred_xstart, "model_output": model_output}

    # derived schedules used by p_mean_variance
    @property
    def betas_log(self) -> np.ndarray:
        return np.log(self.betas)

    @property
    def fixed_large_variance(self) -> np.ndarray:
        return np.append(self.posterior_variance[1], self.betas[1:]) if self.num_timesteps > 1 else self.betas

    @property
    def fixed_large_log_variance(self) -> np.ndarray:
        return np.log(self.fixed_large_variance)

    # -- ancestral (DDPM) sampling ------------------------------------------------------
    def p_sample(self, model, x, t, *, clip_denoised=True, denoised_fn=None, model_kwargs=None,
                 generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """One step x_t -> x_{t-1} (no noise added at t = 0)."""
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                   model_kwargs=model_kwargs)
        noise = _randn(None, like=x, generator=generator)
        nonzero = (t != 0).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def _initial_noise(self, shape, noise, device, generator):
        if noise is not None:
            if tuple(noise.shape) != tuple(shape):
                raise ValueError(f"noise must have shape {tuple(shape)}, got {tuple(noise.shape)}")
            return noise
        return _randn(shape, device=device, generator=generator)

    def _model_device(self, model, device):
        if device is not None:
            return torch.device(device)
        target = getattr(model, "__self__", model)  # bound methods such as forward_with_cfg
        try:
            return next(target.parameters()).device
        except (AttributeError, StopIteration, TypeError):
            return torch.device("cpu")

    def p_sample_loop_progressive(self, model, shape, noise=None, *, clip_denoised=True, denoised_fn=None,
                                  model_kwargs=None, device=None, progress=False,
                                  generator: Optional[torch.Generator] = None) -> Iterator[Dict[str, torch.Tensor]]:
        """Yield p_sample's output at every step, from t = T-1 down to 0."""
        device = self._model_device(model, device)
        img = self._initial_noise(shape, noise, device, generator)
        steps = progress_bar(range(self.num_timesteps - 1, -1, -1), total=self.num_timesteps,
                             desc="sampling", disable=not progress)
        for i in steps:
            t = torch.full((shape[0],), i, device=img.device, dtype=torch.long)
            with torch.no_grad():
                out = self.p_sample(model, img, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                    model_kwargs=model_kwargs, generator=generator)
            yield out
            img = out["sample"]

    def p_sample_loop(self, model, shape, noise=None, *, clip_denoised=True, denoised_fn=None,
                      model_kwargs=None, device=None, progress=False,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Ancestral sampling from pure noise (or ``noise``); returns x_0."""
        final = None
        for final in self.p_sample_loop_progressive(model, shape, noise, clip_denoised=clip_denoised,
                                                    denoised_fn=denoised_fn, model_kwargs=model_kwargs,
                                                    device=device, progress=progress, generator=generator):
            pass
        return final["sample"]

    # -- DDIM sampling ------------------------------------------------------------------
    def ddim_sample(self, model, x, t, *, clip_denoised=True, denoised_fn=None, model_kwargs=None,
                    eta: float = 0.0, generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """One DDIM step x_t -> x_{t-1} (Song et al. eq. 12; eta = 0 is deterministic)."""
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                   model_kwargs=model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        abar = self._extract("alphas_cumprod", t, x)
        abar_prev = self._extract("alphas_cumprod_prev", t, x)
        sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
        mean_pred = out["pred_xstart"] * torch.sqrt(abar_prev) + torch.sqrt(1 - abar_prev - sigma ** 2) * eps
        nonzero = (t != 0).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        sample = mean_pred
        if eta != 0.0:
            sample = sample + nonzero * sigma * _randn(None, like=x, generator=generator)
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample_loop_progressive(self, model, shape, noise=None, *, clip_denoised=True, denoised_fn=None,
                                     model_kwargs=None, device=None, progress=False, eta: float = 0.0,
                                     generator: Optional[torch.Generator] = None):
        device = self._model_device(model, device)
        img = self._initial_noise(shape, noise, device, generator)
        steps = progress_bar(range(self.num_timesteps - 1, -1, -1), total=self.num_timesteps,
                             desc="DDIM sampling", disable=not progress)
        for i in steps:
            t = torch.full((shape[0],), i, device=img.device, dtype=torch.long)
            with torch.no_grad():
                out = self.ddim_sample(model, img, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                       model_kwargs=model_kwargs, eta=eta, generator=generator)
            yield out
            img = out["sample"]

    def ddim_sample_loop(self, model, shape, noise=None, *, clip_denoised=True, denoised_fn=None,
                         model_kwargs=None, device=None, progress=False, eta: float = 0.0,
                         generator: Optional[torch.Generator] = None) -> torch.Tensor:
        final = None
        for final in self.ddim_sample_loop_progressive(model, shape, noise, clip_denoised=clip_denoised,
                                                       denoised_fn=denoised_fn, model_kwargs=model_kwargs,
                                                       device=device, progress=progress, eta=eta,
                                                       generator=generator):
            pass
        return final["sample"]

    # -- losses ---------------------------------------------------------------------------
    def _vb_terms_bpd(self, model, x_start, x_t, t, *, clip_denoised=True, model_kwargs=None,
                      model_output=None) -> Dict[str, torch.Tensor]:
        """Per-sample VB term in bits/dim: KL(q || p) for t > 0, decoder NLL at t = 0."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs,
                                   model_output=model_output)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, means=out["mean"],
                                                   log_scales=0.5 * out["log_variance"])
        nll = mean_flat(nll) / math.log(2.0)
        return {"output": torch.where(t == 0, nll, kl), "pred_xstart": out["pred_xstart"]}

    def fused_loss(self) -> bool:
        """Whether :meth:`training_losses` can take ``backend=`` here: a learned-range
        variance, an epsilon target and the (rescaled) MSE loss, DiT's configuration."""
        return (self.model_var_type == ModelVarType.LEARNED_RANGE and self.model_mean_type == ModelMeanType.EPSILON
                and self.loss_type in (LossType.MSE, LossType.RESCALED_MSE))

    def _loss_coefficients(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``[B, K]``: the schedule values of each sample's timestep that the fused loss
        reads (columns ``edt_kernels.reference.diffusion_loss.COEF_COLUMNS``), one gather."""
        return self._device_table(LOSS_COEFFICIENTS, t.device, dtype)[t.long()]

    def training_losses(self, model: Callable, x_start: torch.Tensor, t: torch.Tensor,
                        model_kwargs: Optional[dict] = None, noise: Optional[torch.Tensor] = None,
                        generator: Optional[torch.Generator] = None,
                        backend: Optional[str] = None) -> Dict[str, torch.Tensor]:
        """Per-sample losses: ``{"loss", "mse", "vb"}`` (each [B]).

        ``mse`` is the weighted term w_t * mean((target - prediction)^2) (w_t from
        ``mse_loss_weight_type``), ``vb`` the unweighted variational-bound term of
        a learned variance, ``loss = mse + vb``. Passing the same ``noise`` to two
        calls noises the batch identically.

        ``backend`` (where :meth:`fused_loss`): ``{"loss"}`` alone, computed by
        ``edt_kernels.diffusion_loss`` on that backend (one kernel instead of the op-by-op
        terms below: the same values up to float rounding); None: the terms op by op.
        """
        self._check_t(t, x_start.shape[0])
        if noise is None:
            noise = _randn(None, like=x_start, generator=generator)
        x_t = self.q_sample(x_start, t, noise=noise)
        terms: Dict[str, torch.Tensor] = {}
        if backend is not None and self.fused_loss():
            model_output = self._call_model(model, x_t, t, model_kwargs)
            if model_output.dtype in (torch.float16, torch.bfloat16):
                model_output = model_output.float()
            vb_scale = self.num_timesteps / 1000.0 if self.loss_type == LossType.RESCALED_MSE else 1.0
            coef = self._loss_coefficients(t, model_output.dtype)
            terms["loss"] = diffusion_loss(model_output, x_start, x_t, noise, coef, vb_scale, backend=backend)
            return terms
        if self.loss_type.is_vb():
            terms["loss"] = self._vb_terms_bpd(model, x_start, x_t, t, clip_denoised=False,
                                               model_kwargs=model_kwargs)["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] = terms["loss"] * self.num_timesteps
            return terms

        model_output = self._call_model(model, x_t, t, model_kwargs)
        if model_output.dtype in (torch.float16, torch.bfloat16):
            model_output = model_output.float()
        C = x_start.shape[1]
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            if model_output.shape[1] != 2 * C:
                raise ValueError(f"a learned-variance model must output {2 * C} channels, "
                                 f"got {tuple(model_output.shape)}")
            mean_out, var_values = torch.split(model_output, C, dim=1)
            # The VB term trains only the variance: the mean goes through a stop-gradient.
            frozen = torch.cat([mean_out.detach(), var_values], dim=1)
            terms["vb"] = self._vb_terms_bpd(None, x_start, x_t, t, clip_denoised=False,
                                             model_output=frozen)["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)
        else:
            mean_out = model_output
        if self.model_mean_type == ModelMeanType.EPSILON:
            target = noise
        elif self.model_mean_type == ModelMeanType.START_X:
            target = x_start
        else:
            target = self.q_posterior_mean_variance(x_start, x_t, t)[0]
        if mean_out.shape != target.shape:
            raise ValueError(f"model output (mean part) {tuple(mean_out.shape)} does not match "
                             f"the target {tuple(target.shape)}")
        mse = mean_flat((target - mean_out) ** 2)
        terms["mse"] = self._extract("mse_loss_weight", t, mse) * mse
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    # -- likelihood (for evaluation) ------------------------------------------------------
    def prior_bpd(self, x_start: torch.Tensor) -> torch.Tensor:
        """KL(q(x_T | x_0) || N(0, I)) in bits/dim, per sample."""
        t = torch.full((x_start.shape[0],), self.num_timesteps - 1, device=x_start.device, dtype=torch.long)
        mean, _, log_var = self.q_mean_variance(x_start, t)
        return mean_flat(normal_kl(mean, log_var, 0.0, 0.0)) / math.log(2.0)
