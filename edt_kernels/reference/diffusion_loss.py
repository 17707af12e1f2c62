"""Plain-PyTorch definition of the per-sample training loss of a DiT diffusion
(learned-range variance, epsilon prediction: ADM's ``mse + vb``), from the
schedule values of each sample's timestep.

``coef`` ``[B, K]`` holds, per sample, the values at its timestep of (column
order :data:`COEF_COLUMNS`): ``sqrt(1/abar)``, ``sqrt(1/abar - 1)``, the two
posterior-mean coefficients, the clipped posterior log-variance (the true
log-variance and the lower end of the learned range), ``log(beta)`` (the upper
end), the MSE weight, and 1 at the first timestep (else 0).  With
``output = [eps, v]`` (``[B, 2C, ...]``)::

    log_var = (v + 1)/2 * log(beta) + (1 - (v + 1)/2) * min_log
    mean    = c1 * (sqrt(1/abar) x_t - sqrt(1/abar - 1) eps.detach()) + c2 x_t   (p's mean)
    vb      = mean(KL(q(x_{t-1}|x_t, x_0) || p)) / ln 2, or at t = 0 the
              discretized-Gaussian NLL of x_0 under p (ln-scale log_var / 2), / ln 2
    loss    = w_t mean((noise - eps)^2) + vb_scale * vb

The VB term trains the variance only (the mean goes through a stop-gradient).
"""
from __future__ import annotations

import math

import torch

__all__ = ["COEF_COLUMNS", "reference_diffusion_loss"]

COEF_COLUMNS = ("sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_mean_coef1",
                "posterior_mean_coef2", "posterior_log_variance_clipped", "betas_log", "mse_loss_weight",
                "first_step")
HALF_BIN = 1.0 / 255.0  # half the width of a bin of 8-bit data in [-1, 1]
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of the standard normal CDF (ADM / PixelCNN++)."""
    return 0.5 * (1.0 + torch.tanh(SQRT_2_OVER_PI * (x + 0.044715 * x.pow(3))))


def reference_diffusion_loss(output: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor,
                             noise: torch.Tensor, coef: torch.Tensor, vb_scale: float) -> torch.Tensor:
    """Per-sample loss ``[B]`` (module docstring); differentiable in ``output``."""
    B, C = x_start.shape[:2]
    eps, v = output.split(C, dim=1)
    c = coef.to(output.dtype).reshape(B, coef.shape[1], *([1] * (output.dim() - 1))).unbind(1)
    rcp, rcpm1, c1, c2, min_log, max_log, weight, first = c
    dims = tuple(range(1, output.dim()))
    frac = (v + 1.0) / 2.0
    log_var = frac * max_log + (1.0 - frac) * min_log
    model_mean = c1 * (rcp * x_t - rcpm1 * eps.detach()) + c2 * x_t
    true_mean = c1 * x_start + c2 * x_t
    kl = 0.5 * (-1.0 + log_var - min_log + torch.exp(min_log - log_var)
                + (true_mean - model_mean) ** 2 * torch.exp(-log_var))
    centered = x_start - model_mean
    inv_std = torch.exp(-0.5 * log_var)
    cdf_plus = _normal_cdf(inv_std * (centered + HALF_BIN))
    cdf_min = _normal_cdf(inv_std * (centered - HALF_BIN))
    log_probs = torch.where(x_start < -0.999, torch.log(cdf_plus.clamp(min=1e-12)),
                            torch.where(x_start > 0.999, torch.log((1.0 - cdf_min).clamp(min=1e-12)),
                                        torch.log((cdf_plus - cdf_min).clamp(min=1e-12))))
    vb = torch.where(first.reshape(B) != 0, -log_probs.mean(dims), kl.mean(dims)) / math.log(2.0)
    mse = ((noise - eps) ** 2).mean(dims)
    return weight.reshape(B) * mse + vb_scale * vb
