"""benchmarks/profiling/gather_locality.py: the host-side count of the table lines the
attention kernels' gathers touch (the static estimate in the sm_90 profile)."""
import pathlib
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `benchmarks` is a package at the repository root
    sys.path.insert(0, str(ROOT))

from benchmarks.profiling import gather_locality as G  # noqa: E402

TTGIR = """#blocked = #ttg.blocked<{sizePerThread = [1], threadsPerWarp = [32], warpsPerCTA = [4], order = [0]}>
#blocked1 = #ttg.blocked<{sizePerThread = [1, 8], threadsPerWarp = [4, 8], warpsPerCTA = [4, 1], order = [1, 0]}>
module {
    %tb = tt.splat %table_ptr : !tt.ptr<f32> -> tensor<64x64x!tt.ptr<f32>, #blocked1> loc(#loc314)
}
"""


PACKED_TTGIR = """#blocked = #ttg.blocked<{sizePerThread = [1, 8], threadsPerWarp = [4, 8], warpsPerCTA = [8, 1], order = [1, 0]}>
module {
      %g_279 = tt.load %g_278 : tensor<128x64x!tt.ptr<i64>, #blocked> loc(#loc458)
}
"""


def test_parse_table_layout():
    assert G.parse_table_layout(TTGIR) == dict(kind="blocked", sizePerThread=[1, 8], threadsPerWarp=[4, 8],
                                               warpsPerCTA=[4, 1], order=[1, 0], entry_bytes=4)
    assert G.parse_table_layout(TTGIR, pointer="amm_ptr") is None
    # The packed (table, AMM) gather of the forward kernel: 8-byte entries.
    assert G.parse_table_layout(PACKED_TTGIR) == dict(kind="blocked", sizePerThread=[1, 8], threadsPerWarp=[4, 8],
                                                      warpsPerCTA=[8, 1], order=[1, 0], entry_bytes=8)


@pytest.mark.parametrize("layout", [G.DEFAULT_LAYOUT, dict(kind="mma", warpsPerCTA=[4, 1], instrN=64),
                                    dict(kind="blocked", sizePerThread=[1, 1], threadsPerWarp=[2, 16],
                                         warpsPerCTA=[2, 2], order=[0, 1])], ids=["blocked", "mma", "order01"])
def test_warp_loads_cover_the_tile_once_per_thread_slot(layout):
    bm, bn = 64, 64
    rc = G.warp_loads(layout, bm, bn)
    assert rc.shape[1:] == (32, 2)
    # every element of the tile is read, by exactly one (load, lane) when the layout tiles it exactly
    flat = rc[..., 0] * bn + rc[..., 1]
    assert torch.equal(flat.flatten().sort().values, torch.arange(bm * bn))


def test_blocked_mapping_by_hand():
    rc = G.warp_loads(G.DEFAULT_LAYOUT, 128, 64)
    # first load of warp 0: lanes 0..31 -> rows 0..3, columns 0, 8, ..., 56
    assert rc[0].tolist() == [[r, 8 * c] for r in range(4) for c in range(8)]


def test_distinct_counts():
    vals = torch.tensor([[3, 3, 4, 9], [1, 1, 1, 1], [5, 6, 7, 8]])
    valid = torch.tensor([[True, True, True, True], [True, True, False, True], [True, False, False, False]])
    assert G._distinct(vals, valid).tolist() == [3, 1, 1]


def test_table_index_is_the_offset_row():
    side = 4
    pos = torch.tensor([[0, 5, 15]])
    idx = G.table_index(pos, side, side)
    for a, pa in enumerate(pos[0].tolist()):
        for b, pb in enumerate(pos[0].tolist()):
            dy, dx = pa // side - pb // side, pa % side - pb % side
            assert idx[0, a, b] == (dy + side - 1) * (2 * side - 1) + dx + side - 1


def test_sorted_positions_touch_fewer_lines():
    loc = G.locality(batch=2, heads=2)
    r, s, f = (loc["cases"][k] for k in ("random", "sorted", "full grid"))
    assert loc["label"] == "static estimate"
    assert r["tokens"] == s["tokens"] == 179 and f["tokens"] == 256
    assert r["pairs_per_tile"] == s["pairs_per_tile"]  # same kept count, same tiles
    for key in ("table_lines_per_tile", "table_lines_per_warp_load", "amm_lines_per_warp_load"):
        assert 1 <= s[key] < r[key], key
        assert f[key] <= s[key], key
    assert r["table_lines_per_warp_load"] <= 32
    assert "static estimate" in G.markdown(loc)
