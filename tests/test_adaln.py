"""adaLN kernels (edt_kernels.ops.layernorm_modulate, .gated_residual): layernorm_modulate and gated_residual.

The reference (torch backend) is checked against the formula written out by
hand in float64; the Triton kernels (CPU: interpreter) against the reference
evaluated in float64 on the same inputs, in float32 and float16, forward and
gradients, with every kernel output pre-filled with NaN; on one shape with
the launchers' tiles forced down (``helpers/tiles.py``), so that the kernels
also run split into several channel blocks and row tiles per program as at
the model's widths.
"""
import pytest
import torch

import edt_kernels
from edt_kernels.ops import gated_residual, layernorm_modulate
from edt_kernels.reference.adaln import reference_gated_residual, reference_layernorm_modulate
from helpers.poison import poison  # noqa: F401 - fixture
from helpers.tiles import CHANNELS, ROW_TILES, tile_rows, tiles  # noqa: F401 - fixture
from tolerances import GRAD_TOL, assert_close

TRITON_DTYPES = [torch.float32, torch.float16]  # the interpreter mishandles bfloat16
SHAPES = [(2, 37, 52), (3, 16, 100), (1, 5, 936), (2, 50, 117)]  # odd C, L not a power of two
# The Triton tests' ``shape, tiles`` rows (helpers/tiles.py): SHAPES with the launchers' own tiles (C = 936: two
# channel blocks), then L = 37 with the tiles forced down: gated_residual in 2 channel blocks of 32 (the second
# partial) and its backward's token sums in two programs of two row tiles of 16; layernorm_modulate's in two
# programs of 5 row tiles of 4 (the last tile partial).
TILED_SHAPES = tile_rows(SHAPES, split=[(2, 37, 52)])


def _id(v):
    if isinstance(v, torch.dtype):
        return str(v).replace("torch.", "")
    return "x".join(map(str, v)) if isinstance(v, tuple) else str(v)


def _rand(shape, dtype, gen, device="cpu", requires_grad=True, offset=0.0):
    t = (torch.randn(shape, generator=gen, dtype=torch.float64) + offset).to(device=device, dtype=dtype)
    return t.requires_grad_(requires_grad)


def _f64(*tensors):
    return [t.detach().double().requires_grad_(t.requires_grad) for t in tensors]


def _grads(out, inputs, dout):
    return torch.autograd.grad(out, inputs, dout)


def _assert_grads_close(out, ref, inputs, inputs64, dout, names):
    """Gradients of ``out`` (kernel, in the inputs' dtype) against those of the float64 ``ref``."""
    for got, want, n in zip(_grads(out, inputs, dout), _grads(ref, inputs64, dout.double()), names):
        assert got.dtype == dout.dtype
        assert_close(got, want, dout.dtype, GRAD_TOL, n)


def naive_layernorm_modulate(x, shift, scale, eps=1e-6):
    mu = x.sum(-1, keepdim=True) / x.shape[-1]
    var = ((x - mu) * (x - mu)).sum(-1, keepdim=True) / x.shape[-1]
    return (x - mu) * torch.rsqrt(var + eps) * (1 + scale[:, None, :]) + shift[:, None, :]


# ============================================================================ torch backend (float64)

@pytest.mark.parametrize("shape", SHAPES[:2], ids=_id)
def test_torch_layernorm_modulate_matches_formula(shape):
    B, L, C = shape
    gen = torch.Generator().manual_seed(L + C)
    x, shift, scale = (_rand(s, torch.float64, gen) for s in ((B, L, C), (B, C), (B, C)))
    out = edt_kernels.layernorm_modulate(x, shift, scale, backend="torch")
    expect = naive_layernorm_modulate(x, shift, scale)
    assert_close(out, expect, torch.float64, name="layernorm_modulate")
    d = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    for got, want, n in zip(_grads(out, (x, shift, scale), d), _grads(expect, (x, shift, scale), d),
                            ["dx", "dshift", "dscale"]):
        assert_close(got, want, torch.float64, GRAD_TOL, n)
    # the eps argument is honoured
    out = edt_kernels.layernorm_modulate(x, shift, scale, eps=0.5, backend="torch")
    assert_close(out, naive_layernorm_modulate(x, shift, scale, 0.5), torch.float64, name="eps")


def test_torch_gated_residual_matches_formula():
    gen = torch.Generator().manual_seed(0)
    B, L, C = 2, 7, 52
    x, gate, y = (_rand(s, torch.float64, gen) for s in ((B, L, C), (B, C), (B, L, C)))
    out = edt_kernels.gated_residual(x, gate, y, backend="torch")
    expect = torch.stack([x[b] + gate[b] * y[b] for b in range(B)])
    assert_close(out, expect, torch.float64, name="gated_residual")


# ============================================================================ triton vs reference

@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=_id)
@pytest.mark.parametrize("shape,tiles", TILED_SHAPES, indirect=["tiles"])
def test_triton_layernorm_modulate(shape, dtype, device, poison, tiles):
    B, L, C = shape
    gen = torch.Generator().manual_seed(3 * L + C)
    # a large common offset: the statistics must be computed stably in fp32
    x = _rand((B, L, C), dtype, gen, device, offset=30.0)
    shift, scale = _rand((B, C), dtype, gen, device), _rand((B, C), dtype, gen, device)
    out = edt_kernels.layernorm_modulate(x, shift, scale, backend="triton")
    x64, s64, c64 = _f64(x, shift, scale)
    ref = reference_layernorm_modulate(x64, s64, c64)
    assert out.dtype == dtype and out.shape == x.shape
    assert_close(out, ref, dtype, name="layernorm_modulate")
    d = _rand(out.shape, dtype, gen, device, requires_grad=False)
    _assert_grads_close(out, ref, (x, shift, scale), (x64, s64, c64), d, ["dx", "dshift", "dscale"])
    tiles.check({"_ln_modulate_bwd_kernel": [ROW_TILES]})  # whole rows: no channel blocks


@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=_id)
@pytest.mark.parametrize("shape,tiles", TILED_SHAPES, indirect=["tiles"])
def test_triton_gated_residual(shape, dtype, device, poison, tiles):
    B, L, C = shape
    gen = torch.Generator().manual_seed(5 * L + C)
    x, gate, y = _rand((B, L, C), dtype, gen, device), _rand((B, C), dtype, gen, device), \
        _rand((B, L, C), dtype, gen, device)
    out = edt_kernels.gated_residual(x, gate, y, backend="triton")
    x64, g64, y64 = _f64(x, gate, y)
    ref = reference_gated_residual(x64, g64, y64)
    assert out.dtype == dtype
    assert_close(out, ref, dtype, name="gated_residual")
    d = _rand(out.shape, dtype, gen, device, requires_grad=False)
    _assert_grads_close(out, ref, (x, gate, y), (x64, g64, y64), d, ["dx", "dgate", "dy"])
    tiles.check({"_gated_residual_fwd_kernel": [CHANNELS], "_gated_residual_bwd_kernel": [CHANNELS, ROW_TILES]})


def test_triton_mixed_dtypes_and_strided_inputs(device, poison):
    """float32 residual stream with float16 modulation rows (autocast-style)
    gives float32 like PyTorch's promotion (the kernel keeps ``1 + scale`` in
    fp32, so it is compared with float64, not with PyTorch's fp16 rounding);
    non-contiguous views are accepted."""
    gen = torch.Generator().manual_seed(9)
    B, L, C = 2, 12, 40
    base = _rand((B, C, L), torch.float32, gen, device, requires_grad=False)
    x = base.transpose(1, 2).requires_grad_()  # channel stride != 1
    mod = _rand((B, 3 * C), torch.float16, gen, device)
    y = _rand((B, L, C), torch.float32, gen, device)

    def chain(x, mod, y, backend):
        shift, scale, gate = mod.chunk(3, dim=1)  # strided views of one Linear output, as in DiT
        out = edt_kernels.layernorm_modulate(x, shift, scale, backend=backend)
        return edt_kernels.gated_residual(out, gate, y, backend=backend)

    res = chain(x, mod, y, "triton")
    assert res.dtype == reference_layernorm_modulate(x, *mod.chunk(3, 1)[:2]).dtype == torch.float32
    x64, mod64, y64 = _f64(x, mod, y)
    ref = chain(x64, mod64, y64, "torch")
    assert_close(res, ref, torch.float32, name="mixed chain")
    d = torch.randn(res.shape, generator=gen).to(device)
    got = _grads(res, (x, mod, y), d)
    want = _grads(ref, (x64, mod64, y64), d.double())
    for g, w, t, n in zip(got, want, (x, mod, y), ["dx", "dmod", "dy"]):
        assert g.dtype == t.dtype
        assert_close(g, w, t.dtype, GRAD_TOL, n)


# ============================================================================ torch integration

def test_opcheck_adaln(device):
    gen = torch.Generator().manual_seed(0)
    B, L, C = 2, 9, 20
    x, y = _rand((B, L, C), torch.float32, gen, device), _rand((B, L, C), torch.float32, gen, device)
    shift, scale = _rand((B, C), torch.float32, gen, device), _rand((B, C), torch.float32, gen, device)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.edt_kernels.layernorm_modulate.default, (x, shift, scale, 1e-6),
                          test_utils=utils)
    torch.library.opcheck(torch.ops.edt_kernels.gated_residual.default, (x, shift, y), test_utils=utils)


def test_torch_compile_traces_without_graph_breaks(device):
    """A DiT-style masked block front end compiles as one graph (aot_eager:
    no C++ compiler needed) and matches eager, values and gradients."""
    def block(x, ids, shift, scale, gate, w):
        h = edt_kernels.gather_tokens(x, ids, backend="triton")
        n = edt_kernels.layernorm_modulate(h, shift, scale, backend="triton")
        return edt_kernels.gated_residual(h, gate, n @ w, backend="triton")

    gen = torch.Generator().manual_seed(1)
    B, L, K, C = 2, 16, 9, 24
    x = _rand((B, L, C), torch.float32, gen, device)
    ids = torch.argsort(torch.rand(B, L, generator=gen), 1)[:, :K].to(device)
    shift, scale, gate = (_rand((B, C), torch.float32, gen, device) for _ in range(3))
    w = _rand((C, C), torch.float32, gen, device)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    out = compiled(x, ids, shift, scale, gate, w)
    ref = block(x, ids, shift, scale, gate, w)
    assert_close(out, ref, torch.float32, name="compiled")
    d = torch.randn(out.shape, generator=gen).to(device)
    ins = (x, shift, scale, gate, w)
    for g, r in zip(_grads(out, ins, d), _grads(ref, ins, d)):
        assert_close(g, r, torch.float32, GRAD_TOL, "compiled grads")


# ============================================================================ bad input

_X = torch.randn(2, 5, 8)
_R = torch.randn(2, 8)

_LNM, _GR = edt_kernels.layernorm_modulate, edt_kernels.gated_residual

BAD_CALLS = {
    "x 2-d": (lambda: _LNM(_X[0], _R, _R), ValueError, r"x must be \[B, L, C\]"),
    "x int": (lambda: _LNM(_X.long(), _R, _R), TypeError, "floating"),
    "shift width": (lambda: _LNM(_X, _R[:, :7], _R), ValueError, r"shift must be \[B, C\]"),
    "scale batch": (lambda: _LNM(_X, _R, _R[:1]), ValueError, r"scale must be \[B, C\]"),
    "scale 3-d": (lambda: _LNM(_X, _R, _R[:, None]), ValueError, "scale must be"),
    "shift device": (lambda: _LNM(_X, torch.empty(2, 8, device="meta"), _R),
                     ValueError, "device"),
    "shift none": (lambda: _LNM(_X, None, _R), TypeError, "shift must be a torch.Tensor"),
    "eps negative": (lambda: _LNM(_X, _R, _R, eps=-1.0), ValueError, "eps"),
    "eps str": (lambda: _LNM(_X, _R, _R, eps="1e-6"), TypeError, "eps"),
    "backend name": (lambda: _LNM(_X, _R, _R, backend="cuda"), ValueError, "backend"),
    "triton float64": (lambda: _LNM(_X.double(), _R, _R, backend="triton"),
                       ValueError, "float64"),
    "gate width": (lambda: _GR(_X, _R[:, :3], _X), ValueError, r"gate must be \[B, C\]"),
    "y shape": (lambda: _GR(_X, _R, _X[:, :2]), ValueError, "y must be"),
    "y int": (lambda: _GR(_X, _R, _X.long()), TypeError, "floating"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_input(case, monkeypatch):
    """Rejected before any kernel runs (a kernel launch here fails the test)."""
    def no_launch(*args, **kwargs):
        raise AssertionError("a launcher ran on bad input")

    monkeypatch.setattr(layernorm_modulate, "ln_modulate_forward", no_launch)
    monkeypatch.setattr(gated_residual, "gated_residual_forward", no_launch)
    call, exc, match = BAD_CALLS[case]
    with pytest.raises(exc, match=match):
        call()


def test_auto_runs_torch_for_float64(device):
    x, r = _X.double().to(device), _R.double().to(device)
    out = edt_kernels.layernorm_modulate(x, r, r)
    assert out.dtype == torch.float64
    assert_close(out, naive_layernorm_modulate(x, r, r), torch.float64, name="auto float64")


def test_batch_beyond_grid_limit_is_a_clear_error():
    """B > 65535 would exceed CUDA's grid axis limit: refused before any launch."""
    B = 65536
    x, y = torch.randn(B, 1, 16), torch.randn(B, 1, 16)
    gate = torch.randn(B, 16)
    with pytest.raises(ValueError, match="exceeds 65535"):
        edt_kernels.gated_residual(x, gate, y, backend="triton")
    # the reference path has no such limit
    torch.testing.assert_close(edt_kernels.gated_residual(x, gate, y, backend="torch"), x + gate[:, None] * y)
