"""The optional inputs of one random attention case (float64 masters), shared by
the tests of ``amm_attention`` and ``amm_attention_qkvpacked``."""
from typing import Optional

import torch


def attention_kwargs(g: torch.Generator, B: int, H: int, N: int, *, grid=None, table=False,
                     positions: Optional[str] = None, amm=False, bias=None, modulation=None,
                     extra: int = 3) -> dict:
    """``grid`` (int or (rows, cols)), the relative-position table (+ ``extra`` rows),
    positions (``"batch"``: [B, N], ``"shared"``: [N]), ``amm``, a dense ``bias``
    and ``modulation`` of the given shapes, drawn from ``g`` in that order."""
    kw = {}
    if grid is not None:
        kw["grid"] = grid
    rows, cols = (grid, grid) if isinstance(grid, int) else (grid or (None, None))
    if table:
        kw["rel_pos_bias"] = torch.randn((2 * rows - 1) * (2 * cols - 1) + extra, H, generator=g,
                                         dtype=torch.float64)
    if positions == "batch":
        kw["positions"] = torch.stack([torch.randperm(rows * cols, generator=g)[:N] for _ in range(B)])
    elif positions == "shared":
        kw["positions"] = torch.randperm(rows * cols, generator=g)[:N]
    if amm:
        kw["amm"] = amm
    if bias is not None:
        kw["bias"] = torch.randn(*bias, generator=g, dtype=torch.float64)
    if modulation is not None:
        kw["modulation"] = torch.rand(*modulation, generator=g, dtype=torch.float64) * 2
    return kw
