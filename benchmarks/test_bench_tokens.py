"""Token kernels of masked training (MDTv2, EDT) vs eager PyTorch and torch.compile.

    pytest benchmarks/test_bench_tokens.py --benchmark-only
    python -m benchmarks.test_bench_tokens --cases gather_tokens --modes fwd

Ops (public ``edt_kernels`` functions, backend "auto") at MDT-XL / EDT-XL
shapes on CUDA (B=256, L=256, C=1152 for MDT's ops, C=936 for EDT's
down-sampling front end; 153 of 256 tokens kept = MDTv2's mean mask ratio 0.4)
and small shapes on the CPU (B=8, C=384/312):

* ``gather_tokens(x, ids_keep)`` (backward: a scatter),
* ``unshuffle_with_mask_token(x_kept, ids_restore, mask_token, pos_embed)``,
* ``masked_shortcut(x, x_before, mask)`` (mask in x's dtype),
* ``patch_merge_modulate(x, shift, scale, keep_mask, grid=16)``.

Method and columns: see ``benchmarks/_membound.py`` and ``benchmarks/harness/``.
"""
from __future__ import annotations

import sys
from typing import List, Optional, Sequence

import pytest
import torch

import edt_kernels
from edt_kernels.reference.tokens import (
    reference_gather_tokens,
    reference_masked_shortcut,
    reference_patch_merge_modulate,
    reference_unshuffle_with_mask_token,
)

from benchmarks import _membound as MB
from benchmarks import harness as U

SECTION = "tokens"
TITLE = "Token kernels (masked training) vs eager and torch.compile"


def _path(op: str, **tensors) -> str:
    from edt_kernels.ops.adaln import use_triton

    return "triton" if use_triton(op, "auto", **tensors) else "torch reference"


def _perms(g, B, L):
    return torch.stack([torch.randperm(L, generator=g) for _ in range(B)])


def _es(t):
    return t.element_size()


def specs(small: bool = U.SMALL, B: Optional[int] = None, tiny: bool = False) -> List[MB.OpSpec]:
    """The benchmarked shapes; ``tiny`` (a 4x4 grid, 8 channels) is for the smoke test."""
    B = (8 if small else 256) if B is None else B
    L, side = (16, 4) if tiny else (256, 16)
    C_mdt, C_edt = (8, 8) if tiny else ((384, 312) if small else (1152, 936))
    K = int(L * (1 - 0.4))  # MDTv2: r = 0.3 + 0.2 U(0, 1), mean 0.4

    def gather_make(g, dev, dt):
        return (torch.randn(B, L, C_mdt, generator=g).to(dev, dt), _perms(g, B, L)[:, :K].contiguous().to(dev))

    def unshuffle_make(g, dev, dt):
        return (torch.randn(B, K, C_mdt, generator=g).to(dev, dt), _perms(g, B, L).to(dev),
                torch.randn(1, 1, C_mdt, generator=g).to(dev, dt), torch.randn(1, L, C_mdt, generator=g).to(dev, dt))

    def shortcut_make(g, dev, dt):
        return (torch.randn(B, L, C_mdt, generator=g).to(dev, dt), torch.randn(B, L, C_mdt, generator=g).to(dev, dt),
                (torch.rand(B, L, generator=g) < 0.4).to(dev, dt))

    def merge_make(g, dev, dt):
        x = torch.randn(B, L, C_edt, generator=g).to(dev, dt)
        shift, scale = (torch.randn(B, 4 * C_edt, generator=g).to(dev, dt) for _ in range(2))
        return x, shift, scale, (torch.rand(B, L // 4, generator=g) >= 0.45).to(dev)  # EDT keep p ~ 0.45

    n = MB.nbytes
    return [
        MB.OpSpec(
            f"gather_tokens C={C_mdt}", "gather_tokens", f"B={B} L={L} K={K} C={C_mdt}", gather_make, (0,),
            kernel=lambda x, ids: edt_kernels.gather_tokens(x, ids),
            reference=lambda x, ids: reference_gather_tokens(x, ids),
            fwd_bytes=lambda x, ids: 2 * ids.numel() * x.shape[-1] * _es(x) + n(ids),
            bwd_bytes=lambda x, ids: ids.numel() * x.shape[-1] * _es(x) + n(ids) + n(x),
            path=lambda x, ids: _path("gather_tokens", x=x), about="MDT encoder input (ids_keep)"),
        MB.OpSpec(
            f"unshuffle_with_mask_token C={C_mdt}", "unshuffle_with_mask_token", f"B={B} L={L} K={K} C={C_mdt}",
            unshuffle_make, (0, 2, 3),
            kernel=lambda x, r, m, p: edt_kernels.unshuffle_with_mask_token(x, r, m, p),
            reference=lambda x, r, m, p: reference_unshuffle_with_mask_token(x, r, m, p),
            fwd_bytes=lambda x, r, m, p: n(x) + n(r) + n(m) + n(p) + r.numel() * x.shape[-1] * _es(x),
            bwd_bytes=lambda x, r, m, p: r.numel() * x.shape[-1] * _es(x) + n(r) + n(x) + n(m) + n(p),
            path=lambda x, r, m, p: _path("unshuffle_with_mask_token", x_kept=x, mask_token=m, pos_embed=p),
            about="MDT side-interpolater input"),
        MB.OpSpec(
            f"masked_shortcut C={C_mdt}", "masked_shortcut", f"B={B} L={L} C={C_mdt}", shortcut_make, (0, 1),
            kernel=lambda x, xb, m: edt_kernels.masked_shortcut(x, xb, m),
            reference=lambda x, xb, m: reference_masked_shortcut(x, xb, m),
            fwd_bytes=lambda x, xb, m: 3 * n(x) + n(m),
            bwd_bytes=lambda x, xb, m: 3 * n(x) + n(m),
            path=lambda x, xb, m: _path("masked_shortcut", x=x, x_before=xb, mask=m),
            about="MDT side-interpolater output"),
        MB.OpSpec(
            f"patch_merge_modulate C={C_edt}", "patch_merge_modulate", f"B={B} L={L} C={C_edt} grid={side}",
            merge_make, (0, 1, 2),
            kernel=lambda x, sh, sc, k: edt_kernels.patch_merge_modulate(x, sh, sc, k, grid=side),
            reference=lambda x, sh, sc, k: reference_patch_merge_modulate(x, sh, sc, k, grid=side),
            fwd_bytes=lambda x, sh, sc, k: 2 * n(x) + n(sh) + n(sc) + n(k),
            bwd_bytes=lambda x, sh, sc, k: 3 * n(x) + 3 * n(sc) + n(k),
            path=lambda x, sh, sc, k: _path("patch_merge_modulate", x=x, shift=sh, scale=sc),
            about="EDT down-sampling front end (merge + LN + modulate + keep-mask)"),
    ]


SPECS = specs()


def _section():
    return MB.section(SECTION, TITLE, [
        "masked_shortcut bytes: read x, x_before, mask, write out; backward reads dout and mask and "
        "writes dx, dx_before",
        "gather bytes: only the kept rows of x are read; its backward writes all L rows of dx"])


PARAMS = [pytest.param(s, m, i, id=f"{s.op}-{m}-{i}") for s in SPECS for m in s.modes for i in MB.IMPLS]


@pytest.mark.parametrize("spec,mode,impl", PARAMS)
def test_tokens(benchmark, spec, mode, impl):
    benchmark.group = f"tokens {spec.name} {mode}"
    _section()
    MB.check_row(MB.run_one(spec, impl, mode, SECTION, benchmark=benchmark))


def main(argv: Optional[Sequence[str]] = None) -> int:
    return MB.main("token kernel benchmarks", SPECS, SECTION, _section, argv)


if __name__ == "__main__":
    sys.exit(main())
