"""Activation checkpointing of the transformer blocks of EDT and MDTv2.

A training forward keeps, for every block, the tensors its backward reads:
the block input, the modulated LayerNorm outputs, qkv, the attention output,
the MLP's 4C-wide hidden tensor, ...  Checkpointing trades memory for
recomputation:

- ``"none"``: nothing is recomputed;
- ``"all"`` (or ``1``): every block keeps its inputs only and is run again in
  the backward;
- ``k`` (an int >= 2): the same for every k-th block (blocks 0, k, 2k, ...
  of the model's flat block order);
- ``"selective"``: every block keeps the outputs of its matmuls (linear
  layers, attention) and recomputes the elementwise work between them
  (LayerNorm + modulation, GELU, gated residuals) in the backward.

The checkpoint is PyTorch's non-reentrant one (``use_reentrant=False``), so it
composes with DDP, ``torch.compile`` and inputs that do not require grad.  The
random draws of masked training (label dropout, token masks) are made outside
the blocks, and the RNG state is preserved around each checkpointed block
anyway, so the recomputation sees the same values: results and gradients are
those of the run without checkpointing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch
import torch.nn as nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

__all__ = ["CheckpointSetting", "CheckpointSpec", "parse_checkpoint", "run_block", "SELECTIVE_SAVED_OPS"]

CheckpointSpec = Union[None, str, int]

_aten = torch.ops.aten


def _matmul_ops():
    ops = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default,
           _aten.convolution.default, _aten._scaled_dot_product_flash_attention.default,
           _aten._scaled_dot_product_efficient_attention.default,
           _aten._scaled_dot_product_flash_attention_for_cpu.default}
    # the edt_kernels attention forwards (whichever backends this build registers)
    for name in ("amm_attention_cpp_fwd", "amm_attention_triton_fwd", "amm_attention_triton_qkvpacked_fwd"):
        op = getattr(torch.ops.edt_kernels, name, None)
        if op is not None:
            ops.add(op.default)
    return frozenset(ops)


# Ops whose outputs "selective" keeps: the matmuls and the attention; every
# other op of a block is recomputed in the backward.
SELECTIVE_SAVED_OPS = _matmul_ops()


def _selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SELECTIVE_SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


@dataclass(frozen=True)
class CheckpointSetting:
    """Which blocks are checkpointed (``every``: every ``every``-th, 0: none)
    and how (``selective``: matmul outputs kept)."""

    every: int = 0
    selective: bool = False

    @property
    def enabled(self) -> bool:
        return self.every > 0

    def covers(self, index: int) -> bool:
        return self.every > 0 and index % self.every == 0

    def __str__(self) -> str:
        if not self.enabled:
            return "none"
        if self.selective:
            return "selective"
        return "all" if self.every == 1 else f"every {self.every}"


def parse_checkpoint(value: CheckpointSpec) -> CheckpointSetting:
    """``None``/``"none"``, ``"all"``, ``"selective"``, or an int ``k >= 1``
    (every k-th block; a digit string is read as that int)."""
    if isinstance(value, CheckpointSetting):
        return value
    if value is None:
        return CheckpointSetting()
    if isinstance(value, bool):
        raise TypeError(f"checkpoint must be None, 'none', 'all', 'selective' or an int k >= 1, got {value!r}")
    if isinstance(value, str):
        v = value.strip().lower()
        if v == "none":
            return CheckpointSetting()
        if v == "all":
            return CheckpointSetting(1)
        if v == "selective":
            return CheckpointSetting(1, selective=True)
        if v.isdigit():
            value = int(v)
        else:
            raise ValueError(f"checkpoint must be 'none', 'all', 'selective' or an int k >= 1, got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"checkpoint every k-th block needs k >= 1, got {value}")
        return CheckpointSetting(value)
    raise TypeError(f"checkpoint must be None, 'none', 'all', 'selective' or an int k >= 1, "
                    f"got {type(value).__name__}")


def run_block(block: nn.Module, index: int, setting: CheckpointSetting, *args, **kwargs) -> torch.Tensor:
    """``block(*args, **kwargs)``, checkpointed when ``setting`` covers block
    ``index`` and gradients are being recorded."""
    if not (setting.covers(index) and torch.is_grad_enabled()):
        return block(*args, **kwargs)
    if setting.selective:
        return checkpoint(block, *args, use_reentrant=False, preserve_rng_state=True,
                          context_fn=_selective_contexts, **kwargs)
    return checkpoint(block, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)


def _selective_contexts():
    return create_selective_checkpoint_contexts(_selective_policy)

