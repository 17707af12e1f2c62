"""Compile Triton kernels for sm_90 (H100/H200) through their real launchers, on a CPU.

A minimal driver reports an sm_90 target and ``JITFunction.run`` is made
compile-only (its ``warmup`` mode), so each launcher goes through its real
argument binding, specialisation (alignment, constexprs) and the whole
pipeline TTIR -> PTX -> ptxas without a GPU; nothing is launched and the
launchers' outputs are not meaningful.  Used by ``benchmarks/profiling/sm90_profile.py``
and ``tests/helpers/compile_launchers_sm90.py``; needs TRITON_INTERPRET unset
before triton is imported.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import triton.runtime.jit as _jit
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

_orig_run = _jit.JITFunction.run


class CompileOnlyDriver:
    """Just enough of a driver for JITFunction to compile for sm_90 on a CPU."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


def install(on_compile: Callable) -> None:
    """sm_90 target, every ``JITFunction.run`` compile-only; ``on_compile(fn,
    args, kwargs, kernel)`` sees each compiled kernel (it may raise, as a load
    on the device would) and the launch returns the kernel.  The package's
    launchers accept CPU tensors afterwards (their device check is lifted)."""
    driver.set_active(CompileOnlyDriver())

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = _orig_run(self, *args, grid=grid, warmup=True, **kwargs)
        on_compile(self, args, kwargs, kernel)
        return kernel

    _jit.JITFunction.run = compile_only
    from edt_kernels.ops import _triton_utils

    _triton_utils.interpreting = lambda: True  # let the launchers accept CPU tensors (nothing runs)


def token_launchers(tokens, adaln, x: torch.Tensor, keep: int, merge_width: Optional[int] = None) -> None:
    """Every token and adaLN launcher once on ``x [B, L, C]`` with ``keep`` of
    the L tokens kept; with ``merge_width`` (the token grid's width) also the
    patch-merge LayerNorm-modulate, forward and backward, without and with a
    keep mask at either resolution."""
    B, L, C = x.shape
    dt = x.dtype
    ids = torch.stack([torch.randperm(L) for _ in range(B)])
    keep_ids = ids[:, :keep].contiguous()
    inv = tokens.invert_ids(keep_ids, L)
    tokens.gather_rows(x, keep_ids)
    tokens.scatter_rows(x[:, :keep].contiguous(), keep_ids, L)
    tokens.unshuffle_rows(x[:, :keep].contiguous(), inv, torch.randn(1, 1, C, dtype=dt),
                          torch.randn(1, L, C, dtype=dt), dt)
    tokens.unshuffle_backward(x, inv, keep, True)
    tokens.masking_gather(x, ids, keep)
    tokens.sort_kept(ids, keep)
    m = (torch.rand(B, L) > 0.5).to(dt)
    tokens.masked_shortcut_forward(x, x.clone(), m)
    tokens.masked_shortcut_backward(x, x, x.clone(), m, True)
    sh, sc = torch.randn(B, C, dtype=dt), torch.randn(B, C, dtype=dt)
    adaln.ln_modulate_forward(x, sh, sc, 1e-6)
    adaln.ln_modulate_backward(x, x, sc, 1e-6)
    if merge_width is not None:
        sh4, sc4 = torch.randn(B, 4 * C, dtype=dt), torch.randn(B, 4 * C, dtype=dt)
        for k in (None, torch.rand(B, L // 4), torch.rand(B, L)):
            adaln.ln_modulate_forward(x, sh4, sc4, 1e-6, keep=k, merge_width=merge_width)
            adaln.ln_modulate_backward(torch.randn(B, L // 4, 4 * C, dtype=dt), x, sc4, 1e-6, keep=k,
                                       merge_width=merge_width)
    adaln.gated_residual_forward(x, sh, x.clone())
    adaln.gated_residual_backward(x, sh, x.clone())
