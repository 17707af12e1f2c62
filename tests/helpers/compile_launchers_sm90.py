"""Compile every Triton kernel for sm_90 through its real launcher, on a CPU.

Run as a script (without TRITON_INTERPRET) by tests/test_compile_sm90.py.  A
minimal driver reports an sm_90 target, and ``JITFunction.run`` is made
compile-only (its ``warmup`` mode), so each launcher goes through its real
argument binding, specialisation and the whole compiler pipeline (TTIR ->
PTX -> ptxas) without a GPU; nothing is launched and the outputs are not
meaningful.  Prints ``RESULT`` + JSON ``[kernel, dtype, shared bytes]``.
"""
import json
import torch
import triton
import triton.runtime.jit as J
from triton.backends.compiler import GPUTarget
from triton.runtime import driver


class _CompileOnlyDriver:
    """Just enough of a driver for JITFunction to compile for sm_90 on a CPU."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


driver.set_active(_CompileOnlyDriver())
compiled = []
_orig_run = J.JITFunction.run


def _compile_only(self, *args, grid, warmup, **kwargs):
    kernel = _orig_run(self, *args, grid=grid, warmup=True, **kwargs)
    compiled.append([self.fn.__name__, str(args[0].dtype) if hasattr(args[0], "dtype") else "", kernel.metadata.shared])
    return kernel


J.JITFunction.run = _compile_only

from edt_kernels.ops import _triton_utils, adaln, tokens  # noqa: E402

_triton_utils.interpreting = lambda: True  # let the launchers accept CPU tensors (nothing runs)
from edt_kernels.ops import amm_attention as attn  # noqa: E402

attn._fwd_kernel = attn._amm_attn_fwd_kernel  # no autotuning: it would launch

B, L, K, C = 2, 64, 40, 104
for dt in (torch.bfloat16, torch.float32):
    x = torch.randn(B, L, C, dtype=dt)
    ids = torch.stack([torch.randperm(L) for _ in range(B)])
    keep_ids = ids[:, :K].contiguous()
    inv = tokens.invert_ids(keep_ids, L)
    tokens.gather_rows(x, keep_ids)
    tokens.scatter_rows(x[:, :K].contiguous(), keep_ids, L)
    tokens.unshuffle_rows(x[:, :K].contiguous(), inv, torch.randn(1, 1, C, dtype=dt), torch.randn(1, L, C, dtype=dt), dt)
    tokens.unshuffle_backward(x, inv, K, True)
    tokens.masking_gather(x, ids, K)
    m = (torch.rand(B, L) > 0.5).to(dt)
    tokens.masked_shortcut_forward(x, x.clone(), m)
    tokens.masked_shortcut_backward(x, x, x.clone(), m, True)
    sh, sc = torch.randn(B, C, dtype=dt), torch.randn(B, C, dtype=dt)
    adaln.ln_modulate_forward(x, sh, sc, 1e-6)
    adaln.ln_modulate_backward(x, x, sc, 1e-6)
    sh4, sc4 = torch.randn(B, 4 * C, dtype=dt), torch.randn(B, 4 * C, dtype=dt)
    for keep in (None, torch.rand(B, L // 4), torch.rand(B, L)):
        adaln.ln_modulate_forward(x, sh4, sc4, 1e-6, keep=keep, merge_width=8)
        adaln.ln_modulate_backward(torch.randn(B, L // 4, 4 * C, dtype=dt), x, sc4, 1e-6, keep=keep, merge_width=8)
    adaln.gated_residual_forward(x, sh, x.clone())
    adaln.gated_residual_backward(x, sh, x.clone())
    # attention: forward (fixed tiles) and both backward kernels, every option on
    q, k, v = (torch.randn(B, 3, 49, 52, dtype=dt) for _ in range(3))
    table = torch.randn(13 * 13 + 3, 3)
    pos = torch.stack([torch.randperm(49) for _ in range(B)])
    amm_table = torch.rand(13 * 13)
    bias = torch.randn(1, 3, 49, 49, dtype=dt)
    mod = torch.rand(B, 1, 49, 49, dtype=dt)
    args = (q, k, v, table, pos, amm_table, bias, mod, 0.14, 7, 7)
    out, lse = attn.amm_attention_forward(*args)
    attn.amm_attention_backward(torch.randn_like(q), q, k, v, out, lse, *args[3:], True, True)
    # without positions the table gradient has its own batch-reducing kernel
    args = (q, k, v, table, None, amm_table, bias, mod, 0.14, 7, 7)
    out, lse = attn.amm_attention_forward(*args)
    attn.amm_attention_backward(torch.randn_like(q), q, k, v, out, lse, *args[3:], True, True)
print("RESULT" + json.dumps(compiled))
