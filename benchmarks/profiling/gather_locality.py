"""Locality of the attention kernels' per-offset table gathers, computed on the host (a static estimate).

For a tile of scores the forward kernel reads the packed per-offset table
entry of head ``h`` at ``idx(p_i, p_j)`` (head-major ``[H, n_table]``: the
float32 bias table, or (table, AMM) pairs as one 8-byte entry; stored in
reversed offset order, which does not change the counts) at

    u(p) = (p // cols) * (2 cols - 1) + p % cols,   idx = u(p_i) - u(p_j) + (rows - 1)(2 cols - 1) + cols - 1,

the same expression as the kernel.  This module counts, from the index
pattern alone, how many distinct 128-byte lines (and 32-byte sectors) those
gathers touch:

* per tile: all valid (query, key) pairs of one ``BLOCK_M x BLOCK_N`` tile, per head;
* per warp-load: the 32 addresses of one warp instruction, with the lanes
  mapped to tile elements by the distributed layout the compiled kernel gives
  the table's pointer tensor (read from its TTGIR) -- one scalar gather per
  register, as the pointers carry no contiguity.

MDT's masked training keeps K of L tokens; ``random`` is the order of the
random draw (MDT's ``ids_keep``), ``sorted`` the same kept set in grid order
(``random_masking(..., sort_kept=True)``), ``full grid`` all L tokens in grid
order (no masking) for reference.  Assumes a 128-byte aligned table base
(PyTorch's CUDA allocator aligns to 512 bytes).  Not a measurement: caches,
the L1/shared-memory path of asynchronous copies and reuse across tiles are
not modelled.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional

import torch

LINE_BYTES = 128
SECTOR_BYTES = 32
STATIC = "static estimate"

# Table load layout when no compiled kernel is given: the one the sm_90 forward
# kernel's TTGIR assigns to the table pointers at BLOCK_M=128, BLOCK_N=64, 8 warps.
DEFAULT_LAYOUT = dict(kind="blocked", sizePerThread=[1, 8], threadsPerWarp=[4, 8], warpsPerCTA=[8, 1],
                      order=[1, 0])


# ----------------------------------------------------------------------------- layouts

def parse_table_layout(ttgir: str, pointer: str = "table_ptr") -> Optional[dict]:
    """The distributed layout of the 2-D tensor of ``pointer`` pointers in a TTGIR
    module (``tt.splat %<pointer>``), as a dict; None if not found or not parsed."""
    m = re.search(r"tt\.splat %" + re.escape(pointer) + r"\b[^\n]*tensor<\d+x\d+x!tt\.ptr<([^>]+)>, #(\w+)>",
                  ttgir)
    if not m:
        # The packed per-offset table: the 2-D gather ``g = tl.load(tab_h + (u_n - u_m))``
        # of the forward kernel (i64 entries = (table, AMM) pairs, f32 = one of them).
        m = re.search(r"%g(?:_\d+)? = tt\.load %\S+ : tensor<\d+x\d+x!tt\.ptr<(i64|f32)>, #(\w+)>", ttgir)
    if not m:
        return None
    entry_bytes = 8 if m.group(1) in ("i64", "f64") else 4
    name = m.group(2)
    d = re.search(r"^#" + re.escape(name) + r" = #ttg\.(\w+)<\{(.*)\}>", ttgir, re.M)
    if not d:
        return None
    kind, body = d.group(1), d.group(2)

    def ints(key):
        mm = re.search(key + r" = \[([\d, ]+)\]", body)
        return [int(v) for v in mm.group(1).split(",")] if mm else None

    if kind == "blocked":
        lay = dict(kind="blocked", sizePerThread=ints("sizePerThread"), threadsPerWarp=ints("threadsPerWarp"),
                   warpsPerCTA=ints("warpsPerCTA"), order=ints("order"))
        return dict(lay, entry_bytes=entry_bytes) if all(lay.values()) and len(lay["order"]) == 2 else None
    if kind == "nvidia_mma":
        inst = ints("instrShape")
        return dict(kind="mma", warpsPerCTA=ints("warpsPerCTA"), instrN=inst[1] if inst else 8,
                    entry_bytes=entry_bytes)
    return None


def layout_str(lay: dict) -> str:
    if lay["kind"] == "blocked":
        return (f"blocked sizePerThread={lay['sizePerThread']} threadsPerWarp={lay['threadsPerWarp']} "
                f"warpsPerCTA={lay['warpsPerCTA']} order={lay['order']}")
    return f"mma accumulator warpsPerCTA={lay['warpsPerCTA']} instrN={lay['instrN']}"


def warp_loads(lay: dict, bm: int, bn: int) -> torch.Tensor:
    """``[loads, 32, 2]``: the (row, col) of the tile element each lane reads in
    each warp instruction of one gather over a ``bm x bn`` tile."""
    groups: List[List[tuple]] = []
    if lay["kind"] == "blocked":
        s0, s1 = lay["sizePerThread"]
        t0, t1 = lay["threadsPerWarp"]
        w0, w1 = lay["warpsPerCTA"]
        fast = lay["order"][0] == 1  # dim 1 varies fastest across lanes and warps
        tile0, tile1 = s0 * t0 * w0, s1 * t1 * w1
        for warp in range(w0 * w1):
            wr, wc = (warp // w1, warp % w1) if fast else (warp % w0, warp // w0)
            for rep0 in range(-(-bm // tile0)):
                for rep1 in range(-(-bn // tile1)):
                    for e0 in range(s0):
                        for e1 in range(s1):
                            g = []
                            for lane in range(32):
                                lr, lc = (lane // t1, lane % t1) if fast else (lane % t0, lane // t0)
                                g.append(((rep0 * tile0 + wr * s0 * t0 + lr * s0 + e0) % bm,
                                          (rep1 * tile1 + wc * s1 * t1 + lc * s1 + e1) % bn))
                            groups.append(g)
    else:  # mma / wgmma accumulator: a warp owns 16 rows; lane l rows l//4 (+8), cols 2(l%4) (+1) per 8
        w0, w1 = lay["warpsPerCTA"]
        n_w = lay["instrN"]
        for wr in range(w0):
            for wc in range(w1):
                for rep0 in range(-(-bm // (16 * w0))):
                    for rep1 in range(-(-bn // (n_w * w1))):
                        for half in range(2):
                            for chunk in range(n_w // 8):
                                for e in range(2):
                                    groups.append([((rep0 * 16 * w0 + wr * 16 + lane // 4 + 8 * half) % bm,
                                                    (rep1 * n_w * w1 + wc * n_w + 8 * chunk + 2 * (lane % 4) + e)
                                                    % bn) for lane in range(32)])
    return torch.tensor(groups, dtype=torch.int64)


# ----------------------------------------------------------------------------- counting

def table_index(pos: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``[B, N]`` grid positions -> ``[B, N, N]`` table offsets, as the kernel computes them."""
    u = (pos // cols) * (2 * cols - 1) + pos % cols
    return u[:, :, None] - u[:, None, :] + (rows - 1) * (2 * cols - 1) + cols - 1


def _distinct(vals: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Distinct values per row of ``vals [M, n]`` (non-negative) among ``valid`` entries."""
    lo = vals.min()
    seen = torch.zeros(vals.shape[0], int(vals.max() - lo) + 2, dtype=torch.bool)
    slot = torch.where(valid, vals - lo + 1, torch.zeros_like(vals))  # column 0 takes the invalid lanes
    seen.scatter_(1, slot, True)
    return seen[:, 1:].sum(-1)


def _units(idx_flat: torch.Tensor, valid: torch.Tensor, heads: int, n_table: int, unit: int,
           entry: int = 4) -> torch.Tensor:
    """Mean distinct ``unit``-byte blocks over rows of ``idx_flat [M, n]`` (rows
    with a valid entry), for the head-major table (row h at h * n_table floats)."""
    keep = valid.any(-1)
    per = [_distinct(((h * n_table + idx_flat) * entry) // unit, valid)[keep].double() for h in range(heads)]
    return torch.stack(per).mean()


def _tiles(idx: torch.Tensor, n: int, bm: int, bn: int, rc: torch.Tensor):
    """Gather ``idx [B, N, N]`` at ``rc [G, 32, 2]`` offsets of every tile -> (vals, valid) ``[B*T*G, 32]``."""
    out_v, out_ok = [], []
    for qi in range(-(-n // bm)):
        for ki in range(-(-n // bn)):
            r = qi * bm + rc[..., 0]
            c = ki * bn + rc[..., 1]
            ok = (r < n) & (c < n)
            vals = idx[:, r.clamp(max=n - 1), c.clamp(max=n - 1)]
            out_v.append(vals.reshape(-1, rc.shape[-2]))
            out_ok.append(ok.expand_as(vals).reshape(-1, rc.shape[-2]))
    return torch.cat(out_v), torch.cat(out_ok)


def kept_positions(batch: int, side: int, kept: int, sort: bool, seed: int = 0) -> torch.Tensor:
    """MDT's kept positions ``[batch, kept]`` from ``random_masking`` (PyTorch backend)."""
    from edt_kernels import random_masking

    length = side * side
    ratio = 1.0 - (kept + 0.5) / length  # int(L * (1 - ratio)) == kept
    x = torch.zeros(batch, length, 1)
    ids_keep = random_masking(x, ratio, torch.Generator().manual_seed(seed), sort_kept=sort, backend="torch")[3]
    assert ids_keep.shape[1] == kept
    return ids_keep


def locality(side: int = 16, kept: int = 179, heads: int = 16, batch: int = 8, tile: int = 64,
             layout: Optional[dict] = None, warp_tile=(128, 64), seed: int = 0) -> Dict:
    """Distinct lines/sectors of the table (per head) and AMM gathers, random
    vs sorted kept positions vs the full grid."""
    lay = layout or DEFAULT_LAYOUT
    eb = lay.get("entry_bytes", 4)
    bm_w, bn_w = warp_tile
    n_table = (2 * side - 1) ** 2
    full = torch.arange(side * side).expand(batch, -1)
    cases = {"random": kept_positions(batch, side, kept, False, seed),
             "sorted": kept_positions(batch, side, kept, True, seed), "full grid": full}
    tile_rc = torch.stack(torch.meshgrid(torch.arange(tile), torch.arange(tile), indexing="ij"), -1)
    tile_rc = tile_rc.reshape(1, tile * tile, 2)
    warp_rc = warp_loads(lay, bm_w, bn_w)
    res = {}
    for name, pos in cases.items():
        n = pos.shape[1]
        idx = table_index(pos, side, side)
        tv, tok = _tiles(idx, n, tile, tile, tile_rc)
        wv, wok = _tiles(idx, n, bm_w, bn_w, warp_rc)
        res[name] = dict(
            tokens=n,
            pairs_per_tile=round(tok.sum(-1)[tok.any(-1)].double().mean().item(), 1),
            table_lines_per_tile=round(_units(tv, tok, heads, n_table, LINE_BYTES, eb).item(), 2),
            amm_lines_per_tile=round(_units(tv, tok, 1, n_table, LINE_BYTES).item(), 2),
            table_lines_per_warp_load=round(_units(wv, wok, heads, n_table, LINE_BYTES, eb).item(), 2),
            table_sectors_per_warp_load=round(_units(wv, wok, heads, n_table, SECTOR_BYTES, eb).item(), 2),
            amm_lines_per_warp_load=round(_units(wv, wok, 1, n_table, LINE_BYTES).item(), 2),
        )
    return dict(label=STATIC, grid=f"{side}x{side}", kept=kept, of=side * side, heads=heads, batch=batch,
                table=(f"head-major [{heads}, {n_table}], {eb}-byte entries ({n_table * eb} B per head"
                       + (": (table, AMM) pairs, one gather)" if eb == 8 else ")")),
                amm=f"float32 [{n_table}]", tile=f"{tile}x{tile}", warp_tile=f"{bm_w}x{bn_w}",
                layout=layout_str(lay), layout_source=lay.get("source", "default"), cases=res)


def from_compiled(records: List[dict], **kw) -> Dict:
    """:func:`locality` with the table-load layout and tile of a compiled forward
    kernel among the sm_90 profile's records (a positions specialisation first,
    then the head dim nearest MDT-XL's 72)."""
    fwd = [r for r in records if r["kernel"] == "_amm_attn_fwd_kernel" and "table" in r["spec"].get("feature", "")
           and not r.get("rejected")]
    fwd.sort(key=lambda r: ("pos" not in r["spec"]["feature"], abs((r["spec"].get("head_dim") or 0) - 72)))
    for r in fwd:
        lay = parse_table_layout(r["compiled"].asm.get("ttgir", ""))
        if lay is not None:
            la = r["launch"]
            lay["source"] = (f"TTGIR of _amm_attn_fwd_kernel {r['spec']['dtype']} {r['spec']['feature']} "
                             f"D={r['spec']['head_dim']} BLOCK_M={la.get('BLOCK_M')} BLOCK_N={la.get('BLOCK_N')}")
            return locality(layout=lay, warp_tile=(la.get("BLOCK_M", 64), la.get("BLOCK_N", 64)), **kw)
    return locality(**kw)


def markdown(loc: Dict) -> str:
    lines = [f"## Table-gather locality, MDT masked ({STATIC}, from the index pattern on the host)", "",
             f"{loc['grid']} grid, {loc['kept']} of {loc['of']} tokens kept, {loc['heads']} heads, "
             f"{loc['batch']} samples; table {loc['table']}, AMM {loc['amm']}; 128-byte lines, 32-byte sectors, "
             f"table base 128-byte aligned.  Per tile: the valid pairs of a {loc['tile']} tile.  Per warp-load: "
             f"the 32 lanes of one gather instruction on a {loc['warp_tile']} tile, lanes placed by the layout "
             f"{loc['layout']} ({loc['layout_source']}); at most 32 (one line per element).  `random`: the kept "
             "tokens in the order of the random draw; `sorted`: `random_masking(..., sort_kept=True)`, MDTv2's "
             "default; `full grid`: no masking.  Caches, asynchronous copies and reuse across tiles are not "
             "modelled.", "",
             "| positions | tokens | pairs/tile | table lines/tile (per head) | AMM lines/tile | "
             "table lines/warp-load | table sectors/warp-load | AMM lines/warp-load |",
             "|---|---|---|---|---|---|---|---|"]
    for name, c in loc["cases"].items():
        lines.append(f"| {name} | {c['tokens']} | {c['pairs_per_tile']} | {c['table_lines_per_tile']} | "
                     f"{c['amm_lines_per_tile']} | {c['table_lines_per_warp_load']} | "
                     f"{c['table_sectors_per_warp_load']} | {c['amm_lines_per_warp_load']} |")
    return "\n".join(lines) + "\n"
