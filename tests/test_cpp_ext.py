"""The compiled extension (csrc/): CPU amm_attention forward and every gradient
against ``reference_attention`` (float64 ground truth), the token kernels
against ``edt_kernels.reference.tokens``, the build/fallback plumbing and the
forward's memory.

The extension is compiled on first use (about a minute on 2 cores, cached);
when it cannot be built these tests fail with the compiler's reason, they do
not skip.  Outputs are poisoned: the tests run with
``torch.utils.deterministic.fill_uninitialized_memory``, so every ``empty``
the kernels allocate starts as NaN and an unwritten row shows up.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from edt_kernels import AMM, amm_attention, reference_attention
from edt_kernels import _ext
from edt_kernels.attention import select_backend, validate_inputs
from edt_kernels.ops.amm_attention_cpp import CppBackend, amm_attention_cpp
from edt_kernels.reference.attention import reference_attention_lse
from edt_kernels.reference.tokens import (
    reference_gather_tokens,
    reference_scatter_tokens,
    reference_unshuffle_with_mask_token,
)

from conftest import load_fixture
from tolerances import FWD_TOL, GRAD_TOL, assert_close

ops = torch.ops.edt_kernels_cpp


@pytest.fixture(scope="module", autouse=True)
def extension():
    """Build/load the extension once; a failure is a test error with the reason."""
    _ext.require_cpu()


@pytest.fixture(autouse=True)
def poisoned_empty():
    """torch.empty (also at::empty in the kernels) returns NaN-filled memory."""
    was_det = torch.are_deterministic_algorithms_enabled()
    was_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    was_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.utils.deterministic.fill_uninitialized_memory = was_fill
    torch.use_deterministic_algorithms(was_det, warn_only=was_warn)


# ----------------------------------------------------------------------------- attention cases

# (N, D, grid, positions, table, amm, bias shape, modulation shape); grid None = no grid
CASES = [
    (1, 16, 1, None, True, True, None, None),
    (2, 52, None, None, False, False, None, None),
    (16, 64, 4, None, True, True, None, None),
    (64, 72, 8, None, True, False, (1, 1, 64, 64), None),
    (97, 52, 16, "batch", True, True, None, None),  # masked subset of a 16x16 grid
    (179, 72, 16, "batch", True, False, None, None),  # MDT masked (179 of 256)
    # few keys of a large grid (40 of 256), table + AMM gathered
    (40, 32, 16, "batch", True, True, None, None),
    (130, 128, (12, 13), "shared", True, "custom", (2, 1, 130, 130), (1, 3, 130, 130)),
    (256, 52, 16, None, True, True, None, None),  # EDT stage 0 / 4
    (300, 16, (15, 20), None, True, "custom", None, (2, 3, 1, 300)),
    (67, 64, None, None, False, False, (1, 3, 67, 1), (2, 1, 67, 67)),
    (33, 128, 6, "shared", False, True, (2, 3, 33, 33), None),
    (255, 16, (16, 16), "batch", True, True, (1, 3, 255, 255), (1, 1, 255, 255)),
    (40, 7, 7, "batch", True, True, None, None),  # odd head dims: 7 and 256
    (24, 256, None, None, False, False, (2, 3, 24, 24), None),
    (600, 16, (20, 30), None, True, "custom", None, (1, 3, 600, 1)),  # several key tiles: online rescaling
    # sorted positions, 248 of 16x16: mostly long runs of consecutive columns (read run by run)
    (248, 40, 16, "sorted", True, True, (1, 3, 248, 248), None),
    # run by run without bias/modulation (one fused pass per row): sorted positions, AMM only
    # (runs of 12, partial vectors), and a run split by the key tile boundary at 512
    (248, 40, 16, "sorted", True, False, None, None),
    (144, 24, 12, None, False, True, None, None),
    (540, 16, (18, 30), None, True, False, None, None),
]


def case_id(case):
    N, D, grid, pos, table, amm, bias, mod = case
    parts = [f"N{N}", f"D{D}"]
    if grid is not None:
        parts.append(f"grid{grid if isinstance(grid, int) else '%dx%d' % grid}")
    for flag, name in ((pos, f"pos-{pos}"), (table, "table"), (amm, "amm"), (bias, "bias"), (mod, "mod")):
        if flag:
            parts.append(name)
    return "-".join(parts)


def make_inputs(case, dtype, seed=0, B=2, H=3):
    N, D, grid, pos, table, amm, bias, mod = case
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, D, generator=g, dtype=torch.float64) for _ in range(3))
    kw = {}
    if grid is not None:
        rows, cols = (grid, grid) if isinstance(grid, int) else grid
        kw["grid"] = grid
        if table:
            kw["rel_pos_bias"] = torch.randn((2 * rows - 1) * (2 * cols - 1) + 3, H, generator=g,
                                             dtype=torch.float64)
        if amm:
            kw["amm"] = AMM(period=5.0, radius2=8) if amm == "custom" else True
        if pos == "batch":
            kw["positions"] = torch.stack([torch.randperm(rows * cols, generator=g)[:N] for _ in range(B)])
        elif pos == "sorted":
            kw["positions"] = torch.stack([torch.randperm(rows * cols, generator=g)[:N].sort().values
                                           for _ in range(B)])
        elif pos == "shared":
            kw["positions"] = torch.randperm(rows * cols, generator=g)[:N]
    if bias is not None:
        kw["bias"] = torch.randn(*bias, generator=g, dtype=torch.float64)
    if mod is not None:
        kw["modulation"] = torch.rand(*mod, generator=g, dtype=torch.float64) * 2
    cast = {name: t.to(dtype) for name, t in kw.items()
            if isinstance(t, torch.Tensor) and t.is_floating_point()}
    return (q, k, v), kw, [t.to(dtype) for t in (q, k, v)], {**kw, **cast}


def run_grads(fn, qkv, kw, dout):
    leaves = [t.detach().requires_grad_(True) for t in qkv]
    kw = dict(kw)
    for name in ("rel_pos_bias", "bias"):
        if name in kw:
            kw[name] = kw[name].detach().requires_grad_(True)
    out = fn(*leaves, **kw)
    wrt = leaves + [kw[n] for n in ("rel_pos_bias", "bias") if n in kw]
    grads = torch.autograd.grad(out, wrt, dout.to(out.dtype))
    return out, grads


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_attention_matches_reference(case, dtype):
    qkv64, kw64, qkv, kw = make_inputs(case, dtype)
    dout = torch.randn_like(qkv64[0])
    ref, ref_grads = run_grads(reference_attention, qkv64, kw64, dout)
    out, grads = run_grads(lambda *a, **k: amm_attention(*a, backend="cpp", **k), qkv, kw, dout)
    assert out.dtype == dtype and out.shape == ref.shape
    assert_close(out, ref, dtype, FWD_TOL, "out")
    names = (["dq", "dk", "dv"] + (["dtable"] if "rel_pos_bias" in kw else [])
             + (["dbias"] if "bias" in kw else []))
    assert len(grads) == len(names)
    for name, g, r in zip(names, grads, ref_grads):
        # dbias comes back from the kernel as float32 (kernel contract), so for
        # float64 inputs it is held to the float32 tolerance; dtable is float64.
        tol_dtype = torch.float32 if name == "dbias" else dtype
        assert g.shape == r.shape, name
        assert_close(g, r, tol_dtype, GRAD_TOL, name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_attention_low_precision(dtype):
    """float16/bfloat16 are computed in float32 inside the kernel."""
    case = (97, 52, 16, "batch", True, True, (1, 3, 97, 97), None)
    qkv64, kw64, qkv, kw = make_inputs(case, dtype, seed=1)
    dout = torch.randn_like(qkv64[0])
    ref, ref_grads = run_grads(reference_attention, qkv64, kw64, dout)
    out, grads = run_grads(lambda *a, **k: amm_attention(*a, backend="cpp", **k), qkv, kw, dout)
    assert out.dtype == dtype
    assert_close(out, ref, dtype, FWD_TOL, "out")
    for name, g, r in zip(["dq", "dk", "dv", "dtable", "dbias"], grads, ref_grads):
        assert_close(g, r, dtype, GRAD_TOL, name)


@pytest.mark.parametrize("with_amm", [False, True], ids=["bias", "bias+amm"])
def test_official_attention_fixture(with_amm):
    """The authors' attention (materialised table gather, softmax, AMM) on a masked subset."""
    fx = load_fixture("official_attention_full.pt")
    out = amm_attention(fx["q"], fx["k"], fx["v"], scale=fx["scale"], rel_pos_bias=fx["table"], grid=fx["grid"],
                        positions=fx["positions"], amm=with_amm or None, backend="cpp")
    torch.testing.assert_close(out, fx["out_bias_amm" if with_amm else "out_bias"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_strided_views_are_read_in_place(dtype):
    """The usual qkv.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4) views (read
    in place by the GEMMs, row stride 3 H D), and a head dim with non-unit
    stride, and a table stored transposed (the kernel packs it through its
    strides), give the same result as contiguous inputs."""
    B, N, H, D = 2, 64, 3, 52
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(B, N, 3, H, D, generator=g, dtype=torch.float64).to(dtype)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    vt = torch.randn(B, H, D, N, generator=g, dtype=torch.float64).to(dtype).transpose(-1, -2)  # stride_d = N
    assert not q.is_contiguous() and vt.stride(-1) != 1
    table = torch.randn(H, 15 * 15, generator=g, dtype=torch.float64).to(dtype).t()
    assert table.stride() == (1, 15 * 15)
    out = amm_attention(q, k, vt, rel_pos_bias=table, grid=8, amm=True, backend="cpp")
    ref = reference_attention(q.contiguous().double(), k.contiguous().double(), vt.contiguous().double(),
                              rel_pos_bias=table.double(), grid=8, amm=True)
    assert_close(out, ref, dtype, FWD_TOL, "out")
    # out is [B, N, H, D] in memory: the projection's reshape is free
    assert out.transpose(1, 2).is_contiguous()


_NO_BLAS_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path[:0] = [sys.argv[1], sys.argv[2]]
    from edt_kernels import amm_attention, reference_attention
    from edt_kernels import _ext
    _ext.require_cpu()
    from test_cpp_ext import make_inputs, run_grads
    from tolerances import FWD_TOL, GRAD_TOL, assert_close
    assert torch.ops.edt_kernels_cpp.cpu_gemm() == sys.argv[3]
    case = (300, 16, (15, 20), "shared", True, "custom", (1, 3, 300, 300), None)
    for dtype in (torch.float64, torch.float32):
        qkv64, kw64, qkv, kw = make_inputs(case, dtype)
        dout = torch.randn_like(qkv64[0])
        ref, rg = run_grads(reference_attention, qkv64, kw64, dout)
        out, gr = run_grads(lambda *a, **k: amm_attention(*a, backend="cpp", **k), qkv, kw, dout)
        assert_close(out, ref, dtype, FWD_TOL, "out")
        for name, g, r in zip(["dq", "dk", "dv", "dtable", "dbias"], gr, rg):
            assert_close(g, r, torch.float32 if name == "dbias" else dtype, GRAD_TOL, name)
    print("ok")
""")


@pytest.mark.parametrize("env", [{"EDT_KERNELS_CPU_BLAS": "0"},
                                 {"EDT_KERNELS_CPU_BLAS": "0", "EDT_KERNELS_CPU_PACKED": "0"},
                                 {"EDT_KERNELS_CPU_PACKED": "0"}],
                         ids=["no-blas", "no-blas-no-packed", "blas-no-packed"])
def test_gemm_fallback_without_blas_matches_reference(env):
    """The GEMM paths other than the default: EDT_KERNELS_CPU_BLAS=0 (the
    kernels' own micro-kernel instead of the BLAS libtorch exports, what runs
    where libtorch exports none; float64 uses it, float32 still the packed
    kernel) and EDT_KERNELS_CPU_PACKED=0 (float32 on that micro-kernel or on
    the BLAS too), forward and every gradient, several query and key tiles."""
    here = os.path.dirname(os.path.abspath(__file__))
    if _ext.cpu_extension_error() is None and "MKL" in torch.__config__.show():
        assert ops.cpu_gemm() == "blas"  # libtorch built with MKL exports sgemm_/dgemm_
    want = "micro-kernel" if env.get("EDT_KERNELS_CPU_BLAS") == "0" else "blas"
    if want == "blas" and "MKL" not in torch.__config__.show():
        want = ops.cpu_gemm()
    res = subprocess.run([sys.executable, "-c", _NO_BLAS_SCRIPT, os.path.dirname(here), here, want],
                         env=dict(os.environ, **env), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == "ok", res.stdout[-2000:]


def test_forward_lse_matches_reference():
    case = (179, 72, 16, "batch", True, True, (1, 3, 179, 179), None)
    qkv64, kw64, _, _ = make_inputs(case, torch.float64)
    inp = validate_inputs(*qkv64, **kw64)
    out, lse = amm_attention_cpp.fwd_op(*inp.kernel_args())
    assert lse.dtype == torch.float32 and lse.shape == (2, 3, 179)
    ref_lse = reference_attention_lse(*qkv64[:2], rel_pos_bias=kw64["rel_pos_bias"], grid=16,
                                      positions=kw64["positions"], bias=kw64["bias"])
    assert_close(lse, ref_lse, torch.float32, FWD_TOL, "lse")


def test_nan_propagates_like_reference():
    q, k, v = (torch.randn(1, 2, 20, 16, dtype=torch.float64) for _ in range(3))
    q[0, 1, 5, 3] = float("nan")
    bias = torch.zeros(1, 1, 20, 20, dtype=torch.float64)
    bias[..., 7, :] = float("-inf")  # a fully masked row: NaN in the reference too
    out = amm_attention(q, k, v, bias=bias, backend="cpp")
    ref = reference_attention(q, k, v, bias=bias)
    assert torch.equal(out.isnan(), ref.isnan())
    assert_close(out, ref, torch.float64, FWD_TOL, "out")


def test_auto_picks_cpp_on_cpu(monkeypatch, kernels_env):
    kernels_env("EDT_KERNELS_BACKEND")
    q = torch.randn(1, 2, 16, 16)
    assert select_backend(validate_inputs(q, q, q, grid=4, amm=True)).name == "cpp"


def test_unavailable_extension_falls_back_with_reason(monkeypatch, kernels_env):
    """A failed build is reported by the backend and "auto" uses the reference."""
    kernels_env("EDT_KERNELS_BACKEND")
    monkeypatch.setitem(_ext._state, "cpu", "c++: error: no compiler (simulated)")
    q = torch.randn(1, 2, 16, 16)
    inp = validate_inputs(q, q, q)
    why = CppBackend().not_supported_reasons(inp)
    assert any("simulated" in w for w in why)
    assert select_backend(inp).name == "torch"
    with pytest.raises(ValueError, match="simulated"):
        amm_attention(q, q, q, backend="cpp")


def test_missing_compiler_is_a_clear_reason(monkeypatch):
    """One answer before and at the build: the reason the backend reports
    without building is the error a load attempt raises."""
    monkeypatch.setenv("CXX", "edt-kernels-no-such-compiler")
    monkeypatch.delenv("EDT_KERNELS_JIT", raising=False)
    monkeypatch.setattr(_ext, "_state", {})
    monkeypatch.setattr(_ext, "_prebuilt", lambda module: None)
    assert "no C++ compiler found" in _ext.unavailable_reason("cpu")
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler found"):
        _ext._load_one("cpu")


def test_prebuilt_module_used_only_when_current(monkeypatch, tmp_path):
    lib = tmp_path / "_C.so"
    spec = type("Spec", (), {"origin": str(lib)})()
    monkeypatch.setattr(_ext.importlib.util, "find_spec", lambda name: spec)
    lib.write_bytes(b"\0stale edt_kernels_src_0123456789abcdef\0")
    assert _ext._prebuilt("edt_kernels._C") is None
    lib.write_bytes(f"\0edt_kernels_src_{_ext.source_hash()}\0".encode())
    assert _ext._prebuilt("edt_kernels._C") == str(lib)


def test_cpp_op_rejects_bad_positions():
    """Out-of-range positions never reach the kernel's table reads."""
    q = torch.randn(1, 1, 4, 16)
    table = torch.randn(9, 1)
    with pytest.raises(RuntimeError, match="positions must lie in"):
        ops.amm_attention_fwd(q, q, q, table, torch.tensor([0, 1, 2, 9]), None, None, None, 0.25, 2, 2)
    with pytest.raises(RuntimeError, match="table must be"):
        ops.amm_attention_fwd(q, q, q, torch.randn(8, 1), None, None, None, None, 0.25, 2, 2)


def test_opcheck_attention_ops():
    case = (20, 16, 5, "batch", True, True, (1, 2, 20, 20), (2, 1, 20, 20))
    qkv64, kw64, _, _ = make_inputs(case, torch.float32, B=2, H=2)
    inp = validate_inputs(*(t.float().requires_grad_(True) for t in qkv64),
                          **{n: (t.float().requires_grad_(n in ("rel_pos_bias", "bias"))
                                 if t.is_floating_point() else t) if isinstance(t, torch.Tensor) else t
                             for n, t in kw64.items()})
    args = inp.kernel_args()
    torch.library.opcheck(amm_attention_cpp.fwd_op, args)
    out, lse = amm_attention_cpp.fwd_op(*args)
    dout = torch.randn_like(out)
    bwd_args = (dout, *[a.detach() if isinstance(a, torch.Tensor) else a for a in args[:3]],
                out.detach(), lse, *[a.detach() if isinstance(a, torch.Tensor) else a for a in args[3:]],
                True, True)
    torch.library.opcheck(amm_attention_cpp.bwd_op, bwd_args)


# ----------------------------------------------------------------------------- tokens

TOKEN_DTYPES = [torch.float32, torch.float16, torch.float64]


def _perm_ids(B, L, K, g):
    shuffle = torch.stack([torch.randperm(L, generator=g) for _ in range(B)])
    return shuffle, torch.argsort(shuffle, dim=1), shuffle[:, :K]


@pytest.mark.parametrize("dtype", TOKEN_DTYPES, ids=str)
def test_gather_scatter_tokens(dtype):
    g = torch.Generator().manual_seed(5)
    B, L, K, C = 3, 37, 21, 72
    x = torch.randn(B, L, C, generator=g).to(dtype)
    _, _, ids = _perm_ids(B, L, K, g)
    assert torch.equal(ops.gather_tokens(x, ids), reference_gather_tokens(x, ids))
    xs = torch.randn(B, C, L, generator=g).to(dtype).transpose(1, 2)  # channel stride != 1
    assert torch.equal(ops.gather_tokens(xs, ids.int()), reference_gather_tokens(xs, ids))
    y = torch.randn(B, K, C, generator=g).to(dtype)
    assert torch.equal(ops.scatter_tokens(y, ids, L), reference_scatter_tokens(y, ids, L))


def test_out_of_range_token_ids_are_never_read():
    x = torch.randn(2, 5, 8)
    ids = torch.tensor([[0, 7], [-1, 4]])
    out = ops.gather_tokens(x, ids)
    assert torch.equal(out[0, 0], x[0, 0]) and torch.equal(out[1, 1], x[1, 4])
    assert torch.equal(out[0, 1], torch.zeros(8)) and torch.equal(out[1, 0], torch.zeros(8))
    sc = ops.scatter_tokens(torch.ones(2, 2, 8), ids, 5)
    assert sc.sum() == 16  # only the two in-range rows were written


@pytest.mark.parametrize("with_pos", [True, False], ids=["pos", "nopos"])
@pytest.mark.parametrize("dtype", TOKEN_DTYPES, ids=str)
def test_unshuffle_with_mask_token(dtype, with_pos):
    g = torch.Generator().manual_seed(6)
    B, L, K, C = 3, 40, 23, 36
    _, restore, _ = _perm_ids(B, L, K, g)
    x = torch.randn(B, K, C, generator=g).to(dtype)
    mask_token = torch.randn(1, 1, C, generator=g).to(dtype)
    pos = torch.randn(1, L, C, generator=g).to(dtype) if with_pos else None
    out = ops.unshuffle_with_mask_token(x, restore, mask_token, pos)
    ref = reference_unshuffle_with_mask_token(x, restore, mask_token, pos)
    assert_close(out, ref, dtype, FWD_TOL, "out")
    # backward: one read of dout gives dx_kept, d mask_token (float32), d pos_embed (float32)
    dout = torch.randn(B, L, C, generator=g).to(dtype)
    leaves = [t.double().requires_grad_(True) for t in (x, mask_token)] + (
        [pos.double().requires_grad_(True)] if with_pos else [])
    ref = reference_unshuffle_with_mask_token(leaves[0], restore, leaves[1], leaves[2] if with_pos else None)
    ref_grads = torch.autograd.grad(ref, leaves, dout.double())
    dx, dmask, dpos = ops.unshuffle_with_mask_token_backward(dout, restore, K, with_pos)
    assert dx.dtype == dtype and dmask.dtype == torch.float32 and dmask.shape == (1, 1, C)
    assert torch.equal(dx, ref_grads[0].to(dtype))
    assert_close(dmask, ref_grads[1], dtype if dtype != torch.float64 else torch.float32, GRAD_TOL, "dmask")
    if with_pos:
        assert dpos.shape == (1, L, C) and dpos.dtype == torch.float32
        assert_close(dpos, ref_grads[2], dtype if dtype != torch.float64 else torch.float32, GRAD_TOL, "dpos")
    else:
        assert dpos.numel() == 0


def test_token_kernels_are_the_cpp_backend_of_the_token_ops(monkeypatch, kernels_env):
    """The compiled token kernels are the ``cpp`` backend of gather/scatter/
    unshuffle: asked by name they run (values and gradients equal the
    reference); ``auto`` never takes them for CPU tensors."""
    import edt_kernels
    from edt_kernels import backends
    from edt_kernels.backends import OpCall

    kernels_env("EDT_KERNELS_BACKEND")
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 9, 16, generator=g, requires_grad=True)
    ids = torch.stack([torch.randperm(9, generator=g)[:5] for _ in range(2)])
    out = edt_kernels.gather_tokens(x, ids, backend="cpp")
    (dx,) = torch.autograd.grad(out, x, torch.ones_like(out))
    assert torch.equal(out, reference_gather_tokens(x, ids))
    assert torch.equal(dx, torch.zeros_like(x).scatter(1, ids[..., None].expand(2, 5, 16), 1.0))
    s = edt_kernels.scatter_tokens(out.detach(), ids, 9, backend="cpp")
    assert torch.equal(s, torch.zeros(2, 9, 16).scatter(1, ids[..., None].expand(2, 5, 16), out.detach()))
    restore = torch.stack([torch.randperm(9, generator=g) for _ in range(2)])
    xk = torch.randn(2, 5, 16, generator=g, requires_grad=True)
    mt = torch.randn(1, 1, 16, generator=g, requires_grad=True)
    u = edt_kernels.unshuffle_with_mask_token(xk, restore, mt, backend="cpp")
    u.sum().backward()
    assert torch.equal(u, reference_unshuffle_with_mask_token(xk, restore, mt))
    assert torch.allclose(mt.grad.flatten(), torch.full((16,), float((restore >= 5).sum())))
    for op in ("gather_tokens", "scatter_tokens", "unshuffle_with_mask_token"):
        assert backends.select(op, OpCall((), x=x.detach())).name != "cpp"


def _token_op_args(dtype, with_pos):
    g = torch.Generator().manual_seed(8)
    B, L, K, C = 2, 11, 6, 12
    shuffle, restore, ids = _perm_ids(B, L, K, g)
    x = torch.randn(B, L, C, generator=g).to(dtype).requires_grad_(True)
    y = torch.randn(B, K, C, generator=g).to(dtype).requires_grad_(True)
    mt = torch.randn(1, 1, C, generator=g).to(dtype).requires_grad_(True)
    pos = torch.randn(1, L, C, generator=g).to(dtype).requires_grad_(True) if with_pos else None
    return x, y, ids, restore, mt, pos, K


@pytest.mark.parametrize("with_pos", [True, False], ids=["pos", "nopos"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_opcheck_token_ops(dtype, with_pos):
    """The token kernels' custom ops: schema, fake kernels and autograd agree
    with the kernels (torch.library.opcheck)."""
    from edt_kernels.ops import tokens_cpp as T

    x, y, ids, restore, mt, pos, K = _token_op_args(dtype, with_pos)
    torch.library.opcheck(T.gather_tokens_cpp, (x, ids))
    torch.library.opcheck(T.scatter_tokens_cpp, (y, ids, x.shape[1]))
    torch.library.opcheck(T.unshuffle_with_mask_token_cpp, (y, restore, mt, pos))
    dout = torch.randn(x.shape, dtype=dtype)
    torch.library.opcheck(T.unshuffle_with_mask_token_cpp_backward, (dout, restore, K, with_pos))


# ----------------------------------------------------------------------------- memory

def test_forward_memory_is_not_quadratic():
    """Peak RSS of the forward at N=1024 (8 heads) stays below one N x N
    float32 matrix (4 MiB; 32 MiB for all heads), while the materialising reference
    on the same inputs goes above it: the measurement can fail.  Run in a fresh
    process, with the peak mark reset before each call (Linux /proc)."""
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak-RSS mark")
    code = textwrap.dedent("""
        import json, torch
        from edt_kernels import _ext, reference_attention
        from edt_kernels.ops.amm_attention_cpp import amm_attention_cpp
        from edt_kernels.amm import amm_offset_table
        _ext.require_cpu()
        B, H, N, D = 1, 8, 1024, 64
        q, k, v = (torch.randn(B, H, N, D) for _ in range(3))
        table = torch.randn(63 * 63, H); amm = amm_offset_table(32)
        small = torch.randn(1, 1, 64, 16); amm_attention_cpp(small, small, small, None, None, None, None, None, 0.25, 8, 8)
        def status(field):
            for line in open("/proc/self/status"):
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        def peak_rise(fn):
            # Reset the peak-RSS mark (VmHWM) so that an earlier peak (imports,
            # loading the extension) cannot hide this call's allocations.
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            base = status("VmRSS")
            with torch.no_grad():
                res = fn()
            return res, status("VmHWM") - base
        out, cpp = peak_rise(lambda: amm_attention_cpp(q, k, v, table, None, amm, None, None, D ** -0.5, 32, 32))
        ref, refm = peak_rise(lambda: reference_attention(q, k, v, rel_pos_bias=table, grid=32, amm=True))
        print(json.dumps({"cpp": cpp, "ref": refm, "err": float((out - ref).abs().max())}))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads(res.stdout.strip().splitlines()[-1])
    per_head_nn = 1024 * 1024 * 4
    assert m["err"] < 1e-4
    assert m["ref"] > 2 * per_head_nn, m  # the control: materialising shows up
    # Beyond out itself (2 MiB), the rest (per-thread tiles and packed K/V, LSE) must stay
    # below one N x N matrix (4 MiB; materialising scores would take that per head and thread).
    out_bytes = 1 * 8 * 1024 * 64 * 4
    assert m["cpp"] - out_bytes < per_head_nn, m


@pytest.mark.parametrize("march", ["x86-64", "x86-64-v4"])
def test_cpu_sources_compile_for_other_instruction_sets(march):
    """The CPU sources compile for baseline x86-64 (the scalar / SSE paths that
    EDT_KERNELS_NATIVE=0 and portable builds take) and for AVX-512
    (x86-64-v4), not only for this machine's -march=native: syntax and
    template instantiation with -fsyntax-only, no code generated."""
    import platform
    import shutil
    import sysconfig
    from torch.utils.cpp_extension import include_paths

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86-64 instruction sets")
    cxx = shutil.which(os.environ.get("CXX", "c++"))
    if cxx is None:
        pytest.skip("no C++ compiler")
    flags = _ext.cpu_cflags(native=False) + [f"-march={march}", "-fsyntax-only", "-std=c++17"]
    flags += [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    for src in ("amm_attention_cpu.cpp", "tokens_cpu.cpp"):
        res = subprocess.run([cxx, *flags, str(_ext.CSRC_DIR / src)], capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, f"{src} for -march={march}:\n{res.stderr[-3000:]}"
