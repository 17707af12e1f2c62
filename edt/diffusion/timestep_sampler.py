"""Which timesteps a training batch uses (uniform, as DiT/MDT/EDT train)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["UniformSampler", "create_named_schedule_sampler"]


class UniformSampler:
    """t ~ U{0, ..., T-1}, importance weights all 1."""

    def __init__(self, num_timesteps: int):
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
        self.num_timesteps = int(num_timesteps)

    def weights(self) -> torch.Tensor:
        return torch.ones(self.num_timesteps, dtype=torch.float64)

    def sample(self, batch_size: int, device=None,
               generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(timesteps int64 [B], weights float32 [B]) on ``device``."""
        gen_device = generator.device if generator is not None else device
        t = torch.randint(0, self.num_timesteps, (batch_size,), generator=generator, device=gen_device)
        t = t.to(device) if device is not None else t
        return t, torch.ones(batch_size, dtype=torch.float32, device=t.device)


def create_named_schedule_sampler(name: str, diffusion) -> UniformSampler:
    if name == "uniform":
        return UniformSampler(diffusion.num_timesteps)
    raise ValueError(f"unknown schedule sampler {name!r}; expected 'uniform'")
