"""Gaussian diffusion (ADM / DiT formulation) used to train and sample EDT and MDTv2.

    >>> from edt.diffusion import create_diffusion
    >>> train_diffusion = create_diffusion(timestep_respacing="")      # 1000 steps
    >>> sample_diffusion = create_diffusion(timestep_respacing="250")  # respaced DDPM
"""
from __future__ import annotations

from typing import Iterable, Optional, Union

from .gaussian_diffusion import (  # noqa: F401
    DEFAULT_MSE_LOSS_WEIGHT_TYPE,
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    get_named_beta_schedule,
    mse_loss_weights,
)
from .respace import SpacedDiffusion, space_timesteps  # noqa: F401
from .timestep_sampler import (  # noqa: F401
    SCHEDULE_SAMPLERS,
    LossAwareSampler,
    LossSecondMomentResampler,
    ScheduleSampler,
    UniformSampler,
    create_named_schedule_sampler,
)

#: Training length of the published models (DiT, MDT, EDT).
DEFAULT_DIFFUSION_STEPS = 1000


def create_diffusion(timestep_respacing: Optional[Union[str, Iterable[int]]] = "",
                     noise_schedule: str = "linear", use_kl: bool = False, sigma_small: bool = False,
                     predict_xstart: bool = False, learn_sigma: bool = True,
                     rescale_learned_sigmas: bool = False,
                     diffusion_steps: int = DEFAULT_DIFFUSION_STEPS,
                     mse_loss_weight_type: str = DEFAULT_MSE_LOSS_WEIGHT_TYPE) -> SpacedDiffusion:
    """The DiT diffusion: ``timestep_respacing`` "" / None keeps all steps, "250" or "ddim50" respaces.

    ``mse_loss_weight_type``: ``"min_snr_5"`` (Min-SNR weighting of the MSE term,
    the default of EDT's and MDTv2's training code) or ``"constant"`` (DiT's
    unweighted loss); it only changes ``training_losses``.
    """
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    if use_kl:
        loss_type = LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = LossType.RESCALED_MSE
    else:
        loss_type = LossType.MSE
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [diffusion_steps]
    if learn_sigma:
        var_type = ModelVarType.LEARNED_RANGE
    else:
        var_type = ModelVarType.FIXED_SMALL if sigma_small else ModelVarType.FIXED_LARGE
    return SpacedDiffusion(
        space_timesteps(diffusion_steps, timestep_respacing),
        betas=betas,
        model_mean_type=ModelMeanType.START_X if predict_xstart else ModelMeanType.EPSILON,
        model_var_type=var_type,
        loss_type=loss_type,
        mse_loss_weight_type=mse_loss_weight_type,
    )
