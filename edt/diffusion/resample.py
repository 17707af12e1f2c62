"""ADM's module name for the schedule samplers (``guided_diffusion.resample``); see timestep_sampler."""
from .timestep_sampler import (  # noqa: F401
    SCHEDULE_SAMPLERS,
    LossAwareSampler,
    LossSecondMomentResampler,
    ScheduleSampler,
    UniformSampler,
    create_named_schedule_sampler,
)

__all__ = ["ScheduleSampler", "UniformSampler", "LossAwareSampler", "LossSecondMomentResampler",
           "create_named_schedule_sampler", "SCHEDULE_SAMPLERS"]
