"""Timestep respacing: sample with a subset of the training timesteps.

Keeping the timesteps S = {s_0 < s_1 < ...} of a T-step process and setting
beta'_k = 1 - abar_{s_k} / abar_{s_{k-1}} gives a shorter process whose
cumulative products are exactly abar at the kept steps (Nichol & Dhariwal 2021,
section 4). The model still sees the original timestep numbers.
"""
from __future__ import annotations

from typing import Callable, Iterable, List, Set, Union

import numpy as np
import torch

from .gaussian_diffusion import GaussianDiffusion

__all__ = ["space_timesteps", "SpacedDiffusion"]


def space_timesteps(num_timesteps: int, section_counts: Union[str, Iterable[int]]) -> Set[int]:
    """Which of ``num_timesteps`` steps to keep.

    ``section_counts`` is ``"ddimN"`` (a constant stride giving exactly N steps,
    as DDIM does), a comma-separated string like ``"10,15,20"`` or a list of
    ints: the process is cut into that many equal sections and each section
    keeps that many evenly spaced steps. ``"250"`` keeps 250 evenly spaced steps.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"cannot keep exactly {desired} of {num_timesteps} steps with a constant stride")
        counts: List[int] = [int(x) for x in section_counts.split(",") if x.strip()]
    else:
        counts = [int(x) for x in section_counts]
    if not counts:
        raise ValueError("section_counts is empty")
    size_per, extra = divmod(num_timesteps, len(counts))
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if count < 1 or count > size:
            raise ValueError(f"cannot keep {count} steps from a section of {size} steps")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        kept.extend(start + round(k * stride) for k in range(count))
        start += size
    return set(kept)


class _MappedModel:
    """Calls the model with the original timestep numbers of the kept steps.

    ``timestep_map(device)`` gives the kept steps as a tensor on ``device``, made there once:
    a step reads it where ``t`` lives, with no copy from the host per call (a copy that would
    wait for the device, and a host tensor in a compiled step, which CUDA graphs cannot take)."""

    def __init__(self, model: Callable, timestep_map: Callable[[torch.device], torch.Tensor]):
        self.model = model
        self.timestep_map = timestep_map

    def __call__(self, x, t, **kwargs):
        table = self.timestep_map(t.device)
        return self.model(x, table[t.long()].to(t.dtype), **kwargs)

    def parameters(self):  # lets the sampler find the model's device
        target = getattr(self.model, "__self__", self.model)
        return target.parameters()


class SpacedDiffusion(GaussianDiffusion):
    """A diffusion process restricted to the timesteps ``use_timesteps`` of a base process."""

    def __init__(self, use_timesteps: Iterable[int], *, betas, **kwargs):
        base = GaussianDiffusion(betas=betas, **kwargs)
        keep = sorted(set(int(s) for s in use_timesteps))
        if not keep or keep[0] < 0 or keep[-1] >= base.num_timesteps:
            raise ValueError(f"use_timesteps must be a non-empty subset of [0, {base.num_timesteps})")
        self.use_timesteps = set(keep)
        self.original_num_steps = base.num_timesteps
        self.timestep_map = keep
        new_betas, last = [], 1.0
        for s in keep:
            abar = base.alphas_cumprod[s]
            new_betas.append(1.0 - abar / last)
            last = abar
        super().__init__(betas=np.array(new_betas), **kwargs)

    def _timestep_map_on(self, device: torch.device) -> torch.Tensor:
        """``timestep_map`` as int64 on ``device`` (one of the diffusion's device tables)."""
        return self._device_table("timestep_map", device, torch.long)

    def _wrap(self, model):
        if model is None or isinstance(model, _MappedModel):
            return model
        return _MappedModel(model, self._timestep_map_on)

    def p_mean_variance(self, model, *args, **kwargs):
        return super().p_mean_variance(self._wrap(model), *args, **kwargs)

    def training_losses(self, model, *args, **kwargs):
        return super().training_losses(self._wrap(model), *args, **kwargs)
