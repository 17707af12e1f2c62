"""Grid geometry shared by every backend: relative-position indices and EDT's
Attention Modulation Matrix (AMM).

Both the relative-position bias and the AMM depend on a pair of tokens (i, j)
only through their integer grid offset (r_i - r_j, c_i - c_j).  With
``u = row * (2 * cols - 1) + col`` the table row of a pair is

    idx(i, j) = u_i - u_j + (rows - 1) * (2 * cols - 1) + (cols - 1)

which, for a square grid of side n, is exactly the BEiT/Swin/MDT/EDT layout
``(r_i - r_j + n - 1) * (2n - 1) + (c_i - c_j + n - 1)`` (the BEiT/Swin/MDT/EDT table layout).  The kernels
therefore never build an N x N matrix: they read the learned bias table and a
tabulated AMM vector of ``(2 rows - 1) * (2 cols - 1)`` entries with the same
index.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Tuple, Union

import torch

from ._tracing import constant_while_traced

GridLike = Union[int, Tuple[int, int]]

__all__ = [
    "AMM",
    "AMMLike",
    "KEEP",
    "normalize_grid",
    "num_offsets",
    "relative_position_index",
    "amm_offset_table",
    "modulation_matrix",
]


def normalize_grid(grid: GridLike, name: str = "grid") -> Tuple[int, int]:
    """``n`` or ``(rows, cols)`` -> ``(rows, cols)``, validated."""
    if isinstance(grid, bool):
        raise TypeError(f"{name} must be an int n or a pair (rows, cols), got bool")
    if isinstance(grid, int):
        rows = cols = grid
    elif isinstance(grid, (tuple, list)) and len(grid) == 2 and all(
        isinstance(g, int) and not isinstance(g, bool) for g in grid
    ):
        rows, cols = int(grid[0]), int(grid[1])
    else:
        raise TypeError(f"{name} must be an int n or a pair of ints (rows, cols), got {grid!r}")
    if rows < 1 or cols < 1:
        raise ValueError(f"{name} must be positive, got (rows, cols) = ({rows}, {cols})")
    return rows, cols


def num_offsets(grid: GridLike) -> int:
    """Number of distinct grid offsets, i.e. rows of the bias table without extras."""
    rows, cols = normalize_grid(grid)
    return (2 * rows - 1) * (2 * cols - 1)


def relative_position_index(grid: GridLike, positions: Optional[torch.Tensor] = None,
                            device=None) -> torch.Tensor:
    """The published ``relative_position_index`` (``[N, N]`` int64) for the grid,
    or ``[..., N, N]`` for the tokens at ``positions`` (flat grid indices)."""
    rows, cols = normalize_grid(grid)
    if positions is None:
        positions = torch.arange(rows * cols, device=device if device is not None else "cpu")
    positions = positions.long()
    r, c = positions // cols, positions % cols
    dr = r[..., :, None] - r[..., None, :] + rows - 1
    dc = c[..., :, None] - c[..., None, :] + cols - 1
    return dr * (2 * cols - 1) + dc


@dataclass(frozen=True)
class AMM:
    """EDT's Attention Modulation Matrix, as a configuration.

    ``M(i, j) = amplitude * exp(cos(2 pi d / period))`` for grid distance
    ``d`` with ``d^2 <= radius2``, else 0 (EDT's published AMM).  ``None`` fields take the
    published values for a square grid of side n: ``period = 4 (n-1) sqrt 2``,
    ``radius2 = 2^2 + (n-1)^2`` (an integer squared distance) and amplitude 0.5.
    A non-square grid needs ``period`` and ``radius2`` given explicitly.
    """

    period: Optional[float] = None
    radius2: Optional[int] = None
    amplitude: float = 0.5

    def __post_init__(self):
        if self.period is not None and not (isinstance(self.period, (int, float)) and self.period > 0):
            raise ValueError(f"AMM.period must be a positive number, got {self.period!r}")
        if self.radius2 is not None and not (isinstance(self.radius2, int) and self.radius2 >= 0):
            raise ValueError(f"AMM.radius2 must be a non-negative int (squared grid distance), got {self.radius2!r}")
        if not isinstance(self.amplitude, (int, float)):
            raise TypeError(f"AMM.amplitude must be a number, got {type(self.amplitude).__name__}")

    def resolve(self, grid: GridLike) -> Tuple[float, int, float]:
        rows, cols = normalize_grid(grid)
        if (self.period is None or self.radius2 is None) and rows != cols:
            raise ValueError(
                f"AMM defaults are published for square grids only; grid is ({rows}, {cols}): "
                "pass AMM(period=..., radius2=...) explicitly")
        n = rows
        period = self.period if self.period is not None else 4.0 * (n - 1) * math.sqrt(2.0)
        radius2 = self.radius2 if self.radius2 is not None else 4 + (n - 1) ** 2
        return float(period), int(radius2), float(self.amplitude)


AMMLike = Union[None, bool, AMM]
"""The ``amm`` argument everywhere: ``None``/``False`` no AMM, ``True`` the
published AMM (``AMM()``), an ``AMM`` that configuration."""


class _Keep:
    """Type of :data:`KEEP` (one instance; copies and pickles are that instance)."""

    def __repr__(self) -> str:
        return "KEEP"

    def __reduce__(self):
        return "KEEP"


KEEP = _Keep()
"""``amm=KEEP``: leave each module's own AMM setting as it is (the default of
``patch_model`` and of ``AMMAttention.forward``), where ``None`` means no AMM."""


def _amm_values(dr2: torch.Tensor, period: float, radius2: int, amplitude: float) -> torch.Tensor:
    """AMM value for integer squared distances ``dr2`` (float64 math)."""
    d = dr2.double().sqrt()
    if period > 0 and math.isfinite(period):
        val = amplitude * torch.exp(torch.cos((2.0 * math.pi / period) * d))
    else:  # degenerate n == 1 grid: the only offset is 0, cos(0) = 1
        val = torch.full_like(d, amplitude * math.e)
    return torch.where(dr2 <= radius2, val, torch.zeros_like(val))


@lru_cache(maxsize=256)
def _amm_offset_table_cpu(rows: int, cols: int, period: float, radius2: int,
                          amplitude: float) -> torch.Tensor:
    # Explicit CPU: a cached tensor must not inherit a `with torch.device(...)` context.
    dr = torch.arange(-(rows - 1), rows, dtype=torch.int64, device="cpu")
    dc = torch.arange(-(cols - 1), cols, dtype=torch.int64, device="cpu")
    dr2 = dr[:, None] ** 2 + dc[None, :] ** 2  # [(2r-1), (2c-1)], row-major = table layout
    return _amm_values(dr2.reshape(-1), period, radius2, amplitude)  # float64


def amm_offset_table(grid: GridLike, amm: Union[bool, AMM] = True, device=None,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The AMM tabulated per grid offset: ``[(2 rows - 1) * (2 cols - 1)]``, read
    with the same index as the bias table.  This is what the kernels consume."""
    return cached_amm_offset_table(grid, amm, device, dtype).clone()


def cached_amm_offset_table(grid: GridLike, amm: Union[bool, AMM] = True, device=None,
                            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``amm_offset_table`` from a per-device cache (read-only: shared by calls)."""
    rows, cols = normalize_grid(grid)
    cfg = AMM() if amm is True else amm
    if not isinstance(cfg, AMM):
        raise TypeError(f"amm must be True (the published AMM) or an AMM(...) config, got {amm!r}")
    period, radius2, amplitude = cfg.resolve((rows, cols))
    return _amm_offset_table_on(rows, cols, period, radius2, amplitude,
                                str(torch.device(device)) if device is not None else "cpu", dtype)


@constant_while_traced  # a constant of a compiled graph, not rebuilt and copied per call
@lru_cache(maxsize=256)
def _amm_offset_table_on(rows: int, cols: int, period: float, radius2: int, amplitude: float,
                         device: str, dtype: torch.dtype) -> torch.Tensor:
    # Cached per device: no host-to-device copy per call (CUDA-graph capture
    # forbids one; the first call, e.g. a warm-up, creates the table).
    table = _amm_offset_table_cpu(rows, cols, period, radius2, amplitude)
    if dtype != torch.float64:
        # rounded through float32, the precision of the published AMM, for every narrower dtype too
        table = table.float()
    return table.to(device=device, dtype=dtype)


def modulation_matrix(grid: GridLike, amm: Union[bool, AMM] = True,
                      positions: Optional[torch.Tensor] = None, device=None,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense published AMM ``M`` (``[N, N]``, or ``[..., N, N]`` for the
    tokens at ``positions``).  For reference and for other repos; the kernels
    never build it."""
    rows, cols = normalize_grid(grid)
    table = amm_offset_table((rows, cols), amm, dtype=torch.float64)
    if positions is not None:
        positions = positions.cpu()
    idx = relative_position_index((rows, cols), positions)
    return table[idx].to(device=device, dtype=dtype)
