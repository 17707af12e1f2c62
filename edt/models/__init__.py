"""EDT and MDTv2 diffusion transformers on ``edt_kernels``.

    >>> from edt.models import create_model
    >>> model = create_model("EDT-S/2")            # published configuration
    >>> out = model(x, t, y)                        # (B, 8, 32, 32)
    >>> loss_input = model(x, t, y, enable_mask=True)  # masked-training forward

Every model has ``forward(x, t, y, enable_mask=False, generator=None)``,
``forward_with_cfg(x, t, y, cfg_scale, ...)``, ``set_amm(enabled, blocks)``,
``get_flops()`` and a ``backend`` attribute (``"auto"``: the edt_kernels
kernels; ``"eager"``: the authors' code path), also a constructor argument,
that every op of a forward runs on (:class:`edt.models.common.DiffusionTransformer`
holds what the two models share).  State-dict keys and shapes are those of the
published checkpoints.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping

import torch
import torch.nn as nn

from .edt import EDT, EDT_models
from .flops import edt_flops, mdt_flops, measured_macs
from .mdt import MDTv2, MDTv2_models

__all__ = ["EDT", "MDTv2", "EDT_models", "MDTv2_models", "all_models", "create_model",
           "load_state_dict_strict", "edt_flops", "mdt_flops", "measured_macs"]

all_models: Dict[str, Any] = {**EDT_models, **MDTv2_models}


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model by its published name (``"EDT-S/2"``,
    ``"MDTv2-XL/2"``, ...); keyword arguments override the configuration."""
    if name not in all_models:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(sorted(all_models))}")
    return all_models[name](**kwargs)


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                           what: str = "checkpoint") -> None:
    """Load a checkpoint's state dict, requiring the exact keys and shapes.

    Accepts a bare state dict or a training checkpoint with an ``"ema"`` or
    ``"model"`` entry (EMA preferred, as the authors sample from it); a DDP
    ``module.`` prefix is dropped.  Raises ``ValueError`` naming the missing,
    unexpected and mis-shaped keys (the first ten of each)."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
    for key in ("ema", "model"):
        if key in state_dict and isinstance(state_dict[key], Mapping):
            state_dict = state_dict[key]
            break
    state_dict = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k}: checkpoint {list(state_dict[k].shape)} vs model {list(own[k].shape)}"
              for k in own if k in state_dict and hasattr(state_dict[k], "shape")
              and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        def head(items):
            return ", ".join(items[:10]) + (f", ... ({len(items)} in all)" if len(items) > 10 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {head(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {head(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches: {head(shapes)}")
        raise ValueError(f"{what} does not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state_dict, strict=True)
