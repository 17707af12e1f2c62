"""adaLN kernels of a DiT block vs eager PyTorch and torch.compile.

    pytest benchmarks/test_bench_adaln.py --benchmark-only
    python -m benchmarks.test_bench_adaln --modes fwd

``layernorm_modulate(x, shift, scale)`` (no-affine LayerNorm, eps 1e-6, then
``* (1 + scale) + shift``) and ``gated_residual(x, gate, y)`` (``x + gate * y``),
the memory-bound part of every DiT/MDT/EDT block (each runs twice per block),
at B=256, L=256, C=1152 (MDT-XL) and 936 (EDT-XL stage 0) on CUDA, B=8 and
C=384/312 on the CPU.  Method and columns: ``benchmarks/_membound.py``.
"""
from __future__ import annotations

import sys
from typing import List, Optional, Sequence

import pytest
import torch

import edt_kernels
from edt_kernels.reference.adaln import reference_gated_residual, reference_layernorm_modulate

from benchmarks import _membound as MB
from benchmarks import harness as U

SECTION = "adaln"
TITLE = "adaLN kernels vs eager and torch.compile"


def _path(op: str, **tensors) -> str:
    from edt_kernels.ops.adaln import use_triton

    return "triton" if use_triton(op, "auto", **tensors) else "torch reference"


def specs(small: bool = U.SMALL, B: Optional[int] = None, tiny: bool = False) -> List[MB.OpSpec]:
    """The benchmarked shapes; ``tiny`` (16 tokens, 8 channels) is for the smoke test."""
    B = (8 if small else 256) if B is None else B
    L = 16 if tiny else 256
    out = []
    n = MB.nbytes
    for C in ((8,) if tiny else ((384, 312) if small else (1152, 936))):
        def ln_make(g, dev, dt, C=C):
            return (torch.randn(B, L, C, generator=g).to(dev, dt), torch.randn(B, C, generator=g).to(dev, dt),
                    torch.randn(B, C, generator=g).to(dev, dt))

        def gr_make(g, dev, dt, C=C):
            return (torch.randn(B, L, C, generator=g).to(dev, dt), torch.randn(B, C, generator=g).to(dev, dt),
                    torch.randn(B, L, C, generator=g).to(dev, dt))

        out.append(MB.OpSpec(
            f"layernorm_modulate C={C}", "layernorm_modulate", f"B={B} L={L} C={C}", ln_make, (0, 1, 2),
            kernel=lambda x, sh, sc: edt_kernels.layernorm_modulate(x, sh, sc),
            reference=lambda x, sh, sc: reference_layernorm_modulate(x, sh, sc),
            fwd_bytes=lambda x, sh, sc: 2 * n(x) + n(sh) + n(sc),
            bwd_bytes=lambda x, sh, sc: 3 * n(x) + 3 * n(sc),
            path=lambda x, sh, sc: _path("layernorm_modulate", x=x, shift=sh, scale=sc)))
        out.append(MB.OpSpec(
            f"gated_residual C={C}", "gated_residual", f"B={B} L={L} C={C}", gr_make, (0, 1, 2),
            kernel=lambda x, gt, y: edt_kernels.gated_residual(x, gt, y),
            reference=lambda x, gt, y: reference_gated_residual(x, gt, y),
            fwd_bytes=lambda x, gt, y: 3 * n(x) + n(gt),
            bwd_bytes=lambda x, gt, y: 4 * n(x) + 2 * n(gt),
            path=lambda x, gt, y: _path("gated_residual", x=x, gate=gt, y=y)))
    return out


SPECS = specs()


def _section():
    return MB.section(SECTION, TITLE, [
        "layernorm_modulate bytes: read x, shift, scale, write out; backward reads dout, x, scale and "
        "writes dx, dshift, dscale",
        "gated_residual bytes: read x, y, gate, write out; backward reads dout, y, gate and writes dx, dy, dgate"])


PARAMS = [pytest.param(s, m, i, id=f"{s.name.replace(' ', '-')}-{m}-{i}")
          for s in SPECS for m in s.modes for i in MB.IMPLS]


@pytest.mark.parametrize("spec,mode,impl", PARAMS)
def test_adaln(benchmark, spec, mode, impl):
    benchmark.group = f"adaln {spec.name} {mode}"
    _section()
    MB.check_row(MB.run_one(spec, impl, mode, SECTION, benchmark=benchmark))


def main(argv: Optional[Sequence[str]] = None) -> int:
    return MB.main("adaLN kernel benchmarks", SPECS, SECTION, _section, argv)


if __name__ == "__main__":
    sys.exit(main())
