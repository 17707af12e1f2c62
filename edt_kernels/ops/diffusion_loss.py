"""The per-sample training loss of a DiT diffusion (learned-range variance,
epsilon prediction: ``w_t mse + vb``), fused: one kernel.

The definition is ``edt_kernels.reference.diffusion_loss`` (the schedule values
of each sample's timestep come in as the rows of ``coef``).  Written op by op,
the loss and its backward are some 180 elementwise launches per call; here one
program per sample walks its elements once, accumulates the three per-sample
sums in fp32, writes the loss, and (when a gradient is wanted) writes the
gradient of the loss with respect to the model output as it goes, so the
backward is a single ``grad_loss[:, None] * saved`` product.  The derivative of
each term is written out: of the MSE term in ``eps``; of the KL term and of the
discretized-Gaussian NLL (t = 0) in the log-variance, times the range
``(log(beta) - min_log) / 2`` (the mean is a stop-gradient, as in the
reference); a clamped ``log`` passes no gradient where it clamps, as PyTorch's.
Custom op ``edt_kernels::diffusion_loss(Tensor output, Tensor x_start, Tensor
x_t, Tensor noise, Tensor coef, float vb_scale, bool need_grad) -> (loss,
dloss_doutput)``.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch

from .. import _validation as V
from ..backends import OpCall
from ..reference.diffusion_loss import COEF_COLUMNS, HALF_BIN, SQRT_2_OVER_PI, reference_diffusion_loss
from . import _triton_utils as _tu
from ._triton_utils import check_launchable, dispatch, register_op, tl, triton

__all__ = ["diffusion_loss", "COEF_COLUMNS"]

BLOCK = 1024  # elements of one sample per loop step
_HALF_BIN = tl.constexpr(HALF_BIN)
_SQRT_2_OVER_PI = tl.constexpr(SQRT_2_OVER_PI)
_LN2 = tl.constexpr(math.log(2.0))


# ============================================================================ kernel

@triton.jit
def _cdf_slope(u):
    """The tanh-approximated normal CDF at ``u`` (as a logistic: 0.5 (1 + tanh z) =
    1 / (1 + exp(-2z)), with the exponent kept <= 0) and its derivative."""
    z = _SQRT_2_OVER_PI * (u + 0.044715 * u * u * u)
    e = tl.exp(-2.0 * tl.abs(z))
    cdf = tl.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    slope = 2.0 * cdf * (1.0 - cdf) * _SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * u * u)
    return cdf, slope


@triton.jit
def _diffusion_loss_kernel(
    out_ptr, x0_ptr, xt_ptr, noise_ptr, coef_ptr, loss_ptr, grad_ptr,
    N, stride_ob, stride_xb, stride_cb, inv_n, vb_scale,
    NEED_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    cb = coef_ptr + b * stride_cb
    rcp = tl.load(cb + 0).to(tl.float32)
    rcpm1 = tl.load(cb + 1).to(tl.float32)
    c1 = tl.load(cb + 2).to(tl.float32)
    c2 = tl.load(cb + 3).to(tl.float32)
    min_log = tl.load(cb + 4).to(tl.float32)
    max_log = tl.load(cb + 5).to(tl.float32)
    weight = tl.load(cb + 6).to(tl.float32)
    first = tl.load(cb + 7) != 0
    vb_unit = vb_scale * inv_n / _LN2  # one element's share of vb, in bits
    acc_mse = tl.zeros([BLOCK], dtype=tl.float32)
    acc_kl = tl.zeros([BLOCK], dtype=tl.float32)
    acc_nll = tl.zeros([BLOCK], dtype=tl.float32)
    o_base = out_ptr + b * stride_ob
    x_off = b * stride_xb
    for start in range(0, N, BLOCK):
        i = start + tl.arange(0, BLOCK)
        ok = i < N
        eps = tl.load(o_base + i, mask=ok, other=0.0).to(tl.float32)
        v = tl.load(o_base + N + i, mask=ok, other=0.0).to(tl.float32)
        x0 = tl.load(x0_ptr + x_off + i, mask=ok, other=0.0).to(tl.float32)
        xt = tl.load(xt_ptr + x_off + i, mask=ok, other=0.0).to(tl.float32)
        nz = tl.load(noise_ptr + x_off + i, mask=ok, other=0.0).to(tl.float32)
        diff = nz - eps
        frac = (v + 1.0) * 0.5
        log_var = frac * max_log + (1.0 - frac) * min_log
        model_mean = c1 * (rcp * xt - rcpm1 * eps) + c2 * xt
        d2 = (c1 * x0 + c2 * xt - model_mean)
        d2 = d2 * d2
        e_ratio = tl.exp(min_log - log_var)
        e_inv = tl.exp(-log_var)
        kl = 0.5 * (-1.0 + log_var - min_log + e_ratio + d2 * e_inv)
        # discretized Gaussian log-likelihood of x0, log-scale log_var / 2
        centered = x0 - model_mean
        inv_std = tl.exp(-0.5 * log_var)
        plus_in = inv_std * (centered + _HALF_BIN)
        min_in = inv_std * (centered - _HALF_BIN)
        cdf_plus, slope_plus = _cdf_slope(plus_in)
        cdf_min, slope_min = _cdf_slope(min_in)
        lo = x0 < -0.999
        hi = x0 > 0.999
        arg = tl.where(lo, cdf_plus, tl.where(hi, 1.0 - cdf_min, cdf_plus - cdf_min))
        log_prob = tl.log(tl.maximum(arg, 1e-12))
        acc_mse += tl.where(ok, diff * diff, 0.0)
        acc_kl += tl.where(ok, kl, 0.0)
        acc_nll += tl.where(ok, -log_prob, 0.0)
        if NEED_GRAD:
            # d(arg)/d(log-scale): d(plus_in)/ds = -plus_in, d(min_in)/ds = -min_in
            darg = tl.where(lo, -slope_plus * plus_in,
                            tl.where(hi, slope_min * min_in, slope_min * min_in - slope_plus * plus_in))
            dlogp = tl.where(arg >= 1e-12, darg / tl.maximum(arg, 1e-12), 0.0)
            d_nll = -0.5 * dlogp  # per unit log-variance (log-scale = log_var / 2)
            d_kl = 0.5 * (1.0 - e_ratio - d2 * e_inv)
            d_v = tl.where(first, d_nll, d_kl) * (0.5 * (max_log - min_log)) * vb_unit
            d_eps = -2.0 * weight * inv_n * diff
            tl.store(grad_ptr + b * stride_ob + i, d_eps.to(grad_ptr.dtype.element_ty), mask=ok)
            tl.store(grad_ptr + b * stride_ob + N + i, d_v.to(grad_ptr.dtype.element_ty), mask=ok)
    mse = tl.sum(acc_mse, axis=0) * inv_n
    vb = tl.where(first, tl.sum(acc_nll, axis=0), tl.sum(acc_kl, axis=0)) * vb_unit
    tl.store(loss_ptr + b, weight * mse + vb)

# ============================================================================ launcher

def diffusion_loss_forward(output: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor,
                           noise: torch.Tensor, coef: torch.Tensor, vb_scale: float,
                           need_grad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(loss`` float32 ``[B]``, ``d loss[b] / d output[b]`` like output, or an empty
    tensor without ``need_grad``)."""
    check_launchable(output)
    output, x_start, x_t, noise = (t.contiguous() for t in (output, x_start, x_t, noise))
    coef = coef.contiguous()
    B = output.shape[0]
    N = x_start[0].numel() if B else 0
    loss = _tu.empty_output((B,), torch.float32, output.device)
    grad = (_tu.empty_output(output.shape, output.dtype, output.device) if need_grad
            else output.new_empty((0,)))
    if B == 0:
        return loss, grad
    _diffusion_loss_kernel[(B,)](
        output, x_start, x_t, noise, coef, loss, grad if need_grad else output,
        N, output.stride(0), x_start.stride(0), coef.stride(0), 1.0 / N, float(vb_scale),
        NEED_GRAD=need_grad, BLOCK=BLOCK, num_warps=4,
    )
    return loss, grad

# ============================================================================ custom op + autograd

@torch.library.custom_op("edt_kernels::diffusion_loss", mutates_args=())
def _diffusion_loss_op(output: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor, noise: torch.Tensor,
                       coef: torch.Tensor, vb_scale: float, need_grad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    return diffusion_loss_forward(output, x_start, x_t, noise, coef, vb_scale, need_grad)


@_diffusion_loss_op.register_fake
def _(output, x_start, x_t, noise, coef, vb_scale, need_grad):
    return (output.new_empty((output.shape[0],), dtype=torch.float32),
            output.new_empty(output.shape if need_grad else (0,)))


class _DiffusionLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, output, x_start, x_t, noise, coef, vb_scale):
        loss, grad = _diffusion_loss_op(output, x_start, x_t, noise, coef, vb_scale, True)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, dloss):
        (grad,) = ctx.saved_tensors
        return dloss.to(grad.dtype).view(-1, *([1] * (grad.dim() - 1))) * grad, None, None, None, None, None


def _diffusion_loss_triton(call: OpCall) -> torch.Tensor:
    output, x_start, x_t, noise, coef, vb_scale = call.args
    if torch.is_grad_enabled() and output.requires_grad:
        return _DiffusionLoss.apply(output, x_start, x_t, noise, coef, vb_scale)
    return _diffusion_loss_op(output, x_start, x_t, noise, coef, vb_scale, False)[0]

# ============================================================================ public function

def diffusion_loss(output: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor, noise: torch.Tensor,
                   coef: torch.Tensor, vb_scale: float = 1.0, *, backend: str = "auto") -> torch.Tensor:
    """Per-sample ``w_t mse + vb_scale * vb`` of a learned-range, epsilon-predicting
    diffusion (``edt_kernels.reference.diffusion_loss``), fused.

    Args:
        output: the model output ``[B, 2C, ...]`` (eps, then the variance values v).
        x_start, x_t, noise: ``[B, C, ...]``: the data, its noised version, the noise.
        coef: ``[B, K]`` per-sample schedule values, columns :data:`COEF_COLUMNS`.
        vb_scale: factor of the VB term.
        backend: ``"auto"``, ``"triton"``, ``"torch"`` or ``"eager"`` (the reference).

    Returns the float32 (float64 for float64 inputs on the reference) loss ``[B]``,
    differentiable in ``output`` only.
    """
    V.check_tensor("output", output, None, "[B, 2C, ...]")
    if output.dim() < 2 or output.shape[1] % 2 or 0 in output.shape[1:]:
        raise ValueError(f"output must be [B, 2C, ...] (eps, then v) with C and every other size past B "
                         f"positive, got shape {list(output.shape)}")
    if isinstance(vb_scale, bool) or not isinstance(vb_scale, (int, float)):
        raise TypeError(f"vb_scale must be a number, got {type(vb_scale).__name__}")
    if not math.isfinite(vb_scale):
        raise ValueError(f"vb_scale must be finite, got {vb_scale}")
    for name, t in (("x_start", x_start), ("x_t", x_t), ("noise", noise)):
        V.check_tensor(name, t, output.dim(), "[B, C, ...]", device=output.device)
        V.check_shape(name, t, (output.shape[0], output.shape[1] // 2, *output.shape[2:]), "[B, C, ...]")
    V.check_tensor("coef", coef, 2, f"[B, {len(COEF_COLUMNS)}]", device=output.device)
    V.check_shape("coef", coef, (output.shape[0], len(COEF_COLUMNS)), f"[B, {len(COEF_COLUMNS)}]")
    return dispatch("diffusion_loss", backend,
                    OpCall((output, x_start, x_t, noise, coef, float(vb_scale)), output=output, x_start=x_start))

# ============================================================================ backends

register_op("diffusion_loss", _diffusion_loss_triton, lambda c: reference_diffusion_loss(*c.args))
