"""Compile every Triton kernel for sm_90 through its real launcher, on a CPU.

Run as a script (without TRITON_INTERPRET) by tests/test_compile_sm90.py,
through the compile-only sm_90 driver of ``benchmarks/profiling/sm90_compile.py``
(each launcher's real argument binding, specialisation and the whole compiler
pipeline TTIR -> PTX -> ptxas, without a GPU; nothing is launched and the
outputs are not meaningful).  Prints ``RESULT`` + JSON ``[kernel, dtype,
shared bytes]``.
"""
import json
import pathlib
import sys

import torch

sys.path.append(str(pathlib.Path(__file__).resolve().parents[2]))  # the repository root, for benchmarks/
from benchmarks.profiling import sm90_compile  # noqa: E402

compiled = []


def _record(fn, args, kwargs, kernel):
    compiled.append([fn.fn.__name__, str(args[0].dtype) if hasattr(args[0], "dtype") else "", kernel.metadata.shared])


sm90_compile.install(_record)

from edt_kernels.ops import adaln, tokens  # noqa: E402
from edt_kernels.ops import amm_attention as attn  # noqa: E402
from edt_kernels.ops import diffusion_loss as dloss  # noqa: E402

attn._fwd_kernel = attn._amm_attn_fwd_kernel  # no autotuning: it would launch

B, L, K, C = 2, 64, 40, 104
for dt in (torch.bfloat16, torch.float32):
    sm90_compile.token_launchers(tokens, adaln, torch.randn(B, L, C, dtype=dt), K, merge_width=8)
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
    # the fused diffusion loss, with and without the gradient
    x0 = torch.randn(B, 4, 8, 8)
    for need_grad in (True, False):
        dloss.diffusion_loss_forward(torch.randn(B, 8, 8, 8, dtype=dt), x0, x0.clone(), x0.clone(),
                                     torch.rand(B, len(dloss.COEF_COLUMNS)), 1.0, need_grad)
print("RESULT" + json.dumps(compiled))
