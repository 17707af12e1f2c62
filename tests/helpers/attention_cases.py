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


def cast(tensors, kw: dict, dtype: torch.dtype, device, requires_grad: bool = True):
    """The float64 masters of a case in ``dtype`` on ``device``: ``tensors`` (one tensor, or
    a sequence of them, e.g. q, k, v) and the tensors of ``kw``.  Floating-point inputs
    require grad (``requires_grad``) where they have a gradient: the activations, the
    table and a dense bias; the table stays float32 under low-precision activations, as
    in a model."""
    def to(t):
        return t.to(device, dtype).requires_grad_(requires_grad)

    out = to(tensors) if torch.is_tensor(tensors) else [to(t) for t in tensors]
    out_kw = {}
    for name, val in kw.items():
        if torch.is_tensor(val):
            val = val.to(device)
            if val.is_floating_point():
                vd = dtype if name != "rel_pos_bias" or dtype == torch.float64 else torch.float32
                val = val.to(vd).requires_grad_(requires_grad and name in ("rel_pos_bias", "bias"))
        out_kw[name] = val
    return out, out_kw
