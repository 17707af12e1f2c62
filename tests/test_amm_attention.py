"""amm_attention: every backend against the float64 reference and the authors' fixtures.

The Triton kernels run through Triton's interpreter on CPU (conftest sets
TRITON_INTERPRET=1 when no GPU is present); bfloat16 is only checked on a GPU
because the interpreter mishandles it.
"""
import math
import random

import pytest
import torch

from conftest import load_fixture, triton_device
from helpers.attention_cases import attention_kwargs, cast
from tolerances import FWD_TOL, GRAD_TOL, assert_close

import edt_kernels
from edt_kernels import AMM, amm_attention, amm_attention_qkvpacked, modulation_matrix, reference_attention
from edt_kernels.attention import select_backend, validate_inputs
from edt_kernels.ops import amm_attention as triton_op

DEV = triton_device()
KERNEL_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEV == "cuda" else [])


# ----------------------------------------------------------------------------- helpers

def make_case(B, H, N, D, *, grid=None, table=False, positions=None, amm=False, bias=None,
              modulation=None, extra=3, seed=0, dtype=torch.float32, device=DEV):
    """Random inputs (float64 masters) and the kwargs of amm_attention."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, D, generator=g, dtype=torch.float64) for _ in range(3))
    kw = attention_kwargs(g, B, H, N, grid=grid, table=table, positions=positions, amm=amm, bias=bias,
                          modulation=modulation, extra=extra)
    return (q, k, v), kw


def grads_of(out, qkv, kw, dout):
    wrt = list(qkv) + [kw[n] for n in ("rel_pos_bias", "bias") if n in kw]
    return torch.autograd.grad(out, wrt, dout)


def check_backend(backend, inputs, kw, dtype, device=DEV, grads=True):
    qkv64, kw64 = cast(inputs, kw, torch.float64, "cpu")
    ref = reference_attention(*qkv64, **kw64)
    qkv, kwd = cast(inputs, kw, dtype, device, requires_grad=grads)
    out = amm_attention(*qkv, backend=backend, **kwd)
    assert out.dtype == dtype and out.shape == ref.shape
    assert_close(out.cpu(), ref, dtype, FWD_TOL, "out")
    if not grads:
        return
    dout64 = torch.randn(ref.shape, generator=torch.Generator().manual_seed(123), dtype=torch.float64)
    g_ref = grads_of(ref, qkv64, kw64, dout64)
    g = grads_of(out, qkv, kwd, dout64.to(device, dtype))
    names = ["dq", "dk", "dv"] + [n for n in ("rel_pos_bias", "bias") if n in kw]
    for name, a, b in zip(names, g, g_ref):
        # Table gradients sum B*N*N terms: scale the tolerance by that magnitude.
        tol = dict(GRAD_TOL)
        if name == "rel_pos_bias":
            tol = {k: (a_ * 10, r) for k, (a_, r) in GRAD_TOL.items()}
        assert_close(a.cpu(), b, dtype, tol, name)


# ----------------------------------------------------------------------------- fixtures

@pytest.mark.parametrize("n", [4, 8, 16, 32])
def test_modulation_matrix_matches_published(n):
    expected = load_fixture("official_amm_matrices.pt")[n]
    got = modulation_matrix(n)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    # The cut-off is exact: same zero pattern.
    assert torch.equal(got == 0, expected == 0)


def _amm_by_formula(n: int) -> torch.Tensor:
    """The AMM of an n x n grid written out in float64 (Python floats): 0.5 exp(cos(2 pi d / P))
    within the radius, P = 4 (n - 1) sqrt 2, radius^2 = 4 + (n - 1)^2."""
    period, radius2 = 4.0 * (n - 1) * math.sqrt(2.0), 4 + (n - 1) ** 2
    cells = [(i // n, i % n) for i in range(n * n)]
    return torch.tensor([[0.5 * math.exp(math.cos(2.0 * math.pi * math.hypot(a[0] - b[0], a[1] - b[1]) / period))
                          if (a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2 <= radius2 else 0.0
                          for b in cells] for a in cells], dtype=torch.float64)


@pytest.mark.parametrize("n", [4, 7])
def test_float64_amm_is_float64(n):
    """float64 in, float64 out: the AMM constant is made in the computation's dtype."""
    exact = _amm_by_formula(n)
    torch.testing.assert_close(modulation_matrix(n, dtype=torch.float64), exact, atol=1e-15, rtol=1e-15)
    # float32 is the published (float32) AMM, rounded once
    assert torch.equal(modulation_matrix(n), exact.float())
    B, H, D = 2, 2, 8
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(B, H, n * n, D, generator=g, dtype=torch.float64) for _ in range(3))
    p = ((q @ k.transpose(-2, -1)) * D ** -0.5).softmax(-1) * exact
    expected = p @ v
    for fn in (amm_attention, reference_attention):
        out = fn(q.clone(), k.clone(), v.clone(), grid=n, amm=True)
        assert out.dtype == torch.float64
        assert_close(out, expected, torch.float64, name=fn.__name__)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("with_amm", [False, True], ids=["bias", "bias+amm"])
def test_official_attention_fixture(backend, with_amm):
    fx = load_fixture("official_attention_full.pt")
    expected = fx["out_bias_amm" if with_amm else "out_bias"]
    dev = DEV if backend == "triton" else "cpu"
    out = amm_attention(fx["q"].to(dev), fx["k"].to(dev), fx["v"].to(dev), scale=fx["scale"],
                        rel_pos_bias=fx["table"].to(dev), grid=fx["grid"],
                        positions=fx["positions"].to(dev), amm=with_amm or None, backend=backend)
    torch.testing.assert_close(out.cpu(), expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- seeded sweep

def _sweep_cases(count, seed):
    """Random shapes: N in 1..300, D in {16, 52, 64, 72, 128}, each option on or off."""
    rnd = random.Random(seed)
    cases = []
    for i in range(count):
        D = rnd.choice([16, 52, 64, 72, 128])
        H = rnd.choice([1, 2, 3])
        B = rnd.choice([1, 2])
        use_grid = rnd.random() < 0.8
        masked = use_grid and rnd.random() < 0.5
        if use_grid:
            side = rnd.randint(1, 17)
            N = rnd.randint(1, side * side) if masked else side * side
            grid = side
        else:
            N, grid = rnd.randint(1, 300), None
        opts = dict(
            grid=grid,
            table=use_grid and rnd.random() < 0.7,
            positions=(rnd.choice(["batch", "shared"]) if masked else None),
            amm=use_grid and rnd.random() < 0.5,
            bias=rnd.choice([None, (B, H, N, N), (1, H, N, N), (N, N)]),
            modulation=rnd.choice([None, None, (B, 1, N, N)]),
        )
        if masked and not (opts["table"] or opts["amm"]):
            opts["table"] = True
        cases.append(pytest.param(B, H, N, D, opts, i, id=f"B{B}H{H}N{N}D{D}-" + "-".join(
            k for k, val in opts.items() if val and k != "grid")))
    return cases


@pytest.mark.parametrize("B,H,N,D,opts,seed", _sweep_cases(18, seed=2024))
def test_triton_float32_sweep(B, H, N, D, opts, seed):
    inputs, kw = make_case(B, H, N, D, seed=seed, **opts)
    check_backend("triton", inputs, kw, torch.float32)


@pytest.mark.parametrize("B,H,N,D,opts,seed", _sweep_cases(6, seed=7))
def test_triton_float16_sweep(B, H, N, D, opts, seed):
    inputs, kw = make_case(B, H, N, D, seed=seed, **opts)
    check_backend("triton", inputs, kw, torch.float16)


@pytest.mark.skipif(DEV != "cuda", reason="Triton's interpreter mishandles bfloat16; GPU only")
@pytest.mark.parametrize("B,H,N,D,opts,seed", _sweep_cases(6, seed=11))
def test_triton_bfloat16_sweep(B, H, N, D, opts, seed):
    inputs, kw = make_case(B, H, N, D, seed=seed, **opts)
    check_backend("triton", inputs, kw, torch.bfloat16)


@pytest.mark.parametrize("B,H,N,D,opts,seed", _sweep_cases(12, seed=99))
def test_torch_backend_float64_sweep(B, H, N, D, opts, seed):
    inputs, kw = make_case(B, H, N, D, seed=seed, **opts)
    check_backend("torch", inputs, kw, torch.float64, device="cpu")


@pytest.mark.parametrize("D", [16, 52, 64, 72, 128])
def test_head_dims_edt_stage(D):
    """Each required head dim at an EDT stage shape (masked subset + table + AMM)."""
    inputs, kw = make_case(2, 2, 40, D, grid=8, table=True, positions="batch", amm=True, seed=D)
    check_backend("triton", inputs, kw, torch.float32)


@pytest.mark.parametrize("D", [1, 7, 256])
def test_extreme_head_dims(D):
    inputs, kw = make_case(1, 2, 9, D, grid=3, table=True, amm=True, seed=D)
    check_backend("triton", inputs, kw, torch.float32)


def test_head_dim_tiles():
    """72 runs as 64 + 16 (90% of the MMA work useful instead of 56% on 128);
    52 stays on one 64-wide tile; powers of two are one tile."""
    assert triton_op._head_blocks(72) == (64, 16)
    assert triton_op._head_blocks(80) == (64, 16)
    assert triton_op._head_blocks(96) == (64, 32)
    assert triton_op._head_blocks(52) == (64, 0)
    assert triton_op._head_blocks(64) == (64, 0)
    assert triton_op._head_blocks(128) == (128, 0)
    assert triton_op._head_blocks(130) == (128, 16)


@pytest.mark.parametrize("N,D", [(128, 72), (64, 96), (65, 80)])
def test_full_and_peeled_tiles_with_split_head_dim(N, D):
    """Only full key/query tiles (N = 128 on 64-wide interpreter tiles), and one
    row past them, with head dims computed as two tiles."""
    inputs, kw = make_case(1, 2, N, D, grid=(8, 16) if N == 128 else (8, 9), table=True,
                           positions="batch" if N != 128 else None,
                           amm=AMM(period=7.5, radius2=5, amplitude=0.7), seed=N + D)
    check_backend("triton", inputs, kw, torch.float32)


@pytest.mark.parametrize("scale", [-0.3, 0.0, 1e-12])
def test_scale_not_folded(scale):
    """Scales that cannot be folded into the exp2 FFMA (<= 0, extreme) take the
    unfolded path: table and bias added after the scaled dot."""
    inputs, kw = make_case(2, 2, 70, 16, grid=9, table=True, amm=True, bias=(1, 2, 70, 70),
                           positions="batch", seed=5)
    kw["scale"] = scale
    check_backend("triton", inputs, kw, torch.float32)


def test_rectangular_grid_and_custom_amm():
    cfg = AMM(period=7.5, radius2=5, amplitude=0.7)
    inputs, kw = make_case(1, 2, 24, 16, grid=(4, 6), table=True, amm=cfg, extra=0, seed=3)
    check_backend("triton", inputs, kw, torch.float32)
    check_backend("torch", inputs, kw, torch.float64, device="cpu")


def test_reference_gradcheck_float64():
    inputs, kw = make_case(1, 2, 6, 5, grid=3, table=True, amm=True, bias=(1, 2, 6, 6),
                           positions="batch", seed=5)
    qkv, kwd = cast(inputs, kw, torch.float64, "cpu")
    table, bias = kwd.pop("rel_pos_bias"), kwd.pop("bias")

    def fn(q, k, v, t, b):
        return reference_attention(q, k, v, rel_pos_bias=t, bias=b, **kwd)

    assert torch.autograd.gradcheck(fn, (*qkv, table, bias))


# ----------------------------------------------------------------------------- kernel contract

def _op_args(B=2, H=2, N=20, D=24, dtype=torch.float32, seed=0):
    inputs, kw = make_case(B, H, N, D, grid=5, table=True, positions="batch", amm=True,
                           bias=(1, H, N, N), modulation=(B, 1, N, N), seed=seed)
    (q, k, v), kwd = cast(inputs, kw, dtype, DEV, requires_grad=False)
    inp = validate_inputs(q, k, v, **kwd)
    return inp


def test_forward_writes_every_output_and_lse():
    inp = _op_args()
    q = inp.q
    B, H, N, D = q.shape
    out = torch.full((B, N, H, D), float("nan"), device=q.device, dtype=q.dtype).transpose(1, 2)
    lse = torch.full((B, H, N), float("nan"), device=q.device)
    triton_op.amm_attention_forward(*inp.kernel_args(), out=out, lse=lse)
    assert not out.isnan().any() and not lse.isnan().any()
    from edt_kernels.reference import reference_attention_lse

    lse_ref = reference_attention_lse(q.double().cpu(), inp.k.double().cpu(), scale=inp.scale,
                                      rel_pos_bias=inp.table.double().cpu(), grid=(inp.rows, inp.cols),
                                      positions=inp.positions.cpu(), bias=inp.bias.double().cpu())
    torch.testing.assert_close(lse.double().cpu(), lse_ref, atol=1e-5, rtol=1e-5)


def test_backward_writes_every_gradient():
    inp = _op_args()
    args = inp.kernel_args()
    out, lse = triton_op.amm_attention_forward(*args)
    dout = torch.randn_like(out)
    grads = [torch.full(inp.q.shape, float("nan"), device=inp.q.device, dtype=inp.q.dtype) for _ in range(3)]
    dq, dk, dv, dt, db = triton_op.amm_attention_backward(dout, *args[:3], out, lse, *args[3:], True, True,
                                                          grads=grads)
    for t in (dq, dk, dv, dt, db):
        assert not t.isnan().any()
    assert dt.shape == inp.table.shape and db.shape == inp.bias.shape


def test_backward_writes_strided_gradient_views():
    """dq/dk/dv may be the views of one [B, N, 3, H, D] buffer (the packed-qkv
    gradient); the values equal those written to contiguous buffers."""
    inp = _op_args()
    args = inp.kernel_args()
    out, lse = triton_op.amm_attention_forward(*args)
    dout = torch.randn_like(out)
    want = triton_op.amm_attention_backward(dout, *args[:3], out, lse, *args[3:], True, True)
    B, H, N, D = inp.q.shape
    dqkv = torch.full((B, N, 3, H, D), float("nan"), device=inp.q.device, dtype=inp.q.dtype)
    views = [dqkv[:, :, i].transpose(1, 2) for i in range(3)]
    got = triton_op.amm_attention_backward(dout, *args[:3], out, lse, *args[3:], True, True, grads=views)
    assert not dqkv.isnan().any()
    for g, w, view in zip(got[:3], want[:3], views):
        assert g.data_ptr() == view.data_ptr()
        torch.testing.assert_close(g, w, atol=0, rtol=0)


def test_opcheck_triton_op():
    inp = _op_args(N=9, D=16)
    q, k, v = (t.clone().requires_grad_() for t in (inp.q, inp.k, inp.v))
    table = inp.table.clone().requires_grad_()
    bias = inp.bias.clone().requires_grad_()
    args = (q, k, v, table, inp.positions, inp.amm_table(), bias, inp.modulation, inp.scale,
            inp.rows, inp.cols)
    torch.library.opcheck(triton_op._apply.fwd_op, args)


def test_torch_compile_fullgraph():
    inputs, kw = make_case(2, 2, 12, 16, grid=4, table=True, positions="batch", amm=True, seed=1)
    (q, k, v), kwd = cast(inputs, kw, torch.float32, DEV, requires_grad=False)

    def fn(q, k, v, t, p):
        return amm_attention(q, k, v, rel_pos_bias=t, grid=4, positions=p, amm=True, backend="triton")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v, kwd["rel_pos_bias"], kwd["positions"])
    torch.testing.assert_close(out, fn(q, k, v, kwd["rel_pos_bias"], kwd["positions"]))


def test_strided_qkv_views_are_read_in_place():
    """The usual qkv.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4) views."""
    B, N, H, D = 2, 16, 3, 20
    qkv = torch.randn(B, N, 3 * H * D, device=DEV)
    q, k, v = qkv.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    table = torch.randn(49, H, device=DEV)
    out = amm_attention(q, k, v, rel_pos_bias=table, grid=4, amm=True, backend="triton")
    ref = reference_attention(q.double().cpu(), k.double().cpu(), v.double().cpu(),
                              rel_pos_bias=table.double().cpu(), grid=4, amm=True)
    assert_close(out.cpu(), ref, torch.float32)
    # Output memory is [B, N, H, D]: the usual transpose + reshape is free.
    assert out.transpose(1, 2).is_contiguous()


def test_nan_propagates_like_reference():
    inputs, kw = make_case(1, 2, 16, 16, grid=4, table=True, amm=True, seed=2)
    (q, k, v), kwd = cast(inputs, kw, torch.float32, DEV, requires_grad=False)
    q = q.clone()
    q[0, 1, 3, 5] = float("nan")
    out = amm_attention(q, k, v, backend="triton", **kwd)
    ref = reference_attention(q, k, v, **kwd)
    assert torch.equal(out.isnan(), ref.isnan()) and out.isnan().any()


def test_minus_inf_bias_rows_match_reference():
    """Additive -inf masks: partly masked rows are finite, fully masked rows NaN, as softmax."""
    B, H, N, D = 1, 1, 40, 16
    q, k, v = (torch.randn(B, H, N, D, device=DEV) for _ in range(3))
    bias = torch.zeros(1, 1, N, N, device=DEV)
    bias[..., :, :35] = float("-inf")  # the first key block is fully masked for every row
    bias[..., 7, :] = float("-inf")  # row 7 fully masked
    out = amm_attention(q, k, v, bias=bias, backend="triton")
    ref = reference_attention(q, k, v, bias=bias)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5, equal_nan=True)
    assert out[0, 0, 7].isnan().all() and not out[0, 0, 6].isnan().any()


def test_empty_sequence():
    q = torch.randn(2, 3, 0, 16, device=DEV, requires_grad=True)
    out = amm_attention(q, q, q, backend="triton")
    assert out.shape == (2, 3, 0, 16)
    out.sum().backward()
    assert q.grad.shape == q.shape


def test_launch_grid_is_one_dimensional_for_many_heads():
    """B*H beyond 65535 (CUDA's limit on grid axes 1/2) needs the flat 1-D grid the
    launchers use; the interpreter is too slow for 65536 programs, so on CPU we check
    the dispatch arithmetic and on GPU the real call."""
    if DEV == "cuda":
        q = torch.randn(70000, 1, 4, 16, device="cuda")
        out = amm_attention(q, q, q)
        torch.testing.assert_close(out, reference_attention(q, q, q), atol=1e-5, rtol=1e-5)
    else:
        calls = []

        class Spy:
            def __getitem__(self, grid):
                calls.append(grid)
                return lambda *a, **k: None

        orig = triton_op._fwd_kernel
        triton_op._fwd_kernel = Spy()
        try:
            q = torch.randn(70000, 1, 4, 16)
            triton_op.amm_attention_forward(q, q, q, None, None, None, None, None, 0.25, 1, 4)
        finally:
            triton_op._fwd_kernel = orig
        assert calls == [(70000 * 1,)]


# ----------------------------------------------------------------------------- dispatch

def test_auto_backend_on_cpu_is_not_triton():
    q = torch.randn(1, 1, 4, 8)
    inp = validate_inputs(q, q, q)
    assert select_backend(inp, "auto").name in ("cpp", "torch")


def test_env_override(monkeypatch, kernels_env):
    q = torch.randn(1, 1, 4, 8)
    inp = validate_inputs(q, q, q)
    kernels_env("EDT_KERNELS_BACKEND", "torch")
    assert select_backend(inp, "auto").name == "torch"


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        amm_attention(q, q, q, backend="triton")


def test_float64_on_triton_names_other_backends():
    q = torch.randn(1, 1, 4, 8, dtype=torch.float64, device=DEV)
    with pytest.raises(ValueError, match="float64.*torch"):
        amm_attention(q, q, q, backend="triton")


def test_unknown_backend():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="backend must be"):
        amm_attention(q, q, q, backend="cudnn")


# ----------------------------------------------------------------------------- validation

def _qkv(B=2, H=2, N=16, D=8, **kw):
    return [torch.randn(B, H, N, D, **kw) for _ in range(3)]


@pytest.mark.parametrize("mutate,exc,match", [
    (lambda a: {"q": a["q"][0]}, ValueError, r"q must be \[B, H, N, D\]"),
    (lambda a: {"k": a["k"][:, :, :5]}, ValueError, "k must have the shape of q"),
    (lambda a: {"v": a["v"].half()}, TypeError, "v must have the dtype of q"),
    (lambda a: {"q": a["q"].long(), "k": a["k"].long(), "v": a["v"].long()}, TypeError, "q must be float"),
    (lambda a: {"q": torch.randn(1, 1, 4, 300), "k": torch.randn(1, 1, 4, 300),
                "v": torch.randn(1, 1, 4, 300)}, ValueError, "head dim D"),
    (lambda a: {"rel_pos_bias": torch.randn(40, 2)}, ValueError, r"rel_pos_bias must be .*>= 49, 2"),
    (lambda a: {"rel_pos_bias": torch.randn(49, 3)}, ValueError, "rel_pos_bias must be"),
    (lambda a: {"rel_pos_bias": torch.randn(49, 2), "grid": 5}, ValueError, "must equal rows\\*cols"),
    (lambda a: {"rel_pos_bias": torch.randn(49, 2), "positions": torch.arange(16)}, ValueError,
     "grid must be given with positions"),
    (lambda a: {"rel_pos_bias": torch.randn(81, 2), "grid": 5, "positions": torch.arange(15)}, ValueError,
     r"positions must be \[N\] or \[B, N\]"),
    (lambda a: {"rel_pos_bias": torch.randn(81, 2), "grid": 5, "positions": torch.arange(16) + 10},
     ValueError, r"positions must lie in \[0, rows\*cols\)"),
    (lambda a: {"rel_pos_bias": torch.randn(81, 2), "grid": 5, "positions": torch.arange(16).float()},
     TypeError, "positions must be int64"),
    (lambda a: {"bias": torch.randn(3, 2, 16, 16)}, ValueError, "bias of shape .* not broadcastable"),
    (lambda a: {"modulation": torch.randn(1, 1, 1, 2, 16, 16)}, ValueError, "modulation must have at most 4"),
    (lambda a: {"amm": "yes"}, TypeError, "amm must be"),
    (lambda a: {"scale": "0.1"}, TypeError, "scale must be a float"),
    (lambda a: {"scale": float("nan")}, ValueError, "scale must be finite"),
    (lambda a: {"scale": float("inf")}, ValueError, "scale must be finite"),
    (lambda a: {"grid": (4, 0)}, ValueError, "grid must be positive"),
    (lambda a: {"amm": True, "grid": (2, 8)}, ValueError, "square grids"),
    (lambda a: {"rel_pos_bias": [1.0]}, TypeError, "rel_pos_bias must be a torch.Tensor"),
])
def test_bad_input_raises(mutate, exc, match):
    edt_kernels.set_check_values(True)  # the positions range case (the autouse fixture of conftest resets it)
    q, k, v = _qkv()
    args = {"q": q, "k": k, "v": v}
    args.update(mutate(args))
    with pytest.raises(exc, match=match):
        amm_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


@pytest.mark.parametrize("backend", ["auto", "torch", "eager", "cpp", "triton"])
def test_no_tokens_gives_an_empty_output(backend):
    """N = 0 with no grid term (no table, no AMM): an empty output on every backend."""
    if backend not in ("auto", *edt_kernels.available_backends()):
        pytest.skip(f"{backend} not available here")
    q = torch.randn(2, 2, 0, 8, device=DEV if backend == "triton" else "cpu")
    assert amm_attention(q, q, q, backend=backend).shape == (2, 2, 0, 8)
    qkv = torch.randn(2, 0, 3, 2, 8, device=q.device)
    assert amm_attention_qkvpacked(qkv, backend=backend).shape == (2, 0, 2, 8)


def test_amm_config_validation():
    with pytest.raises(ValueError, match="AMM.period"):
        AMM(period=-1.0)
    with pytest.raises(ValueError, match="AMM.radius2"):
        AMM(radius2=2.5)
    # None means "no AMM" everywhere: there is no matrix to build for it
    with pytest.raises(TypeError, match=r"amm must be True \(the published AMM\) or an AMM"):
        modulation_matrix(4, amm=None)
    assert torch.equal(modulation_matrix(4), modulation_matrix(4, amm=AMM()))


def test_public_exports():
    for name in ("amm_attention", "AMM", "modulation_matrix", "reference_attention"):
        assert hasattr(edt_kernels, name)


def test_torch_compile_fullgraph_auto_backend_cpu():
    """'auto' on CPU tensors (cpp when built, else torch) traces without a graph break."""
    from edt_kernels import _ext

    _ext.cpu_extension_error()  # settle the extension eagerly, as the error message advises
    q, k, v = (torch.randn(2, 2, 16, 16) for _ in range(3))
    table = torch.randn(49, 2)

    def fn(q, k, v, t):
        return amm_attention(q, k, v, rel_pos_bias=t, grid=4, amm=True)

    out = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v, table)
    ref = reference_attention(q.double(), k.double(), v.double(), rel_pos_bias=table.double(), grid=4, amm=True)
    assert_close(out, ref, torch.float32)


# ----------------------------------------------------------------------------- table gradient summed over the batch

# Without per-sample positions the offset index of a (query, key) pair is the same for every
# batch element: the table gradient comes from _amm_attn_bwd_dtable_kernel, which sums dS over
# the batch before its atomics, and the dK/dV kernel runs without its table atomics.
_DTABLE_CASES = [
    # B, H, grid, D, options (N = rows*cols, or len(positions))
    pytest.param(1, 2, 5, 16, dict(table=True), id="B1-N25"),
    pytest.param(3, 3, 9, 24, dict(table=True, amm=True), id="B3-N81-table+amm"),
    pytest.param(4, 1, 4, 16, dict(table=True, amm=True), id="B4-N16-table+amm"),
    pytest.param(2, 2, (7, 10), 20, dict(table=True, bias=(2, 2, 70, 70), modulation=(2, 1, 70, 70)),
                 id="B2-N70-table+bias+modulation"),
    pytest.param(2, 2, 8, 16, dict(table=True, amm=True, bias=(1, 2, 64, 64), modulation=(1, 2, 64, 64)),
                 id="B2-N64-table+amm+broadcast_bias+modulation"),
    pytest.param(3, 2, 6, 16, dict(table=True, amm=True, positions="shared", n=30),
                 id="B3-N30-shared_positions"),
    # D = 72 as a 64-wide tile plus a 16-wide tail: N = 64, only full (unmasked) tiles
    # on the interpreter's 64-wide ones; N = 70, interior and edge tiles.
    pytest.param(2, 2, 8, 72, dict(table=True, amm=True), id="B2-N64-D72-table+amm"),
    pytest.param(2, 1, (7, 10), 72, dict(table=True, amm=AMM(period=7.5, radius2=5, amplitude=0.7),
                                         bias=(1, 1, 70, 70)),
                 id="B2-N70-D72-table+amm+bias"),
]


def _dtable_case(B, H, grid, D, opts, seed):
    opts = dict(opts)
    rows, cols = (grid, grid) if isinstance(grid, int) else grid
    N = opts.pop("n", rows * cols)
    return make_case(B, H, N, D, grid=grid, seed=seed, **opts)


@pytest.mark.parametrize("B,H,grid,D,opts", _DTABLE_CASES)
def test_dtable_summed_over_batch_float32(B, H, grid, D, opts):
    """Every gradient (the table's included) against float64, N a multiple of the block or not."""
    inputs, kw = _dtable_case(B, H, grid, D, opts, seed=B * 10 + H)
    check_backend("triton", inputs, kw, torch.float32)


@pytest.mark.parametrize("B,H,grid,D,opts", [_DTABLE_CASES[1], _DTABLE_CASES[3]])
def test_dtable_summed_over_batch_float16(B, H, grid, D, opts):
    inputs, kw = _dtable_case(B, H, grid, D, opts, seed=B * 10 + H + 1)
    check_backend("triton", inputs, kw, torch.float16)


@pytest.mark.parametrize("scale", [-0.3, 1e-12])
def test_dtable_summed_over_batch_scale_not_folded(scale):
    """Scales that cannot be folded (table stored times log2(e), added after the
    scaled dot): the batch-reducing kernel reads the same table as the dK/dV one."""
    inputs, kw = make_case(3, 2, 70, 16, grid=(7, 10), table=True, amm=AMM(period=7.5, radius2=5, amplitude=0.7),
                           bias=(1, 2, 70, 70), seed=6)
    kw["scale"] = scale
    check_backend("triton", inputs, kw, torch.float32)


class _LaunchSpy:
    """Records (kernel name, kwargs, programs of the first tile) of every _launch_tiled call;
    runs them unless ``run`` is False."""

    def __init__(self, monkeypatch, run=True):
        self.calls = []
        orig = triton_op._launch_tiled

        def spy(kernel, tiles, cpu_tiles, grid_of, args, kwargs, q):
            first = tiles[0] if triton_op._on_gpu(q) else cpu_tiles
            self.calls.append(dict(kernel=kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__,
                                   kwargs=dict(kwargs), tile=first, programs=grid_of(*first[:2]), args=args))
            if run:
                orig(kernel, tiles, cpu_tiles, grid_of, args, kwargs, q)

        monkeypatch.setattr(triton_op, "_launch_tiled", spy)

    def by_kernel(self):
        return {c["kernel"]: c for c in self.calls}


@pytest.mark.parametrize("positions", [None, "shared", "batch"])
def test_dkdv_kernel_skips_table_atomics_without_per_sample_positions(monkeypatch, positions):
    """positions absent or shared by the batch: the dK/dV kernel runs with NEED_DTABLE=False
    and the batch-reducing kernel computes the table gradient; per-sample positions keep the
    dK/dV kernel's atomics (no dtable kernel).  The gradients are right either way."""
    inputs, kw = make_case(2, 2, 12 if positions else 16, 16, grid=4, table=True, amm=True,
                           positions=positions, seed=8)
    spy = _LaunchSpy(monkeypatch)
    check_backend("triton", inputs, kw, torch.float32)
    kernels = spy.by_kernel()
    apart = positions != "batch"
    assert kernels["_amm_attn_bwd_dkdv_kernel"]["kwargs"]["NEED_DTABLE"] is (not apart)
    assert ("_amm_attn_bwd_dtable_kernel" in kernels) is apart
    assert "_amm_attn_bwd_dq_kernel" in kernels


def test_dkdv_kernel_without_table_gradient_launches_no_dtable_kernel(monkeypatch):
    inputs, kw = make_case(2, 2, 16, 16, grid=4, table=True, amm=True, seed=9)
    (q, k, v), kwd = cast(inputs, kw, torch.float32, DEV, requires_grad=False)
    inp = validate_inputs(q, k, v, **kwd)
    args = inp.kernel_args()
    out, lse = triton_op.amm_attention_forward(*args)
    spy = _LaunchSpy(monkeypatch)
    res = triton_op.amm_attention_backward(torch.randn_like(out), *args[:3], out, lse, *args[3:], False, False)
    kernels = spy.by_kernel()
    assert set(kernels) == {"_amm_attn_bwd_dkdv_kernel", "_amm_attn_bwd_dq_kernel"}
    assert kernels["_amm_attn_bwd_dkdv_kernel"]["kwargs"]["NEED_DTABLE"] is False
    assert res[3].numel() == 0


def test_dtable_batch_reduced_writes_every_output(monkeypatch):
    """Poisoned dq/dk/dv come back finite; the table gradient equals the float64 one (the rows
    beyond the offsets exactly zero), also when the batch is split into chunks (last one partial)."""
    B, H, side, D = 3, 2, 5, 16
    inputs, kw = make_case(B, H, side * side, D, grid=side, table=True, amm=True, bias=(B, H, 25, 25),
                           seed=12)
    (q, k, v), kwd = cast(inputs, kw, torch.float32, DEV, requires_grad=False)
    qkv64, kw64 = cast(inputs, kw, torch.float64, "cpu")
    ref = reference_attention(*qkv64, **kw64)
    dout64 = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g_ref = grads_of(ref, qkv64, kw64, dout64)
    inp = validate_inputs(q, k, v, **kwd)
    args = inp.kernel_args()
    out, lse = triton_op.amm_attention_forward(*args)
    n_off = (2 * side - 1) ** 2
    for per_program in (None, 2, 1):
        if per_program is not None:
            monkeypatch.setattr(triton_op, "_dtable_batch_per_program", lambda B_, programs, q_, p=per_program: p)
        spy = _LaunchSpy(monkeypatch)
        grads = [torch.full(q.shape, float("nan"), device=DEV) for _ in range(3)]
        dq, dk, dv, dt, db = triton_op.amm_attention_backward(dout64.to(DEV, torch.float32), *args[:3], out, lse,
                                                              *args[3:], True, True, grads=grads)
        call = spy.by_kernel()["_amm_attn_bwd_dtable_kernel"]
        bm, bn = call["tile"][:2]
        chunks = -(-B // (per_program or B))
        assert call["programs"] == H * -(-25 // bm) * -(-25 // bn) * chunks
        for t in (dq, dk, dv, dt, db):
            assert not t.isnan().any()
        assert torch.equal(dt[n_off:], torch.zeros_like(dt[n_off:]))
        tol = {k_: (a * 10, r) for k_, (a, r) in GRAD_TOL.items()}
        assert_close(dt.cpu(), g_ref[3], torch.float32, tol, f"dtable (batch per program {per_program})")
        assert_close(db.cpu(), g_ref[4], torch.float32, GRAD_TOL, "dbias")
        for name, a, b in zip(("dq", "dk", "dv"), (dq, dk, dv), g_ref[:3]):
            assert_close(a.cpu(), b, torch.float32, GRAD_TOL, name)


def test_dtable_atomics_at_b32_h16_n256(monkeypatch):
    """Static count at the shape of an EDT-XL layer's backward (B=32, H=16, N=256) on the GPU
    tiles: one atomic per (h, i, j) and batch chunk instead of one per (b, h, i, j), at least
    16x fewer (B-fold when the head x tile programs alone fill an H100's 132 SMs).  Nothing runs."""
    B, H, side, D = 32, 16, 16, 64
    N = side * side
    monkeypatch.setattr(triton_op, "_on_gpu", lambda t: True)
    spy = _LaunchSpy(monkeypatch, run=False)

    class _NoLaunch:
        def __getitem__(self, grid):
            return lambda *a, **k: None

    monkeypatch.setattr(triton_op, "_amm_attn_bwd_delta_kernel", _NoLaunch())
    q = torch.zeros(B, H, N, D)
    table = torch.zeros((2 * side - 1) ** 2, H)
    lse = torch.zeros(B, H, N)
    triton_op.amm_attention_backward(q, q, q, q, q, lse, table, None, None, None, None, D ** -0.5, side, side,
                                     True, False)
    kernels = spy.by_kernel()
    assert kernels["_amm_attn_bwd_dkdv_kernel"]["kwargs"]["NEED_DTABLE"] is False
    call = kernels["_amm_attn_bwd_dtable_kernel"]
    bm, bn = call["tile"][:2]
    assert N % bm == 0 and N % bn == 0  # every pair valid: each program adds bm * bn atomics
    atomics = call["programs"] * bm * bn
    before = B * H * N * N  # one per (b, h, i, j) in the dK/dV kernel
    assert before == 33_554_432
    assert before // atomics >= 16, (before, atomics)
    assert atomics == H * N * N  # 256 programs fill 132 SMs: the batch is not split


def test_grid_tables_built_once_per_table_version(monkeypatch):
    """The per-offset table and grid indices are built by one launch.  A table that takes a
    gradient: the backward re-uses the forward's tables, every forward builds them again (a fused
    optimizer step writes the table without bumping its version), and the results follow each
    optimizer step.  A frozen table: the next forward re-uses them, an in-place update rebuilds."""
    builds = []
    build = triton_op._build_grid
    monkeypatch.setattr(triton_op, "_build_grid", lambda *a: builds.append(1) or build(*a))
    triton_op._grid_cache.clear()
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 16, 8, generator=g, device=DEV).requires_grad_(True) for _ in range(3))
    table = torch.nn.Parameter(torch.randn(49, 2, generator=g, device=DEV))
    kw = dict(rel_pos_bias=table, grid=4, amm=True)
    opt = torch.optim.AdamW([table], lr=0.5, fused=True)
    for step in range(3):
        out = amm_attention(q, k, v, backend="triton", **kw)
        assert len(builds) == 2 * step + 1
        grads = torch.autograd.grad(out, (q, k, v, table), torch.ones_like(out))
        assert len(builds) == 2 * step + 1  # the backward found the forward's tables
        ref = reference_attention(q, k, v, **kw)
        ref_grads = torch.autograd.grad(ref, (q, k, v, table), torch.ones_like(ref))
        assert_close(out.detach(), ref.detach(), torch.float32, FWD_TOL, f"out, step {step}")
        for a, b in zip(grads, ref_grads):
            assert_close(a, b, torch.float32, GRAD_TOL, f"grad, step {step}")
        table.grad = grads[3]
        version = table._version
        opt.step()
        with torch.no_grad():
            assert_close(amm_attention(q, k, v, backend="triton", **kw), reference_attention(q, k, v, **kw),
                         torch.float32, FWD_TOL, f"no-grad out after step {step}")
        assert table._version == version and len(builds) == 2 * step + 2  # the fused step: no version bump
    frozen = table.detach().clone()
    kw = dict(rel_pos_bias=frozen, grid=4, amm=True)
    with torch.no_grad():
        n = len(builds)
        out = amm_attention(q, k, v, backend="triton", **kw)
        assert torch.equal(amm_attention(q, k, v, backend="triton", **kw), out) and len(builds) == n + 1
        frozen.mul_(2.0)
        out2 = amm_attention(q, k, v, backend="triton", **kw)
    assert len(builds) == n + 2
    assert_close(out2, reference_attention(q, k, v, **kw), torch.float32, FWD_TOL, "out after mul_")


def test_positions_out_of_range_unchecked_by_default(monkeypatch):
    """Without value checks no position is read back on the host: the Triton kernels clamp
    each position to the grid (the scores of the nearest cell, no read out of bounds) and
    the cpp kernel raises its own error; with them on, a ValueError names the range."""
    assert not edt_kernels.check_values()
    monkeypatch.setattr(edt_kernels.attention, "_check_positions_range",
                        lambda *a: pytest.fail("positions were read on the host"))
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 4, 8, generator=g) for _ in range(3))
    table = torch.randn(9, 2, generator=g)
    bad = torch.tensor([[0, 1, 5, -2], [3, 2, 1, 0]])
    kw = dict(rel_pos_bias=table, grid=2)
    if "triton" in edt_kernels.available_backends():
        qd, kd, vd, bad_d = (t.to(DEV) for t in (q, k, v, bad))
        kwd = dict(kw, rel_pos_bias=table.to(DEV))
        out = amm_attention(qd, kd, vd, positions=bad_d, backend="triton", **kwd)
        want = amm_attention(qd, kd, vd, positions=bad_d.clamp(0, 3), backend="triton", **kwd)
        assert torch.equal(out, want)
    if "cpp" in edt_kernels.available_backends():
        with pytest.raises(RuntimeError, match="positions must lie in"):
            amm_attention(q, k, v, positions=bad, backend="cpp", **kw)
    monkeypatch.undo()
    edt_kernels.set_check_values(True)
    with pytest.raises(ValueError, match=r"positions must lie in \[0, rows\*cols\) = \[0, 4\)"):
        amm_attention(q, k, v, positions=bad, backend="torch", **kw)
