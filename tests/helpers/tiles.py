"""The ``tiles`` fixture: what the Triton token/adaLN launchers split, recorded, and
optionally forced down so that small interpreter shapes take the paths of the
model's widths.

Three paths of these kernels only run when the work is large enough:

- several channel blocks per row (``CHANNELS``): C > ``MAX_BLOCK_C`` in the
  kernels tiled over channels (EDT-XL's C = 936 to 1560, MDTv2-XL's 1152);
- several row tiles walked by one reducing program (``ROW_TILES``):
  ``rows_per_program`` > ``BLOCK_T`` in the backward kernels that sum over the
  tokens (layernorm_modulate, patch_merge_modulate, gated_residual);
- several samples summed by one program (``SAMPLES``): ``B_PER_PROG > 1`` in
  the unshuffle backward with a pos-embed gradient.

A test takes ``tiles`` through an indirect ``tiles`` parameter (rows from
:func:`tile_rows`) in one of three modes:

- ``"default"``: the launchers' own choices;
- ``"wide"``: the launchers' own choices at a width above ``MAX_BLOCK_C``;
- ``"split"``: the tile caps lowered (``SMALL_BLOCK_C`` channels,
  ``SMALL_TILE_BLOCK_T`` and ``SMALL_ROW_BLOCK_T`` rows) and every reduction
  of ``rows_per_program`` cut into two programs, each walking several tiles
  (several samples, in the unshuffle backward).

Every launch of the op kernels is recorded (grid and arguments), and the test
ends with ``tiles.check({kernel name: paths it must take})``: the kernels must
have been launched, and in ``"wide"`` mode every launch of a kernel promised
``CHANNELS`` must have several channel blocks, in ``"split"`` mode every
launch must take every path promised, so that a change of the tile choices
cannot silently stop a row from covering its path.
"""
import pytest

import edt_kernels.ops._triton_utils as _tu
from edt_kernels.ops import gated_residual, gather_scatter, layernorm_modulate, masked_shortcut, random_masking, \
    unshuffle

CHANNELS, ROW_TILES, SAMPLES = "channel blocks", "row tiles of the first program", "samples of the first program"
SMALL_BLOCK_C = 32  # channels per program of the kernels tiled over channels
SMALL_TILE_BLOCK_T = 16  # rows per program of those kernels
SMALL_ROW_BLOCK_T = 4  # rows per tile of the kernels that hold whole rows
_CHECKED = {"default": (), "wide": (CHANNELS,), "split": (CHANNELS, ROW_TILES, SAMPLES)}
_OP_MODULES = (gather_scatter, unshuffle, masked_shortcut, random_masking, layernorm_modulate, gated_residual)


def tile_rows(shapes, split=()):
    """``shape, tiles`` parameter rows (ids: the shape, ``-split`` appended): ``shapes`` with the
    launchers' own tiles (``"wide"`` where C > MAX_BLOCK_C, else ``"default"``), then ``split``
    with the tiles forced down."""
    def row(shape, mode):
        return pytest.param(shape, mode, id="x".join(map(str, shape)) + ("-split" if mode == "split" else ""))

    return ([row(s, "wide" if s[-1] > _tu.MAX_BLOCK_C else "default") for s in shapes]
            + [row(s, "split") for s in split])


def _two_programs_per_reduction(rows, other_programs, block_t, target=None):
    """``rows_per_program`` with the target lowered: each reduction in two programs (rows a multiple of block_t)."""
    return _tu.rows_per_program(rows, 1, block_t, target=2)


def _count(path, grid, args):
    """How many channel blocks / row tiles / samples the launch gives its first program."""
    if path == CHANNELS:
        assert grid[1] == _tu.cdiv(args["C"], args["BLOCK_C"]), (grid, args["C"], args["BLOCK_C"])
        return grid[1]
    if path == ROW_TILES:
        rows = args["T"] if "T" in args else args["L"]
        return _tu.cdiv(min(args["ROWS_PER_PROG"], rows), args["BLOCK_T"])
    return min(args["B_PER_PROG"], args["B"])


class _RecordedKernel:
    """A kernel whose launches ``kernel[grid](*args, **kwargs)`` are appended to ``launches``
    as (name, grid, arguments by name) before they run."""

    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            named = dict(zip(self.kernel.arg_names, args), **kwargs)
            self.launches.append((self.kernel.fn.__name__, tuple(grid), named))
            return launch(*args, **kwargs)

        return run


class KernelLaunches:
    """The launches of one test (name, grid, arguments by name) and the mode its tiles run in."""

    def __init__(self, mode: str):
        self.mode = mode
        self.launches = []

    def check(self, promised) -> None:
        """``promised``: kernel name -> the paths (CHANNELS, ROW_TILES, SAMPLES) it takes in ``"split"`` mode."""
        for name, paths in promised.items():
            runs = [(grid, args) for kernel, grid, args in self.launches if kernel == name]
            assert runs, f"{name} was not launched ({self.mode} tiles)"
            for path in paths:
                if path in _CHECKED[self.mode]:
                    counts = [_count(path, grid, args) for grid, args in runs]
                    assert min(counts) > 1, f"{name}: {path} {counts} ({self.mode} tiles)"


@pytest.fixture
def tiles(request, monkeypatch) -> KernelLaunches:
    """Records the op kernels' launches; with the parameter ``"split"`` forces the tiles down (module docstring)."""
    mode = getattr(request, "param", "default")
    assert mode in _CHECKED, mode
    launches = KernelLaunches(mode)
    for module in _OP_MODULES:
        for name, obj in list(vars(module).items()):
            if name.endswith("_kernel") and getattr(getattr(obj, "fn", None), "__module__", None) == module.__name__:
                monkeypatch.setattr(module, name, _RecordedKernel(obj, launches.launches))
    if mode == "split":
        monkeypatch.setattr(_tu, "MAX_BLOCK_C", SMALL_BLOCK_C)
        monkeypatch.setattr(_tu, "MAX_TILE_BLOCK_T", SMALL_TILE_BLOCK_T)
        monkeypatch.setattr(_tu, "MAX_ROW_BLOCK_T", SMALL_ROW_BLOCK_T)
        for module in _OP_MODULES:
            if getattr(module, "rows_per_program", None) is _tu.rows_per_program:
                monkeypatch.setattr(module, "rows_per_program", _two_programs_per_reduction)
    return launches
