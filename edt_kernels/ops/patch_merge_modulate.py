"""EDT's down-sampling front end in one kernel::

    merge2x2(x) -> LayerNorm(4C, no affine) -> * (1 + scale) + shift -> * keep_mask

Its kernels are those of ``layernorm_modulate`` with ``MERGE``: they read the
2x2 patch-merged row straight from the ``[B, H*W, C]`` input and write the
input gradient back to the same places.  Custom ops
``edt_kernels::patch_merge_modulate(Tensor x, Tensor shift, Tensor scale,
Tensor? keep_mask, SymInt height, SymInt width, float eps) -> Tensor`` and its
``_backward`` (``dx`` like x, ``dshift``/``dscale`` float32 ``[B, 4C]``).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import _validation as V
from ..backends import OpCall
from ._triton_utils import dispatch, promote, register_op
from ..amm import GridLike, normalize_grid
from ..reference.tokens import merged_keep_multiplier, reference_patch_merge, reference_patch_merge_modulate
from .layernorm_modulate import ln_modulate_backward, ln_modulate_forward

__all__ = ["patch_merge_modulate"]


# ============================================================================ custom ops

@torch.library.custom_op("edt_kernels::patch_merge_modulate", mutates_args=())
def _patch_merge_op(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                    keep_mask: Optional[torch.Tensor], height: int, width: int,
                    eps: float) -> torch.Tensor:
    return ln_modulate_forward(x, shift, scale, eps, keep=keep_mask, merge_width=width)


@_patch_merge_op.register_fake
def _(x, shift, scale, keep_mask, height, width, eps):
    B, L, C = x.shape
    return x.new_empty((B, L // 4, 4 * C), dtype=promote(x, shift, scale))


@torch.library.custom_op("edt_kernels::patch_merge_modulate_backward", mutates_args=())
def _patch_merge_bwd_op(dout: torch.Tensor, x: torch.Tensor, scale: torch.Tensor,
                        keep_mask: Optional[torch.Tensor], height: int, width: int,
                        eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    return ln_modulate_backward(dout, x, scale, eps, keep=keep_mask, merge_width=width)


@_patch_merge_bwd_op.register_fake
def _(dout, x, scale, keep_mask, height, width, eps):
    B, C4 = x.shape[0], 4 * x.shape[2]
    return x.new_empty(x.shape), x.new_empty((B, 2, C4), dtype=torch.float32)


def _merge_setup(ctx, inputs, output):
    x, shift, scale, keep_mask, height, width, eps = inputs
    ctx.save_for_backward(x, scale, keep_mask)
    ctx.geometry = (height, width, eps)
    ctx.shift_dtype = shift.dtype


def _merge_backward(ctx, dout):
    x, scale, keep_mask = ctx.saved_tensors
    dx, dmod = _patch_merge_bwd_op(dout, x, scale, keep_mask, *ctx.geometry)
    dshift, dscale = dmod.unbind(1)
    return dx, dshift.to(ctx.shift_dtype), dscale.to(scale.dtype), None, None, None, None


_patch_merge_op.register_autograd(_merge_backward, setup_context=_merge_setup)

# ============================================================================ torch backend

class _PatchMergeModulateTorch(torch.autograd.Function):
    """The reference's forward, op for op (bit-equal), keeping for the backward
    only x, scale, the keep mask as given and the row statistics (mean, rstd):
    the merged and normalised rows and the mask spread over the channels are
    recomputed from them instead of being saved (the reference keeps all three)."""

    @staticmethod
    def forward(ctx, x, shift, scale, keep_mask, H, W, eps):
        merged = reference_patch_merge(x, (H, W))  # (B, L/4, 4C)
        normed, mean, rstd = torch.native_layer_norm(merged, (merged.shape[-1],), None, None, eps)
        out = normed * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
        if keep_mask is not None:
            out = out * merged_keep_multiplier(keep_mask, x.shape[1], x.shape[-1], out.dtype, (H, W))
        ctx.save_for_backward(x, scale, mean, rstd, keep_mask)
        ctx.geometry = (H, W, eps, out.dtype)
        return out

    @staticmethod
    def backward(ctx, dout):
        x, scale, mean, rstd, keep_mask = ctx.saved_tensors
        H, W, eps, dtype = ctx.geometry
        needs_x, needs_shift, needs_scale = ctx.needs_input_grad[:3]
        B, L, C = x.shape
        if keep_mask is not None:
            dout = dout * merged_keep_multiplier(keep_mask, L, C, dtype, (H, W))
        merged = reference_patch_merge(x, (H, W))
        dx = dshift = dscale = None
        if needs_x:
            dnormed = dout * (1 + scale.unsqueeze(1))
            dmerged = torch.ops.aten.native_layer_norm_backward(
                dnormed, merged, (4 * C,), mean, rstd, None, None, [True, False, False])[0]
            # the merge's inverse: channel block r + 2c of merged token (i, j) is grid cell (2i + r, 2j + c)
            dx = (dmerged.reshape(B, H // 2, W // 2, 2, 2, C).permute(0, 1, 4, 2, 3, 5)
                  .reshape(B, L, C).to(x.dtype))
        if needs_shift:
            dshift = dout.sum(1)
        if needs_scale:
            dscale = (dout * ((merged - mean) * rstd)).sum(1)
        return dx, dshift, dscale, None, None, None, None


def _patch_merge_torch(call: OpCall) -> torch.Tensor:
    x, shift, scale, keep_mask, H, W, eps = call.args
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, shift, scale)):
        keep = None if keep_mask is None else keep_mask.detach()
        return _PatchMergeModulateTorch.apply(x, shift, scale, keep, H, W, eps)
    return _patch_merge_reference(call)

# ============================================================================ public functions

def patch_merge_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                         keep_mask: Optional[torch.Tensor] = None, *,
                         grid: Optional[GridLike] = None, eps: float = 1e-6,
                         backend: str = "auto") -> torch.Tensor:
    """EDT's down-sampling front end in one kernel::

        merge2x2(x) -> LayerNorm(4C, no affine) -> * (1 + scale) + shift -> * keep_mask

    The merge concatenates, per output token, (even row, even col), (odd row,
    even col), (even row, odd col), (odd row, odd col) of its 2x2 patch
    (Swin's order); output tokens are row-major on the ``H/2 x W/2`` grid.

    Args:
        x: ``[B, H*W, C]``, row-major on the ``H x W`` grid.
        shift, scale: ``[B, 4C]`` (EDT: ``Linear(c) -> 8C`` chunked in two).
        keep_mask: bool or float, ``[B, H*W/4]`` (one value per merged
            token) or ``[B, H*W]`` (one per input token, zeroing its C
            channels of the merged vector: EDT's down-masking
            ``rand(B, L) >= p``), or None.  No gradient flows into it.
        grid: ``n`` or ``(H, W)`` with H, W even; default: ``sqrt(L)`` square.
        eps: LayerNorm epsilon.
        backend: ``"auto"``, ``"triton"``, ``"torch"`` or ``"eager"``.

    Returns ``[B, H*W/4, 4C]``; differentiable in x, shift and scale.
    """
    B, L, C = V.check_tokens("x", x)
    if grid is None:
        grid = V.infer_grid(L, "L = x.shape[1]")
    H, W = normalize_grid(grid)
    if H * W != L:
        raise ValueError(f"x must have H*W = {H * W} tokens for grid ({H}, {W}), got L = {L}")
    if H % 2 or W % 2:
        raise ValueError(f"grid ({H}, {W}) must have even H and W for a 2x2 merge")
    for name, t in (("shift", shift), ("scale", scale)):
        V.check_tensor(name, t, 2, "[B, 4C]", device=x.device)
        V.check_shape(name, t, (B, 4 * C), "[B, 4C]")
    T = L // 4
    if keep_mask is not None:
        V.check_tensor("keep_mask", keep_mask, 2, "[B, H*W/4] or [B, H*W]", device=x.device, floating=False)
        if tuple(keep_mask.shape) != (B, L):
            V.check_shape("keep_mask", keep_mask, (B, T), "[B, H*W/4] or [B, H*W]")
        if not (keep_mask.dtype == torch.bool or keep_mask.is_floating_point()):
            raise TypeError(f"keep_mask must be bool or floating point, got {keep_mask.dtype}")
    eps = V.check_eps(eps)
    return dispatch("patch_merge_modulate", backend,
                    OpCall((x, shift, scale, keep_mask, H, W, eps), x=x, shift=shift, scale=scale))


def _patch_merge_triton(call: OpCall) -> torch.Tensor:
    x, shift, scale, keep_mask, H, W, eps = call.args
    keep = None if keep_mask is None else keep_mask.detach().to(torch.float32)
    return _patch_merge_op(x, shift, scale, keep, H, W, eps)


def _patch_merge_reference(call: OpCall) -> torch.Tensor:
    x, shift, scale, keep_mask, H, W, eps = call.args
    keep = None if keep_mask is None else keep_mask.detach()
    return reference_patch_merge_modulate(x, shift, scale, keep, (H, W), eps)

# ============================================================================ backends

register_op("patch_merge_modulate", _patch_merge_triton, _patch_merge_reference, torch_fn=_patch_merge_torch)
