"""Which timesteps a training batch uses: ADM's schedule samplers.

``create_named_schedule_sampler(name, diffusion)`` with ``name``

* ``"uniform"``: t ~ U{0, ..., T-1}, importance weights all 1 (DiT, MDT);
* ``"loss-second-moment"``: importance sampling of the timesteps in
  proportion to the root mean square of each timestep's recent losses
  (Nichol & Dhariwal 2021, "Improved DDPM", section 3.3; the default of the
  authors' EDT training script). Each timestep keeps its last
  ``history_per_term`` (10) losses; until every timestep has that many the
  distribution is uniform, afterwards

      p_t = (1 - u) * sqrt(mean_k loss_{t,k}^2) / sum_s sqrt(mean_k loss_{s,k}^2) + u / T,

  with u = ``uniform_prob`` (0.001).

``sampler.sample(B, device)`` returns ``(t, w)`` with ``w = 1 / (T p_t)``: the
losses of a batch multiplied by ``w`` have, in expectation, the mean of the
uniformly sampled objective. After the loss of a step, a loss-aware sampler is
told the per-sample losses with ``update_with_local_losses(t, losses)`` (from
every rank; the losses of all ranks are gathered so every rank keeps the same
history) or ``update_with_all_losses(ts, losses)`` (no communication).
``state_dict()`` / ``load_state_dict()`` save and restore the history for an
exact resume.

Interface and semantics follow ADM (openai/guided-diffusion,
``guided_diffusion/resample.py``). One addition: ``sample(..., generator=g)``
draws from a ``torch.Generator`` (``torch.multinomial`` on the same
probabilities) for reproducible runs; without it the draw is ADM's
``np.random.choice`` on the global numpy RNG.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    "ScheduleSampler",
    "UniformSampler",
    "LossAwareSampler",
    "LossSecondMomentResampler",
    "create_named_schedule_sampler",
    "SCHEDULE_SAMPLERS",
]

#: Names accepted by create_named_schedule_sampler.
SCHEDULE_SAMPLERS = ("uniform", "loss-second-moment")


def _num_timesteps(diffusion_or_steps: Any) -> int:
    """T from a diffusion object (its ``num_timesteps``) or from an int."""
    steps = getattr(diffusion_or_steps, "num_timesteps", diffusion_or_steps)
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise TypeError("expected a diffusion object with num_timesteps or an int number of timesteps, "
                        f"got {type(diffusion_or_steps).__name__}")
    if steps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {steps}")
    return int(steps)


def _check_batch_size(batch_size: Any) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return int(batch_size)


class ScheduleSampler(ABC):
    """A distribution over the timesteps of a diffusion process.

    By default the sampling is unbiased importance sampling: ``sample`` returns
    the weights 1 / (T p_t) that keep the objective's mean unchanged.
    """

    num_timesteps: int

    @abstractmethod
    def weights(self) -> np.ndarray:
        """Unnormalised positive weights, float64 numpy [T]; p_t = weights / weights.sum()."""

    def sample(self, batch_size: int, device=None,
               generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Importance-sample ``batch_size`` timesteps.

        Returns ``(t, w)``: int64 [B] timesteps and float32 [B] loss weights
        ``1 / (T p_t)``, both on ``device``.
        """
        batch_size = _check_batch_size(batch_size)
        w = np.asarray(self.weights(), dtype=np.float64)
        p = w / np.sum(w)
        if generator is None:
            indices_np = np.random.choice(len(p), size=(batch_size,), p=p)
        else:
            probs = torch.from_numpy(p).to(generator.device)
            indices_np = torch.multinomial(probs, batch_size, replacement=True,
                                           generator=generator).cpu().numpy()
        indices = torch.from_numpy(np.asarray(indices_np, dtype=np.int64)).to(device)
        weights_np = 1.0 / (len(p) * p[indices_np])
        weights = torch.from_numpy(weights_np).float().to(device)
        return indices, weights


class UniformSampler(ScheduleSampler):
    """t ~ U{0, ..., T-1}, importance weights all 1.

    ``UniformSampler(diffusion)`` as in ADM, or ``UniformSampler(num_timesteps)``.
    """

    def __init__(self, diffusion_or_num_timesteps):
        self.diffusion = diffusion_or_num_timesteps
        self.num_timesteps = _num_timesteps(diffusion_or_num_timesteps)
        self._weights = np.ones([self.num_timesteps], dtype=np.float64)

    def weights(self) -> np.ndarray:
        return self._weights

    def sample(self, batch_size: int, device=None,
               generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(timesteps int64 [B], weights float32 [B] all 1) on ``device``.

        The same distribution as the generic importance sampler, drawn with
        ``torch.randint`` (from ``generator`` when given).
        """
        batch_size = _check_batch_size(batch_size)
        gen_device = generator.device if generator is not None else device
        t = torch.randint(0, self.num_timesteps, (batch_size,), generator=generator, device=gen_device)
        t = t.to(device) if device is not None else t
        return t, torch.ones(batch_size, dtype=torch.float32, device=t.device)

    def state_dict(self) -> Dict[str, Any]:
        return {"kind": "uniform", "num_timesteps": self.num_timesteps}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state.get("kind") != "uniform" or int(state.get("num_timesteps", -1)) != self.num_timesteps:
            raise ValueError(f"state is not that of a uniform sampler over {self.num_timesteps} timesteps: "
                             f"kind={state.get('kind')!r}, num_timesteps={state.get('num_timesteps')!r}")


def _world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


class LossAwareSampler(ScheduleSampler):
    """A sampler whose distribution follows the losses the model reports."""

    def update_with_local_losses(self, local_ts: torch.Tensor, local_losses: torch.Tensor) -> None:
        """Record this rank's per-sample losses; call it on every rank.

        When ``torch.distributed`` is initialised, the (timestep, loss) pairs of
        all ranks are gathered in rank order (batches padded to the largest
        and cut back), so every rank applies the same update; otherwise the
        local pairs are applied directly.
        """
        if not isinstance(local_ts, torch.Tensor) or not isinstance(local_losses, torch.Tensor):
            raise TypeError("local_ts and local_losses must be tensors")
        if local_ts.ndim != 1 or local_losses.shape != local_ts.shape:
            raise ValueError("local_ts and local_losses must be 1-d tensors of one length, got shapes "
                             f"{tuple(local_ts.shape)} and {tuple(local_losses.shape)}")
        local_losses = local_losses.detach()
        world = _world_size()
        if world == 1:
            self.update_with_all_losses(local_ts.tolist(), local_losses.tolist())
            return
        device = local_ts.device
        batch_sizes = [torch.tensor([0], dtype=torch.int32, device=device) for _ in range(world)]
        dist.all_gather(batch_sizes, torch.tensor([len(local_ts)], dtype=torch.int32, device=device))
        sizes = [int(x.item()) for x in batch_sizes]
        max_bs = max(sizes)
        # all_gather needs equal shapes: pad to the largest batch, cut back after.
        padded_ts = torch.zeros(max_bs, dtype=local_ts.dtype, device=device)
        padded_ts[:len(local_ts)] = local_ts
        padded_losses = torch.zeros(max_bs, dtype=local_losses.dtype, device=local_losses.device)
        padded_losses[:len(local_losses)] = local_losses
        timestep_batches = [torch.zeros_like(padded_ts) for _ in sizes]
        loss_batches = [torch.zeros_like(padded_losses) for _ in sizes]
        dist.all_gather(timestep_batches, padded_ts)
        dist.all_gather(loss_batches, padded_losses)
        timesteps = [x.item() for y, bs in zip(timestep_batches, sizes) for x in y[:bs]]
        losses = [x.item() for y, bs in zip(loss_batches, sizes) for x in y[:bs]]
        self.update_with_all_losses(timesteps, losses)

    @abstractmethod
    def update_with_all_losses(self, ts: Sequence[int], losses: Sequence[float]) -> None:
        """Apply the losses of all ranks (identical on every rank); deterministic, no communication."""


class LossSecondMomentResampler(LossAwareSampler):
    """p_t proportional to sqrt(E[loss_t^2]) over the last ``history_per_term`` losses, mixed
    with ``uniform_prob`` of the uniform distribution; uniform until every timestep has a full history."""

    def __init__(self, diffusion_or_num_timesteps, history_per_term: int = 10, uniform_prob: float = 0.001):
        self.diffusion = diffusion_or_num_timesteps
        self.num_timesteps = _num_timesteps(diffusion_or_num_timesteps)
        if isinstance(history_per_term, bool) or not isinstance(history_per_term, (int, np.integer)) \
                or history_per_term < 1:
            raise ValueError(f"history_per_term must be a positive int, got {history_per_term!r}")
        if not (0.0 <= float(uniform_prob) <= 1.0):
            raise ValueError(f"uniform_prob must lie in [0, 1], got {uniform_prob!r}")
        self.history_per_term = int(history_per_term)
        self.uniform_prob = float(uniform_prob)
        self._loss_history = np.zeros([self.num_timesteps, self.history_per_term], dtype=np.float64)
        self._loss_counts = np.zeros([self.num_timesteps], dtype=np.int64)

    def weights(self) -> np.ndarray:
        if not self._warmed_up():
            return np.ones([self.num_timesteps], dtype=np.float64)
        weights = np.sqrt(np.mean(self._loss_history ** 2, axis=-1))
        total = np.sum(weights)
        if not total > 0:
            # every recorded loss is 0: no timestep is preferred
            return np.ones([self.num_timesteps], dtype=np.float64)
        weights = weights / total
        weights *= 1 - self.uniform_prob
        weights += self.uniform_prob / len(weights)
        return weights

    def update_with_all_losses(self, ts: Sequence[int], losses: Sequence[float]) -> None:
        ts, losses = list(ts), list(losses)
        if len(ts) != len(losses):
            raise ValueError(f"ts and losses must have one length, got {len(ts)} and {len(losses)}")
        for t, loss in zip(ts, losses):
            t = int(t)
            if not 0 <= t < self.num_timesteps:
                raise ValueError(f"timestep {t} outside [0, {self.num_timesteps})")
            if not math.isfinite(float(loss)):
                raise ValueError(f"non-finite loss {loss} at timestep {t}")
        for t, loss in zip(ts, losses):
            t = int(t)
            if self._loss_counts[t] == self.history_per_term:
                # shift out the oldest loss
                self._loss_history[t, :-1] = self._loss_history[t, 1:]
                self._loss_history[t, -1] = loss
            else:
                self._loss_history[t, self._loss_counts[t]] = loss
                self._loss_counts[t] += 1

    def _warmed_up(self) -> bool:
        return bool((self._loss_counts == self.history_per_term).all())

    def state_dict(self) -> Dict[str, Any]:
        """The loss history and counts (torch tensors, loadable with ``torch.load(weights_only=True)``)."""
        return {
            "kind": "loss-second-moment",
            "num_timesteps": self.num_timesteps,
            "history_per_term": self.history_per_term,
            "uniform_prob": self.uniform_prob,
            "loss_history": torch.from_numpy(self._loss_history.copy()),
            "loss_counts": torch.from_numpy(self._loss_counts.copy()),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        expected = {"kind": "loss-second-moment", "num_timesteps": self.num_timesteps,
                    "history_per_term": self.history_per_term, "uniform_prob": self.uniform_prob}
        for key, value in expected.items():
            if key not in state or state[key] != value:
                raise ValueError(f"sampler state has {key}={state.get(key)!r}, this sampler {value!r}")
        history = np.asarray(torch.as_tensor(state["loss_history"]).cpu().numpy(), dtype=np.float64)
        counts = np.asarray(torch.as_tensor(state["loss_counts"]).cpu().numpy(), dtype=np.int64)
        if history.shape != self._loss_history.shape or counts.shape != self._loss_counts.shape:
            raise ValueError(f"sampler state shapes {history.shape}, {counts.shape} do not match "
                             f"{self._loss_history.shape}, {self._loss_counts.shape}")
        if (counts < 0).any() or (counts > self.history_per_term).any():
            raise ValueError(f"sampler state loss_counts must lie in [0, {self.history_per_term}]")
        self._loss_history = history.copy()
        self._loss_counts = counts.copy()


def create_named_schedule_sampler(name: str, diffusion) -> Union[UniformSampler, LossSecondMomentResampler]:
    """``"uniform"`` or ``"loss-second-moment"`` (ADM's defaults: 10 losses per timestep, uniform mix 0.001)."""
    if name == "uniform":
        return UniformSampler(diffusion)
    if name == "loss-second-moment":
        return LossSecondMomentResampler(diffusion)
    raise ValueError(f"unknown schedule sampler {name!r}; expected one of {', '.join(map(repr, SCHEDULE_SAMPLERS))}")
