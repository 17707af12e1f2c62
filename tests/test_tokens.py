"""Token kernels (edt_kernels.ops.tokens): MDT's masking, gather/scatter,
unshuffle with mask token, masked shortcut, EDT's patch-merge front end.

Two chains of evidence:
- the references (``edt_kernels.reference.tokens``, which the torch backend
  runs) against independent loop-by-loop definitions in float64, values and
  gradients;
- the Triton kernels (on CPU through the interpreter) against the references
  evaluated in float64 on the same inputs, in float32 and float16, values and
  gradients, with every kernel output pre-filled with NaN (poison) so that an
  element the kernel does not write fails the test.  The shapes include
  MDTv2-XL's width and one small shape with the launchers' tiles forced down
  (``helpers/tiles.py``), so that every kernel also runs split into several
  channel blocks, row tiles or samples per program as at the model's widths.
"""
import pytest
import torch

import edt_kernels
from edt_kernels import backends
from edt_kernels.ops import gather_scatter, masked_shortcut, patch_merge_modulate, random_masking, unshuffle
from edt_kernels.ops.random_masking import kept_count
from edt_kernels.reference.tokens import (
    reference_gather_tokens,
    reference_masked_shortcut,
    reference_patch_merge_modulate,
    reference_random_masking,
    reference_scatter_tokens,
    reference_sort_kept_ids,
    reference_unshuffle_with_mask_token,
)
from helpers.poison import poison  # noqa: F401 - fixture
from helpers.tiles import CHANNELS, ROW_TILES, SAMPLES, tile_rows, tiles  # noqa: F401 - fixture
from tolerances import GRAD_TOL, assert_close

TRITON_DTYPES = [torch.float32, torch.float16]  # the interpreter mishandles bfloat16
SHAPES = [(2, 37, 52), (3, 16, 100), (1, 50, 117)]  # odd C (52 = head dim, 117 = 936 / 8), odd L
MERGE_CASES = [((4, 6), 13), ((6, 6), 25), ((2, 2), 29)]  # (grid, C): 4C = 52, 100, 116
# The Triton tests' ``shape, tiles`` rows (helpers/tiles.py): SHAPES and MDTv2-XL's width (3 channel blocks) with
# the launchers' own tiles, then SPLIT_SHAPE with the tiles forced down: 2 channel blocks of 32, the second one
# partial, and 2 samples per unshuffle-backward program, the second program's last sample absent.
WIDE_SHAPE, SPLIT_SHAPE = (1, 6, 1152), (3, 37, 52)
TILED_SHAPES = tile_rows(SHAPES + [WIDE_SHAPE], split=[SPLIT_SHAPE])
# ``grid, C, tiles`` rows: the split one's T = 9 merged rows go to two backward programs of two row tiles of 4.
MERGE_ROWS = ([pytest.param(g, c, "default", id=f"{g[0]}x{g[1]}-{c}") for g, c in MERGE_CASES]
              + [pytest.param((6, 6), 25, "split", id="6x6-25-split")])


def _id(v):
    if isinstance(v, torch.dtype):
        return str(v).replace("torch.", "")
    return "x".join(map(str, v)) if isinstance(v, tuple) else str(v)


def _rand(shape, dtype, gen, device="cpu", requires_grad=True):
    t = torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    return t.requires_grad_(requires_grad)


def _f64(*tensors):
    """float64 leaf copies of low-precision inputs (the reference's inputs)."""
    return [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in tensors]


def _perm_ids(B, L, K, gen, device="cpu"):
    """ids_keep [B, K] (unique per row) and the matching ids_restore [B, L]."""
    shuffle = torch.argsort(torch.rand(B, L, generator=gen), dim=1)
    return shuffle[:, :K].to(device), torch.argsort(shuffle, dim=1).to(device)


def _grads(out, inputs, dout):
    want = [t for t in inputs if t is not None and t.requires_grad]
    return torch.autograd.grad(out, want, dout)


# ============================================================================ independent definitions

def naive_gather(x, ids):
    return torch.stack([torch.stack([x[b, int(i)] for i in ids[b]]) for b in range(x.shape[0])])


def naive_unshuffle(x_kept, ids_restore, mask_token, pos_embed):
    B, K, C = x_kept.shape
    rows = []
    for b in range(B):
        r = [x_kept[b, int(i)] if int(i) < K else mask_token[0, 0] for i in ids_restore[b]]
        rows.append(torch.stack(r))
    out = torch.stack(rows)
    return out if pos_embed is None else out + pos_embed


def naive_patch_merge_modulate(x, shift, scale, keep, H, W, eps=1e-6):
    B, L, C = x.shape
    g = x.reshape(B, H, W, C)
    tokens = []
    per_source = keep is not None and keep.shape[1] == L
    ks = keep.reshape(B, H, W).to(x.dtype) if per_source else None
    tokens, factors = [], []
    for i in range(H // 2):
        for w in range(W // 2):
            r, c = 2 * i, 2 * w
            cells = [(r, c), (r + 1, c), (r, c + 1), (r + 1, c + 1)]
            tokens.append(torch.cat([g[:, a, b_] for a, b_ in cells], -1))
            if per_source:  # each input token's keep bit covers its C channels
                factors.append(torch.cat([ks[:, a, b_, None].expand(B, C) for a, b_ in cells], -1))
    m = torch.stack(tokens, 1)
    mu = m.mean(-1, keepdim=True)
    var = ((m - mu) ** 2).mean(-1, keepdim=True)
    out = (m - mu) / torch.sqrt(var + eps) * (1 + scale[:, None]) + shift[:, None]
    if per_source:
        return out * torch.stack(factors, 1)
    return out if keep is None else out * keep[..., None].to(out.dtype)


def mdt_random_masking(x, mask_ratio, generator):
    """MDT's algorithm step by step, as the authors' ``random_masking`` does it."""
    N, L, D = x.shape
    len_keep = int(L * (1 - mask_ratio))
    noise = torch.rand(N, L, device=x.device, generator=generator)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_masked = torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, D))
    mask = torch.ones([N, L], device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return x_masked, mask, ids_restore, ids_keep


# ============================================================================ torch backend (float64)

@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_torch_gather_scatter_unshuffle_match_loops(shape):
    B, L, C = shape
    gen = torch.Generator().manual_seed(sum(shape))
    K = int(L * 0.6)
    ids_keep, ids_restore = _perm_ids(B, L, K, gen)
    x = _rand((B, L, C), torch.float64, gen)
    y = _rand((B, K, C), torch.float64, gen)
    mt = _rand((1, 1, C), torch.float64, gen)
    pos = _rand((1, L, C), torch.float64, gen)

    out = edt_kernels.gather_tokens(x, ids_keep, backend="torch")
    expect = naive_gather(x, ids_keep)
    assert_close(out, expect, torch.float64, name="gather")
    d = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    assert_close(_grads(out, [x], d)[0], _grads(expect, [x], d)[0], torch.float64, GRAD_TOL, "gather dx")

    out = edt_kernels.scatter_tokens(y, ids_keep, L, backend="torch")
    expect = torch.zeros(B, L, C, dtype=torch.float64)
    for b in range(B):
        for k in range(K):
            expect[b, ids_keep[b, k]] = y[b, k].detach()
    assert_close(out, expect, torch.float64, name="scatter")

    out = edt_kernels.unshuffle_with_mask_token(y, ids_restore, mt, pos, backend="torch")
    expect = naive_unshuffle(y, ids_restore, mt, pos)
    assert_close(out, expect, torch.float64, name="unshuffle")
    d = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    for got, want, n in zip(_grads(out, [y, mt, pos], d), _grads(expect, [y, mt, pos], d),
                            ["dx_kept", "dmask_token", "dpos"]):
        assert_close(got, want, torch.float64, GRAD_TOL, n)


@pytest.mark.parametrize("per_source", [False, True], ids=["keep-merged", "keep-source"])
@pytest.mark.parametrize("grid,C", MERGE_CASES, ids=_id)
def test_torch_patch_merge_modulate_matches_loops(grid, C, per_source):
    H, W = grid
    B = 2
    gen = torch.Generator().manual_seed(H * W + C)
    x = _rand((B, H * W, C), torch.float64, gen)
    shift, scale = _rand((B, 4 * C), torch.float64, gen), _rand((B, 4 * C), torch.float64, gen)
    keep = torch.rand(B, H * W if per_source else H * W // 4, generator=gen) >= 0.4
    out = edt_kernels.patch_merge_modulate(x, shift, scale, keep, grid=grid, backend="torch")
    expect = naive_patch_merge_modulate(x, shift, scale, keep, H, W)
    assert_close(out, expect, torch.float64, name="patch_merge_modulate")
    d = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    for got, want, n in zip(_grads(out, [x, shift, scale], d), _grads(expect, [x, shift, scale], d),
                            ["dx", "dshift", "dscale"]):
        assert_close(got, want, torch.float64, GRAD_TOL, n)


def test_torch_masked_shortcut_matches_where():
    gen = torch.Generator().manual_seed(3)
    B, L, C = 2, 21, 52
    x, xb = _rand((B, L, C), torch.float64, gen), _rand((B, L, C), torch.float64, gen)
    mask = torch.rand(B, L, generator=gen) < 0.5
    out = edt_kernels.masked_shortcut(x, xb, mask.double(), backend="torch")
    assert_close(out, torch.where(mask[..., None], x, xb), torch.float64, name="masked_shortcut")


@pytest.mark.parametrize("ratio", [0.3, 0.45, torch.tensor([0.3]) + 0.2 * torch.tensor([0.71])],
                         ids=["0.3", "0.45", "tensor"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_random_masking_is_mdt(backend, ratio):
    """Same generator state -> exactly MDT's outputs (for both backends)."""
    B, L, C = 3, 37, 52
    x = _rand((B, L, C), torch.float32, torch.Generator().manual_seed(0))
    got = edt_kernels.random_masking(x, ratio, torch.Generator().manual_seed(11), backend=backend)
    want = mdt_random_masking(x, ratio, torch.Generator().manual_seed(11))
    for g, w, name in zip(got, want, ["x_kept", "mask", "ids_restore", "ids_keep"]):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert torch.equal(g, w), name
    assert got[3].shape[1] == int(L * (1 - float(ratio)))


def _sorted_slots(ids_keep, L):
    """Loop-by-loop: slot of every position when the kept ones (ascending) come
    first and the removed ones (ascending) after them."""
    B, K = ids_keep.shape
    slots = torch.empty(B, L, dtype=torch.int64)
    for b in range(B):
        kept = set(ids_keep[b].tolist())
        n_kept = n_removed = 0
        for i in range(L):
            if i in kept:
                slots[b, i] = n_kept
                n_kept += 1
            else:
                slots[b, i] = K + n_removed
                n_removed += 1
    return slots


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.45, torch.tensor([0.3]) + 0.2 * torch.tensor([0.71])],
                         ids=["0", "0.3", "0.45", "tensor"])
def test_random_masking_sort_kept_is_mdt_in_position_order(ratio):
    """sort_kept=True: MDT's kept set and mask from the same draws, the kept
    tokens (and after them the removed ones) in ascending position order."""
    B, L, C = 3, 37, 5
    x = _rand((B, L, C), torch.float64, torch.Generator().manual_seed(0))
    x_kept, mask, ids_restore, ids_keep = edt_kernels.random_masking(
        x, ratio, torch.Generator().manual_seed(11), sort_kept=True, backend="torch")
    _, mdt_mask, _, mdt_keep = mdt_random_masking(x, ratio, torch.Generator().manual_seed(11))
    assert torch.equal(mask, mdt_mask)
    assert torch.equal(ids_keep, mdt_keep.sort(dim=1).values)
    assert torch.equal(ids_restore, _sorted_slots(mdt_keep, L))
    assert torch.equal(x_kept, torch.stack([x[b, ids_keep[b]] for b in range(B)]))


def test_reference_sort_kept_ids_loops():
    gen = torch.Generator().manual_seed(3)
    for B, L, K in ((2, 10, 0), (3, 37, 25), (1, 16, 16)):
        shuffle = torch.argsort(torch.rand(B, L, generator=gen), dim=1)
        got = reference_sort_kept_ids(shuffle, K)
        assert torch.equal(torch.argsort(got, dim=1), _sorted_slots(shuffle[:, :K], L))


def test_random_masking_default_generator_and_reference():
    x = torch.randn(2, 16, 8)
    with torch.random.fork_rng():
        torch.manual_seed(5)
        got = edt_kernels.random_masking(x, 0.5)
        torch.manual_seed(5)
        want = reference_random_masking(x, 0.5)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    # mask: 1 = removed, in the original order, and exactly L - K ones per row
    assert torch.equal(got[1].sum(1), torch.full((2,), 8.0))
    assert torch.equal(torch.gather(got[1], 1, got[3]), torch.zeros(2, 8))


# ============================================================================ triton vs reference

@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=_id)
@pytest.mark.parametrize("shape,tiles", TILED_SHAPES, indirect=["tiles"])
def test_triton_gather_scatter(shape, dtype, device, poison, tiles):
    B, L, C = shape
    gen = torch.Generator().manual_seed(L + C)
    K = int(L * 0.7)
    ids_keep, _ = _perm_ids(B, L, K, gen, device)
    x = _rand((B, L, C), dtype, gen, device)
    out = edt_kernels.gather_tokens(x, ids_keep, backend="triton")
    (x64,) = _f64(x)
    ref = reference_gather_tokens(x64, ids_keep)
    assert out.dtype == dtype
    assert_close(out, ref, dtype, name="gather")
    d = _rand(out.shape, dtype, gen, device, requires_grad=False)
    assert_close(_grads(out, [x], d)[0], _grads(ref, [x64], d.double())[0], dtype, GRAD_TOL, "gather dx")

    y = _rand((B, K, C), dtype, gen, device)
    out = edt_kernels.scatter_tokens(y, ids_keep, L, backend="triton")
    (y64,) = _f64(y)
    ref = reference_scatter_tokens(y64, ids_keep, L)
    assert_close(out, ref, dtype, name="scatter")
    d = _rand(out.shape, dtype, gen, device, requires_grad=False)
    assert_close(_grads(out, [y], d)[0], _grads(ref, [y64], d.double())[0], dtype, GRAD_TOL, "scatter dy")
    tiles.check({"_gather_rows_kernel": [CHANNELS], "_unshuffle_rows_kernel": [CHANNELS]})


@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=_id)
@pytest.mark.parametrize("shape,tiles", TILED_SHAPES, indirect=["tiles"])
def test_triton_random_masking(shape, dtype, device, poison, tiles):
    B, L, C = shape
    x = _rand((B, L, C), dtype, torch.Generator().manual_seed(1), device)
    gen_kind = "cuda" if device == "cuda" else "cpu"
    got = edt_kernels.random_masking(x, 0.37, torch.Generator(gen_kind).manual_seed(7), backend="triton")
    want = reference_random_masking(x, 0.37, torch.Generator(gen_kind).manual_seed(7))
    for g, w, name in zip(got, want, ["x_kept", "mask", "ids_restore", "ids_keep"]):
        assert torch.equal(g, w), name
    d = _rand(got[0].shape, dtype, torch.Generator().manual_seed(2), device, requires_grad=False)
    dx = _grads(got[0], [x], d)[0]
    assert torch.equal(dx, _grads(want[0], [x], d)[0])
    tiles.check({"_masking_gather_kernel": [CHANNELS], "_unshuffle_rows_kernel": [CHANNELS]})


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_random_masking_drawn_ahead(backend, device, poison):
    """len_keep and noise drawn ahead (a compiled step's way) give the ratio-and-generator call's outputs."""
    x = _rand((3, 37, 5), torch.float32, torch.Generator().manual_seed(1), device)
    gen_kind = "cuda" if device == "cuda" else "cpu"
    ratio = torch.tensor([0.37])
    want = edt_kernels.random_masking(x, ratio, torch.Generator(gen_kind).manual_seed(7), sort_kept=True,
                                      backend=backend)
    noise = torch.rand(3, 37, generator=torch.Generator(gen_kind).manual_seed(7), device=device)
    got = edt_kernels.random_masking(x, len_keep=kept_count(37, ratio), noise=noise, sort_kept=True,
                                     backend=backend)
    for g, w, name in zip(got, want, ["x_kept", "mask", "ids_restore", "ids_keep"]):
        assert torch.equal(g, w), name


@pytest.mark.parametrize("ratio", [0.0, 0.37, 0.99], ids=["0", "0.37", "0.99"])
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=_id)
@pytest.mark.parametrize("shape", SHAPES + [(2, 1500, 3)], ids=_id)  # L > 1024: the sort walks 2 chunks
def test_triton_random_masking_sort_kept(shape, dtype, ratio, device, poison):
    B, L, C = shape
    x = _rand((B, L, C), dtype, torch.Generator().manual_seed(1), device)
    gen_kind = "cuda" if device == "cuda" else "cpu"
    got = edt_kernels.random_masking(x, ratio, torch.Generator(gen_kind).manual_seed(7), sort_kept=True,
                                     backend="triton")
    want = reference_random_masking(x, ratio, torch.Generator(gen_kind).manual_seed(7), sort_kept=True)
    for g, w, name in zip(got, want, ["x_kept", "mask", "ids_restore", "ids_keep"]):
        assert torch.equal(g, w), name
    d = _rand(got[0].shape, dtype, torch.Generator().manual_seed(2), device, requires_grad=False)
    assert torch.equal(_grads(got[0], [x], d)[0], _grads(want[0], [x], d)[0])


@pytest.mark.parametrize("with_pos", [True, False], ids=["pos", "nopos"])
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=_id)
@pytest.mark.parametrize("shape,tiles", TILED_SHAPES, indirect=["tiles"])
def test_triton_unshuffle_with_mask_token(shape, dtype, with_pos, device, poison, tiles):
    B, L, C = shape
    gen = torch.Generator().manual_seed(B * L + C)
    K = int(L * 0.55)
    _, ids_restore = _perm_ids(B, L, K, gen, device)
    x_kept = _rand((B, K, C), dtype, gen, device)
    mt = _rand((1, 1, C), dtype, gen, device)
    pos = _rand((1, L, C), dtype, gen, device) if with_pos else None
    out = edt_kernels.unshuffle_with_mask_token(x_kept, ids_restore, mt, pos, backend="triton")
    x64, mt64, pos64 = _f64(x_kept, mt, pos)
    ref = reference_unshuffle_with_mask_token(x64, ids_restore, mt64, pos64)
    assert out.dtype == dtype
    assert_close(out, ref, dtype, name="unshuffle")
    d = _rand(out.shape, dtype, gen, device, requires_grad=False)
    names = ["dx_kept", "dmask_token", "dpos_embed"]
    for got, want, n in zip(_grads(out, [x_kept, mt, pos], d), _grads(ref, [x64, mt64, pos64], d.double()),
                            names):
        assert got.dtype == dtype
        assert_close(got, want, dtype, GRAD_TOL, n)
    # only a pos-embed gradient has the backward sum samples in one program
    tiles.check({"_unshuffle_rows_kernel": [CHANNELS],
                 "_unshuffle_bwd_kernel": [CHANNELS, SAMPLES] if with_pos else [CHANNELS]})


@pytest.mark.parametrize("variant", ["float-mask", "bool-mask", "pos-replace"])
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=_id)
@pytest.mark.parametrize("shape,tiles", tile_rows(SHAPES[:2] + [WIDE_SHAPE], split=[SPLIT_SHAPE]), indirect=["tiles"])
def test_triton_masked_shortcut(shape, dtype, variant, device, poison, tiles):
    B, L, C = shape
    gen = torch.Generator().manual_seed(L * C)
    x = _rand((B, L, C), dtype, gen, device)
    xb = _rand((1 if variant == "pos-replace" else B, L, C), dtype, gen, device)
    keep = torch.rand(B, L, generator=gen).to(device) < 0.6
    if variant == "float-mask":  # soft mask with a gradient, [B, L, 1] as MDT writes it
        mask = torch.rand(B, L, 1, generator=gen, dtype=torch.float64).to(device, dtype).requires_grad_()
    else:
        mask = keep
    out = edt_kernels.masked_shortcut(x, xb, mask, backend="triton")
    x64, xb64, m64 = _f64(x, xb, mask if mask.is_floating_point() else None)
    ref = reference_masked_shortcut(x64, xb64, m64 if m64 is not None else mask)
    assert out.dtype == dtype
    assert_close(out, ref, dtype, name="masked_shortcut")
    d = _rand(out.shape, dtype, gen, device, requires_grad=False)
    ins, ins64 = [x, xb, mask], [x64, xb64, m64]
    for got, want, n in zip(_grads(out, ins, d), _grads(ref, ins64, d.double()), ["dx", "dx_before", "dmask"]):
        assert_close(got, want, dtype, GRAD_TOL, n)
    tiles.check({"_masked_shortcut_fwd_kernel": [CHANNELS], "_masked_shortcut_bwd_kernel": [CHANNELS]})


@pytest.mark.parametrize("keep", ["none", "bool", "float", "bool-source", "float-source"])
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=_id)
@pytest.mark.parametrize("grid,C,tiles", MERGE_ROWS, indirect=["tiles"])
def test_triton_patch_merge_modulate(grid, C, dtype, keep, device, poison, tiles):
    H, W = grid
    B = 2
    gen = torch.Generator().manual_seed(7 * H + W + C)
    x = _rand((B, H * W, C), dtype, gen, device)
    shift, scale = _rand((B, 4 * C), dtype, gen, device), _rand((B, 4 * C), dtype, gen, device)
    T = H * W // 4
    keep_mask = {"none": None,
                 "bool": (torch.rand(B, T, generator=gen) >= 0.45).to(device),
                 "float": torch.rand(B, T, generator=gen).to(device, dtype),
                 "bool-source": (torch.rand(B, H * W, generator=gen) >= 0.45).to(device),
                 "float-source": torch.rand(B, H * W, generator=gen).to(device, dtype)}[keep]
    out = edt_kernels.patch_merge_modulate(x, shift, scale, keep_mask, grid=grid, backend="triton")
    x64, s64, c64 = _f64(x, shift, scale)
    ref = reference_patch_merge_modulate(x64, s64, c64, keep_mask, grid)
    assert out.shape == (B, T, 4 * C) and out.dtype == dtype
    assert_close(out, ref, dtype, name="patch_merge_modulate")
    d = _rand(out.shape, dtype, gen, device, requires_grad=False)
    for got, want, n in zip(_grads(out, [x, shift, scale], d), _grads(ref, [x64, s64, c64], d.double()),
                            ["dx", "dshift", "dscale"]):
        assert_close(got, want, dtype, GRAD_TOL, n)
    tiles.check({"_ln_modulate_bwd_kernel": [ROW_TILES]})


def test_triton_mixed_dtypes_follow_promotion(device, poison):
    """float16 tokens with a float32 mask token / pos_embed give float32, like PyTorch."""
    gen = torch.Generator().manual_seed(4)
    B, L, K, C = 2, 10, 6, 20
    _, ids_restore = _perm_ids(B, L, K, gen, device)
    x_kept = _rand((B, K, C), torch.float16, gen, device)
    mt, pos = _rand((1, 1, C), torch.float32, gen, device), _rand((1, L, C), torch.float32, gen, device)
    out = edt_kernels.unshuffle_with_mask_token(x_kept, ids_restore, mt, pos, backend="triton")
    ref = reference_unshuffle_with_mask_token(x_kept, ids_restore, mt, pos)
    assert out.dtype == ref.dtype == torch.float32
    assert_close(out, ref, torch.float32, name="mixed unshuffle")
    d = torch.randn(out.shape, generator=gen).to(device)
    for got, want in zip(_grads(out, [x_kept, mt, pos], d), _grads(ref, [x_kept, mt, pos], d)):
        assert got.dtype == want.dtype
        assert_close(got, want, torch.float16, GRAD_TOL, "mixed grads")


def _layout(t, odd_batch_stride: bool):
    """``t`` ``[B, L, C]`` as a leaf; with ``odd_batch_stride`` (B = 1) its batch stride, of a dimension
    of length one, is 3."""
    if not odd_batch_stride:
        return t
    _, L, C = t.shape
    return t.detach().as_strided((1, L, C), (3, C, 1)).requires_grad_(t.requires_grad)


@pytest.mark.parametrize("odd", [False, True], ids=["contiguous", "odd-batch-stride"])
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=_id)
def test_triton_vector_hints_at_a_width_of_eight(dtype, odd, device, poison, monkeypatch):
    """C = 72 (a multiple of 8, not of 16, as EDT-S's 312 and EDT-XL's 936): the launchers pass ALIGN =
    16 bytes of elements and the kernels read rows as vectors.  A length-one batch whose stride is 3
    turns the hints off (ALIGN 1) and gives the same results."""
    from edt_kernels.ops import _triton_utils

    passed = []

    def recording(itemsize, *values):
        passed.append(_triton_utils.common_alignment(itemsize, *values))
        return passed[-1]

    for mod in (gather_scatter, masked_shortcut, random_masking, unshuffle):
        monkeypatch.setattr(mod, "common_alignment", recording)
    gen = torch.Generator().manual_seed(72)
    B, L, C, K = (1 if odd else 2), 19, 72, 11
    x = _layout(_rand((B, L, C), dtype, gen, device), odd)
    ids_keep, ids_restore = _perm_ids(B, L, K, gen, device)
    (x64,) = _f64(x)
    for name, fn, ref_fn in [
        ("gather", lambda a: edt_kernels.gather_tokens(a, ids_keep, backend="triton"),
         lambda a: reference_gather_tokens(a, ids_keep)),
        ("masked_shortcut", lambda a: edt_kernels.masked_shortcut(a, a * 2, keep, backend="triton"),
         lambda a: reference_masked_shortcut(a, a * 2, keep)),
    ]:
        keep = torch.rand(B, L, generator=gen).to(device) < 0.6
        out, ref = fn(x), ref_fn(x64)
        assert_close(out, ref, dtype, name=name)
        d = _rand(out.shape, dtype, gen, device, requires_grad=False)
        assert_close(_grads(out, [x], d)[0], _grads(ref, [x64], d.double())[0], dtype, GRAD_TOL, name + " dx")

    y = _layout(_rand((B, K, C), dtype, gen, device), odd)
    mt, pos = _rand((1, 1, C), dtype, gen, device), _layout(_rand((1, L, C), dtype, gen, device), odd)
    y64, mt64, pos64 = _f64(y, mt, pos)
    out = edt_kernels.unshuffle_with_mask_token(y, ids_restore, mt, pos, backend="triton")
    ref = reference_unshuffle_with_mask_token(y64, ids_restore, mt64, pos64)
    assert_close(out, ref, dtype, name="unshuffle")
    d = _rand(out.shape, dtype, gen, device, requires_grad=False)
    for got, want, n in zip(_grads(out, [y, mt, pos], d), _grads(ref, [y64, mt64, pos64], d.double()),
                            ["dx_kept", "dmask_token", "dpos"]):
        assert_close(got, want, dtype, GRAD_TOL, n)
    out = edt_kernels.scatter_tokens(y, ids_keep, L, backend="triton")
    assert_close(out, reference_scatter_tokens(y64, ids_keep, L), dtype, name="scatter")

    gen_kind = "cuda" if device == "cuda" else "cpu"
    got = edt_kernels.random_masking(x, 0.37, torch.Generator(gen_kind).manual_seed(7), backend="triton")
    want = reference_random_masking(x, 0.37, torch.Generator(gen_kind).manual_seed(7))
    for g, w, n in zip(got, want, ["x_kept", "mask", "ids_restore", "ids_keep"]):
        assert torch.equal(g, w), n
    widest = 16 // x.element_size()
    assert len(passed) >= 8 and (1 in passed if odd else set(passed) == {widest}), passed


def test_alignment_is_the_widest_vector_every_row_starts_on():
    """``alignment`` (the ALIGN the launchers pass) on views: a power of two at most 16 bytes of the narrowest
    dtype that divides each last-dim size and stride of a dimension longer than one, and the widest such;
    1 where the last dim is strided.  Pointers are left to Triton's own specialisation."""
    from edt_kernels.ops._triton_utils import alignment

    base = torch.zeros(4, 8, 72, dtype=torch.float16)
    assert alignment(base) == 8 and alignment(base.float()) == 4 and alignment(base, base.float()) == 8
    assert alignment(base[..., 1:]) == 1 and alignment(base[..., 4:68]) == 8 and alignment(base[..., ::2]) == 1
    assert alignment(torch.zeros(2, 5, 936, dtype=torch.bfloat16)) == 8
    assert alignment(torch.zeros(2, 5, 1152, dtype=torch.bfloat16)) == 8
    assert alignment(base[:1].as_strided((1, 8, 72), (3, 72, 1))) == 8  # a length-one dim's stride is never used

    def divides(a, t):
        return t.shape[-1] % a == 0 and all(st % a == 0 for st, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1)

    gen = torch.Generator().manual_seed(0)
    store = torch.zeros(3 * 64 * 64, dtype=torch.float32)

    def draw(dtype):
        flat = store.view(dtype)
        n1, n2 = (int(v) for v in torch.randint(1, 5, (2,), generator=gen))
        c = int(torch.randint(1, 40, (1,), generator=gen))
        s1 = c + int(torch.randint(0, 20, (1,), generator=gen))
        s0 = n2 * s1 + int(torch.randint(0, 20, (1,), generator=gen))
        off = int(torch.randint(0, 40, (1,), generator=gen))
        return flat.as_strided((n1, n2, c), (s0, s1, 1), off)

    for _ in range(300):
        ts = [draw(dt) for dt in (torch.float16, torch.float32)[: int(torch.randint(1, 3, (1,), generator=gen))]]
        a = alignment(*ts)
        cap = 16 // min(t.element_size() for t in ts)
        assert a & (a - 1) == 0 and 1 <= a <= cap
        assert all(divides(a, t) for t in ts), [(t.shape, t.stride(), t.storage_offset()) for t in ts]
        assert a == cap or not all(divides(2 * a, t) for t in ts)


# ============================================================================ custom ops

def _opcheck(op, args):
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration",
                                                "test_faketensor", "test_aot_dispatch_dynamic"))


def test_opcheck_gather_scatter(device):
    gen = torch.Generator().manual_seed(0)
    B, L, K, C = 2, 9, 5, 12
    ids_keep, ids_restore = _perm_ids(B, L, K, gen, device)
    x = _rand((B, L, C), torch.float32, gen, device)
    y = _rand((B, K, C), torch.float32, gen, device)
    _opcheck(torch.ops.edt_kernels.gather_tokens.default, (x, ids_keep))
    _opcheck(torch.ops.edt_kernels.scatter_tokens.default, (y, ids_keep, L))
    mt, pos = _rand((1, 1, C), torch.float32, gen, device), _rand((1, L, C), torch.float32, gen, device)
    _opcheck(torch.ops.edt_kernels.unshuffle_with_mask_token.default, (y, ids_restore, mt, pos))
    _opcheck(torch.ops.edt_kernels.unshuffle_with_mask_token.default, (y, ids_restore, mt, None))


def test_opcheck_masking_shortcut_merge(device):
    gen = torch.Generator().manual_seed(1)
    B, L, C = 2, 16, 6
    x = _rand((B, L, C), torch.float32, gen, device)
    shuffle = torch.argsort(torch.rand(B, L, generator=gen), 1).to(device)
    _opcheck(torch.ops.edt_kernels.random_masking_gather.default, (x, shuffle, 9))
    _opcheck(torch.ops.edt_kernels.sort_kept_ids.default, (shuffle, 9))
    xb = _rand((1, L, C), torch.float32, gen, device)
    m = torch.rand(B, L, generator=gen).to(device).requires_grad_()
    _opcheck(torch.ops.edt_kernels.masked_shortcut.default, (x, xb, m))
    shift, scale = _rand((B, 4 * C), torch.float32, gen, device), _rand((B, 4 * C), torch.float32, gen, device)
    keep = (torch.rand(B, L // 4, generator=gen) > 0.5).float().to(device)
    _opcheck(torch.ops.edt_kernels.patch_merge_modulate.default, (x, shift, scale, keep, 4, 4, 1e-6))


def test_ops_never_touch_out_of_range_indices(device, poison):
    """The ops do not validate; their kernels mask every index: an index
    outside [0, L) reads as a zero row (gather) / the mask token (unshuffle)
    and a scatter to it is dropped."""
    B, L, K, C = 2, 6, 4, 5
    x = torch.randn(B, L, C, device=device)
    ids = torch.tensor([[0, L, -3, 2], [10**6, 1, 5, -1]], device=device)
    out = torch.ops.edt_kernels.gather_tokens(x, ids)
    valid = (ids >= 0) & (ids < L)
    assert torch.equal(out[valid], x[torch.arange(B, device=device)[:, None].expand(B, K)[valid], ids[valid]])
    assert torch.equal(out[~valid], torch.zeros_like(out[~valid]))

    y = torch.randn(B, K, C, device=device)
    out = torch.ops.edt_kernels.scatter_tokens(y, ids, L)
    expect = torch.zeros(B, L, C, device=device)
    for b in range(B):
        for k in range(K):
            if valid[b, k]:
                expect[b, ids[b, k]] = y[b, k]
    assert torch.equal(out, expect)

    restore = torch.tensor([[0, 1, 2, 3, 4, L + 7], [-2, 3, 2, 1, 0, 5]], device=device)
    mt = torch.randn(1, 1, C, device=device)
    out = torch.ops.edt_kernels.unshuffle_with_mask_token(y, restore, mt, None)
    assert torch.equal(out[0, 5], mt[0, 0]) and torch.equal(out[1, 0], mt[0, 0])
    assert torch.equal(out[0, 3], y[0, 3]) and torch.equal(out[1, 1], y[1, 3])


# ============================================================================ dispatch

def test_backend_dispatch(monkeypatch, kernels_env, device):
    x = torch.randn(2, 8, 4, device=device)
    ids = torch.tensor([[1, 3], [0, 7]], device=device)

    def boom(*args):
        raise AssertionError("triton op called")

    monkeypatch.setattr(gather_scatter, "_gather_tokens_op", boom)
    assert edt_kernels.gather_tokens(x, ids, backend="torch").shape == (2, 2, 4)
    with pytest.raises(AssertionError, match="triton op called"):
        edt_kernels.gather_tokens(x, ids)  # auto: triton on CUDA / under the interpreter
    kernels_env("EDT_KERNELS_BACKEND", "torch")
    edt_kernels.gather_tokens(x, ids)
    kernels_env("EDT_KERNELS_BACKEND", "cpp")
    # gather_tokens has a cpp backend: the variable names it; masked_shortcut has none: stays on auto
    if "cpp" in backends.available("gather_tokens"):
        assert torch.equal(edt_kernels.gather_tokens(x, ids), reference_gather_tokens(x, ids))
    monkeypatch.setattr(masked_shortcut, "_masked_shortcut_op", boom)
    with pytest.raises(AssertionError, match="triton op called"):
        edt_kernels.masked_shortcut(x, x, torch.ones(2, 8))
    kernels_env("EDT_KERNELS_BACKEND")
    with pytest.raises(ValueError, match="float64"):
        edt_kernels.gather_tokens(x.double(), ids, backend="triton")
    assert edt_kernels.gather_tokens(x.double(), ids).dtype == torch.float64  # auto -> torch
    if device == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        edt_kernels.gather_tokens(x, ids)  # CPU without the interpreter: torch
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            edt_kernels.gather_tokens(x, ids, backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        edt_kernels.gather_tokens(x, ids, backend="cuda")


# ============================================================================ index values

def test_index_values_unchecked_by_default_and_masked(device):
    """Without value checks no index is read back on the host, and the Triton kernels mask
    an out-of-range index (its row reads as zero) instead of reading out of bounds."""
    assert not backends.check_values()
    x = torch.randn(2, 8, 4, device=device)
    ids = torch.tensor([[1, 9], [-1, 2]], device=device)
    reads = []

    class Reads(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in ("tolist", "item", "aminmax"):
                reads.append(func.__name__)
            return func(*args, **(kwargs or {}))

    with Reads():
        out = edt_kernels.gather_tokens(x, ids, backend="triton")
    assert reads == []
    assert torch.equal(out[0, 0], x[0, 1]) and torch.equal(out[1, 1], x[1, 2])
    assert torch.equal(out[0, 1], torch.zeros(4, device=device)) and torch.equal(out[1, 0], out[0, 1])
    backends.set_check_values(True)
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 8\)"):
        edt_kernels.gather_tokens(x, ids, backend="triton")


# ============================================================================ bad input

B_, L_, C_ = 2, 8, 4
_X = torch.randn(B_, L_, C_)
_IDS = torch.tensor([[1, 3, 5], [0, 2, 7]])
_RESTORE = torch.stack([torch.randperm(L_, generator=torch.Generator().manual_seed(i)) for i in range(B_)])
_Y = torch.randn(B_, 3, C_)
_MT = torch.randn(1, 1, C_)
_META = torch.empty(B_, 3, dtype=torch.int64, device="meta")

BAD_CALLS = {
    "gather ids int32": (lambda: edt_kernels.gather_tokens(_X, _IDS.int()), TypeError, "ids must be int64"),
    "gather ids float": (lambda: edt_kernels.gather_tokens(_X, _IDS.float()), TypeError, "int64"),
    "gather ids 1-d": (lambda: edt_kernels.gather_tokens(_X, _IDS[0]), ValueError, r"ids must be \[B, K\]"),
    "gather ids batch": (lambda: edt_kernels.gather_tokens(_X, _IDS[:1]), ValueError, r"\[2, K\]"),
    "gather ids >= L": (lambda: edt_kernels.gather_tokens(_X, _IDS + 3), ValueError, r"\[0, 8\)"),
    "gather ids < 0": (lambda: edt_kernels.gather_tokens(_X, _IDS - 1), ValueError, "got values in"),
    "gather ids repeat": (lambda: edt_kernels.gather_tokens(_X, torch.tensor([[1, 1], [0, 2]])),
                          ValueError, "repeat"),
    "gather ids device": (lambda: edt_kernels.gather_tokens(_X, _META), ValueError, "device"),
    "gather x 2-d": (lambda: edt_kernels.gather_tokens(_X[0], _IDS), ValueError, r"x must be \[B, L, C\]"),
    "gather x int": (lambda: edt_kernels.gather_tokens(_X.long(), _IDS), TypeError, "floating"),
    "gather x list": (lambda: edt_kernels.gather_tokens([1.0], _IDS), TypeError, "torch.Tensor"),
    "scatter length < K": (lambda: edt_kernels.scatter_tokens(_Y, _IDS, 2), ValueError, "length must be >= K"),
    "scatter length bool": (lambda: edt_kernels.scatter_tokens(_Y, _IDS, True), TypeError, "length"),
    "scatter ids K": (lambda: edt_kernels.scatter_tokens(_Y, _IDS[:, :2], L_), ValueError, r"\[2, 3\]"),
    "scatter ids range": (lambda: edt_kernels.scatter_tokens(_Y, _IDS, 7), ValueError, r"\[0, 7\)"),
    "masking ratio 1": (lambda: edt_kernels.random_masking(_X, 1.0), ValueError, r"\[0, 1\)"),
    "masking ratio <0": (lambda: edt_kernels.random_masking(_X, -0.1), ValueError, r"\[0, 1\)"),
    "masking ratio big tensor": (lambda: edt_kernels.random_masking(_X, torch.tensor([1.2])), ValueError,
                                 r"\[0, 1\)"),
    "masking ratio str": (lambda: edt_kernels.random_masking(_X, "0.5"), TypeError, "mask_ratio"),
    "masking ratio 2 elems": (lambda: edt_kernels.random_masking(_X, torch.tensor([0.1, 0.2])), TypeError,
                              "one-element"),
    "masking generator": (lambda: edt_kernels.random_masking(_X, 0.3, generator=3), TypeError, "generator"),
    "masking ratio and len_keep": (lambda: edt_kernels.random_masking(_X, 0.3, len_keep=1), TypeError,
                                   "exactly one of mask_ratio and len_keep"),
    "masking len_keep > L": (lambda: edt_kernels.random_masking(_X, len_keep=L_ + 1), ValueError, "len_keep"),
    "masking len_keep float": (lambda: edt_kernels.random_masking(_X, len_keep=1.0), TypeError, "len_keep"),
    "masking noise shape": (lambda: edt_kernels.random_masking(_X, 0.3, noise=torch.rand(1, 1)), ValueError,
                            "noise must be"),
    "masking noise and generator": (lambda: edt_kernels.random_masking(
        _X, 0.3, torch.Generator(), noise=torch.rand(_X.shape[:2])), TypeError, "generator and noise"),
    "masking sort_kept int": (lambda: edt_kernels.random_masking(_X, 0.3, sort_kept=1), TypeError, "sort_kept"),
    "unshuffle token width": (lambda: edt_kernels.unshuffle_with_mask_token(_Y, _RESTORE, torch.randn(1, 1, 5)),
                              ValueError, "mask_token must be"),
    "unshuffle token 1-d": (lambda: edt_kernels.unshuffle_with_mask_token(_Y, _RESTORE, torch.randn(C_)),
                            ValueError, "mask_token must be"),
    "unshuffle not perm": (lambda: edt_kernels.unshuffle_with_mask_token(_Y, _RESTORE.clamp(max=5), _MT),
                           ValueError, "permutation"),
    "unshuffle restore range": (lambda: edt_kernels.unshuffle_with_mask_token(_Y, _RESTORE + 1, _MT),
                                ValueError, r"\[0, 8\)"),
    "unshuffle L < K": (lambda: edt_kernels.unshuffle_with_mask_token(_Y, _RESTORE[:, :2], _MT),
                        ValueError, "L >= K"),
    "unshuffle restore int32": (lambda: edt_kernels.unshuffle_with_mask_token(_Y, _RESTORE.int(), _MT),
                                TypeError, "int64"),
    "unshuffle pos shape": (lambda: edt_kernels.unshuffle_with_mask_token(_Y, _RESTORE, _MT,
                                                                          torch.randn(1, L_ - 1, C_)),
                            ValueError, "pos_embed"),
    "unshuffle token device": (lambda: edt_kernels.unshuffle_with_mask_token(
        _Y, _RESTORE, torch.empty(1, 1, C_, device="meta")), ValueError, "device"),
    "shortcut mask shape": (lambda: edt_kernels.masked_shortcut(_X, _X, torch.ones(B_, L_ + 1)),
                            ValueError, "mask must be"),
    "shortcut mask int": (lambda: edt_kernels.masked_shortcut(_X, _X, torch.ones(B_, L_, dtype=torch.int64)),
                          TypeError, "bool or floating"),
    "shortcut before shape": (lambda: edt_kernels.masked_shortcut(_X, _X[:, :4], torch.ones(B_, L_)),
                              ValueError, "x_before"),
    "merge odd grid": (lambda: edt_kernels.patch_merge_modulate(torch.randn(1, 12, 2), torch.randn(1, 8),
                                                                torch.randn(1, 8), grid=(3, 4)),
                       ValueError, "even"),
    "merge not square": (lambda: edt_kernels.patch_merge_modulate(torch.randn(1, 8, 2), torch.randn(1, 8),
                                                                  torch.randn(1, 8)), ValueError, "square"),
    "merge grid size": (lambda: edt_kernels.patch_merge_modulate(torch.randn(1, 16, 2), torch.randn(1, 8),
                                                                 torch.randn(1, 8), grid=(2, 4)),
                        ValueError, "H\\*W"),
    "merge shift width": (lambda: edt_kernels.patch_merge_modulate(torch.randn(1, 16, 2), torch.randn(1, 2),
                                                                   torch.randn(1, 8)), ValueError, r"\[B, 4C\]"),
    "merge keep shape": (lambda: edt_kernels.patch_merge_modulate(torch.randn(1, 16, 2), torch.randn(1, 8),
                                                                  torch.randn(1, 8), torch.ones(1, 5)),
                         ValueError, "keep_mask"),
    "merge eps": (lambda: edt_kernels.patch_merge_modulate(torch.randn(1, 16, 2), torch.randn(1, 8),
                                                           torch.randn(1, 8), eps=0.0), ValueError, "eps"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_input(case, monkeypatch):
    """Rejected before any kernel runs (a kernel launch here fails the test); the index
    value cases with value checks on (off by default: they are host syncs on a GPU)."""
    backends.set_check_values(True)  # the autouse fixture of conftest restores the environment's setting

    def no_launch(*args, **kwargs):
        raise AssertionError("a launcher ran on bad input")

    # every launcher, patched where the custom op that calls it looks it up
    for module, name in ((gather_scatter, "gather_rows"), (gather_scatter, "scatter_rows"),
                         (unshuffle, "unshuffle_rows"), (random_masking, "masking_gather"),
                         (random_masking, "sort_kept"),
                         (masked_shortcut, "masked_shortcut_forward"),
                         (patch_merge_modulate, "ln_modulate_forward")):
        monkeypatch.setattr(module, name, no_launch)
    call, exc, match = BAD_CALLS[case]
    with pytest.raises(exc, match=match):
        call()
