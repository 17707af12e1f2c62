"""amm_attention_qkvpacked: q, k, v read from one [B, N, 3, H, D] tensor, dqkv
written into one buffer.

Out and dqkv (and the table / bias gradients) are compared with the float64
reference of the same inputs on the triton backend (interpreter on CPU) and
the torch backend (and cpp where it builds); the triton backward is checked to
hand autograd its own dqkv buffer (no stack, no copy); the modules wired to the
packed entry compute exactly what the unpacked entry computes.
"""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import triton_device
from helpers.attention_cases import attention_kwargs, cast
from tolerances import FWD_TOL, GRAD_TOL, assert_close

import edt_kernels
from edt_kernels import AMMAttention, amm_attention, amm_attention_qkvpacked, reference_attention
from edt_kernels._ext import unavailable_reason as cpp_unavailable_reason
from edt_kernels._triton_support import triton_unavailable_reason

DEV = triton_device()
requires_triton = pytest.mark.skipif(triton_unavailable_reason() is not None,
                                     reason=f"triton backend unavailable: {triton_unavailable_reason()}")


def _triton_op():
    from edt_kernels.ops import amm_attention as triton_op

    return triton_op


# ----------------------------------------------------------------------------- helpers

def make_case(B, H, N, D, *, grid=None, table=False, positions=None, amm=False, bias=None,
              modulation=None, extra=3, seed=0):
    """A float64 master qkv [B, N, 3, H, D] and the kwargs of the packed entry."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, N, 3, H, D, generator=g, dtype=torch.float64)
    kw = attention_kwargs(g, B, H, N, grid=grid, table=table, positions=positions, amm=amm, bias=bias,
                          modulation=modulation, extra=extra)
    return qkv, kw


def reference_packed(qkv, **kw):
    """The float64 reference on the [B, H, N, D] views, returned as [B, N, H, D]."""
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    return reference_attention(q, k, v, **kw).transpose(1, 2)


def grads_of(out, qkv, kw, dout):
    wrt = [qkv] + [kw[n] for n in ("rel_pos_bias", "bias") if n in kw]
    return torch.autograd.grad(out, wrt, dout)


def check_packed(backend, qkv, kw, dtype, device):
    qkv64, kw64 = cast(qkv, kw, torch.float64, "cpu")
    ref = reference_packed(qkv64, **kw64)
    x, kwd = cast(qkv, kw, dtype, device)
    out = amm_attention_qkvpacked(x, backend=backend, **kwd)
    assert out.dtype == dtype and out.shape == ref.shape  # (B, N, H, D)
    assert_close(out.cpu(), ref, dtype, FWD_TOL, "out")
    dout64 = torch.randn(ref.shape, generator=torch.Generator().manual_seed(123), dtype=torch.float64)
    g_ref = grads_of(ref, qkv64, kw64, dout64)
    g = grads_of(out, x, kwd, dout64.to(device, dtype))
    names = ["dqkv"] + [n for n in ("rel_pos_bias", "bias") if n in kw]
    assert g[0].shape == qkv.shape
    for name, a, b in zip(names, g, g_ref):
        tol = dict(GRAD_TOL)
        if name == "rel_pos_bias":  # sums B*N*N terms: the tolerance scales with that magnitude
            tol = {k: (a_ * 10, r) for k, (a_, r) in GRAD_TOL.items()}
        assert_close(a.cpu(), b, dtype, tol, name)
    return out, g


CASES = [
    pytest.param(2, 2, 16, 16, dict(grid=4), id="plain"),
    pytest.param(2, 2, 16, 24, dict(grid=4, table=True, amm=True), id="table-amm"),
    pytest.param(2, 3, 11, 16, dict(grid=4, table=True, amm=True, positions="batch"), id="table-amm-positions"),
    pytest.param(1, 2, 9, 20, dict(grid=5, table=True, positions="shared", bias=(1, 2, 9, 9)),
                 id="table-positions-bias"),
    pytest.param(2, 2, 25, 16, dict(grid=5, amm=True, bias=(2, 2, 25, 25), modulation=(2, 1, 25, 25)),
                 id="amm-bias-modulation"),
    pytest.param(1, 1, 37, 16, dict(bias=(37, 37)), id="no-grid-N37"),
]


# ----------------------------------------------------------------------------- against float64

@requires_triton
@pytest.mark.parametrize("B,H,N,D,opts", CASES)
def test_packed_float32_on_triton(B, H, N, D, opts):
    qkv, kw = make_case(B, H, N, D, **opts, seed=N + D)
    check_packed("triton", qkv, kw, torch.float32, DEV)


@requires_triton
@pytest.mark.parametrize("B,H,N,D,opts", CASES[1:3])
def test_packed_float16_on_triton(B, H, N, D, opts):
    qkv, kw = make_case(B, H, N, D, **opts, seed=7)
    check_packed("triton", qkv, kw, torch.float16, DEV)


@pytest.mark.parametrize("B,H,N,D,opts", CASES)
def test_packed_float64_torch_backend(B, H, N, D, opts):
    qkv, kw = make_case(B, H, N, D, **opts, seed=N)
    check_packed("torch", qkv, kw, torch.float64, "cpu")


@pytest.mark.parametrize("B,H,N,D,opts", CASES[2:4])
def test_packed_float32_cpp_backend(B, H, N, D, opts):
    # float32: the backends' dense-bias gradient accumulates in float32 (op contract)
    if cpp_unavailable_reason("cpu") is not None:
        pytest.skip(f"cpp backend unavailable: {cpp_unavailable_reason('cpu')}")
    qkv, kw = make_case(B, H, N, D, **opts, seed=N)
    check_packed("cpp", qkv, kw, torch.float32, "cpu")


@requires_triton
def test_packed_equals_unpacked_on_triton_exactly():
    """Same kernels on the same views: out and dqkv are bit-identical to
    amm_attention on the permuted views (so modules switched to the packed
    entry give the outputs they gave before)."""
    qkv, kw = make_case(2, 2, 11, 24, grid=4, table=True, amm=True, positions="batch", bias=(1, 2, 11, 11))
    x, kwd = cast(qkv, kw, torch.float32, DEV)
    out = amm_attention_qkvpacked(x, backend="triton", **kwd)
    q, k, v = x.permute(2, 0, 3, 1, 4).unbind(0)
    want = amm_attention(q, k, v, backend="triton", **kwd).transpose(1, 2)
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    dout = torch.randn_like(out)
    got = grads_of(out, x, kwd, dout)
    exp = grads_of(want, x, kwd, dout)
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


# ----------------------------------------------------------------------------- kernel contract

@requires_triton
def test_output_is_token_major_and_reshape_is_free_on_triton():
    B, N, H, D = 2, 16, 3, 16
    x = torch.randn(B, N, 3 * H * D, device=DEV)
    out = amm_attention_qkvpacked(x.view(B, N, 3, H, D), grid=4, amm=True, backend="triton")
    assert out.shape == (B, N, H, D) and out.is_contiguous()
    assert out.reshape(B, N, H * D).data_ptr() == out.data_ptr()
    assert out.reshape(B, N, H * D)._base is not None  # a view, not a copy


@requires_triton
def test_poisoned_outputs_are_all_written_on_triton(monkeypatch):
    """out and dqkv are filled with NaN before the kernels run; every element
    is written, with the reference's values."""
    from edt_kernels.ops import _attention_op

    triton_op = _triton_op()

    def poisoned_out(q):
        B, H, N, D = q.shape
        return torch.full((B, N, H, D), math.nan, device=q.device, dtype=q.dtype).transpose(1, 2)

    def poisoned_dqkv(qkv):
        return torch.full(qkv.shape, math.nan, device=qkv.device, dtype=qkv.dtype)

    monkeypatch.setattr(triton_op, "_empty_like_out", poisoned_out)
    monkeypatch.setattr(_attention_op, "_new_dqkv", poisoned_dqkv)
    qkv, kw = make_case(2, 2, 13, 20, grid=4, table=True, amm=True, positions="batch", bias=(1, 2, 13, 13))
    out, grads = check_packed("triton", qkv, kw, torch.float32, DEV)
    assert not out.isnan().any()
    assert not any(g.isnan().any() for g in grads)


class _Allocations(TorchDispatchMode):
    """Records, for every op dispatched, its name and its output tensors'
    (data_ptr, numel); holds no tensor."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = out if isinstance(out, (list, tuple)) else [out]
        self.ops.append((str(func), [(t.data_ptr(), t.numel()) for t in flat if isinstance(t, torch.Tensor)]))
        return out


def _backward_ops(out, root, qkv_view):
    """Run out's backward; return (recorded ops, data_ptr of the gradient that
    reached qkv_view)."""
    seen = []
    qkv_view.register_hook(lambda g: seen.append(g.data_ptr()))
    with _Allocations() as rec:
        out.backward(torch.ones_like(out))
    assert len(seen) == 1
    return rec.ops, seen[0]


def _new_buffers_of(ops, numel, packed_ptr):
    """Ops that produced a qkv-sized tensor not at the packed gradient's address."""
    return [name for name, outs in ops for ptr, n in outs if n == numel and ptr != packed_ptr]


@requires_triton
def test_backward_hands_autograd_its_dqkv_buffer_on_triton():
    """The packed backward op allocates the one dqkv buffer; that very buffer is
    qkv's gradient (hook and .grad), and no other op in the backward makes a
    qkv-sized tensor.  The unpacked entry on the same views does (the stack of
    dq, dk, dv): the check can tell the two apart."""
    B, N, H, D = 2, 16, 2, 16
    numel = B * N * 3 * H * D
    table = torch.randn(52, H, device=DEV)

    x = torch.randn(B, N, 3 * H * D, device=DEV, requires_grad=True)
    qkv = x.view(B, N, 3, H, D)
    out = amm_attention_qkvpacked(qkv, rel_pos_bias=table, grid=4, amm=True, backend="triton")
    ops, grad_ptr = _backward_ops(out, x, qkv)
    produced = [outs[0][0] for name, outs in ops if "qkvpacked_bwd" in name]
    assert produced == [grad_ptr]  # the op's dqkv is what autograd passed on
    assert x.grad.data_ptr() == grad_ptr  # and what the leaf keeps (a view of it)
    assert _new_buffers_of(ops, numel, grad_ptr) == []

    x2 = x.detach().clone().requires_grad_()
    qkv2 = x2.view(B, N, 3, H, D)
    q, k, v = qkv2.permute(2, 0, 3, 1, 4).unbind(0)
    out2 = amm_attention(q, k, v, rel_pos_bias=table, grid=4, amm=True, backend="triton")
    ops2, grad_ptr2 = _backward_ops(out2, x2, qkv2)
    assert [n for n in _new_buffers_of(ops2, numel, -1) if "stack" in n or "cat" in n]
    torch.testing.assert_close(x2.grad, x.grad, atol=0, rtol=0)


@requires_triton
def test_amm_attention_module_grad_is_the_packed_buffer_on_triton():
    """AMMAttention (and so the models): the qkv projection's output gradient is
    the packed backward's dqkv, with no qkv-sized copy in between."""
    B, N, C, H = 2, 16, 24, 2  # B N 3C differs from the weight's 3C C: sizes tell tensors apart
    attn = AMMAttention(C, H, qkv_bias=True, grid=4, amm=True, backend="triton")
    proj = {}

    def keep(mod, inp, out):
        proj["out"] = out
        out.register_hook(lambda g: proj.update(grad_ptr=g.data_ptr()))

    attn.qkv.register_forward_hook(keep)
    x = torch.randn(B, N, C, device=DEV)
    y = attn(x)
    with _Allocations() as rec:
        y.backward(torch.ones_like(y))
    produced = [outs[0][0] for name, outs in rec.ops if "qkvpacked_bwd" in name]
    assert produced == [proj["grad_ptr"]]
    assert _new_buffers_of(rec.ops, B * N * 3 * C, proj["grad_ptr"]) == []


def test_torch_backend_gradient_is_one_stacked_buffer():
    """cpp/torch/eager: dq, dk, dv computed apart and stacked once into a
    [B, N, 3, H, D] gradient (documented; not in place)."""
    x = torch.randn(2, 16, 3, 2, 8, dtype=torch.float64, requires_grad=True)
    out = amm_attention_qkvpacked(x, grid=4, amm=True, backend="torch")
    out.sum().backward()
    assert x.grad.shape == x.shape
    q, k, v = (t.detach().transpose(1, 2).requires_grad_() for t in x.unbind(2))
    ref = reference_attention(q, k, v, grid=4, amm=True)
    ref.sum().backward()
    want = torch.stack([g.transpose(1, 2) for g in (q.grad, k.grad, v.grad)], dim=2)
    torch.testing.assert_close(x.grad, want, atol=1e-12, rtol=1e-12)


@requires_triton
def test_strided_qkv_is_read_in_place_on_triton():
    """A qkv that is a slice of a wider buffer (non-contiguous) is read through its strides."""
    B, N, H, D = 2, 16, 2, 16
    wide = torch.randn(B, N, 3 * H * D + 8, device=DEV)
    qkv = wide[..., 8:].unflatten(-1, (3, H, D))
    assert not qkv.is_contiguous()
    out = amm_attention_qkvpacked(qkv, grid=4, amm=True, backend="triton")
    ref = reference_packed(qkv.double().cpu(), grid=4, amm=True)
    assert_close(out.cpu(), ref, torch.float32)


@requires_triton
def test_opcheck_packed_triton_ops():
    triton_op = _triton_op()
    qkv, kw = make_case(2, 2, 9, 16, grid=5, table=True, positions="batch", amm=True,
                        bias=(1, 2, 9, 9), modulation=(2, 1, 9, 9))
    x, kwd = cast(qkv, kw, torch.float32, DEV)
    from edt_kernels.attention import validate_qkvpacked

    inp = validate_qkvpacked(x, **kwd)
    args = inp.packed_kernel_args()
    torch.library.opcheck(triton_op._apply_qkvpacked.fwd_op, args)
    with torch.no_grad():
        out, lse = triton_op._apply_qkvpacked.fwd_op(*args)
    plain = [a.detach() if torch.is_tensor(a) else a for a in args]  # no double backward
    bwd_args = (torch.randn_like(out), *plain[:1], out, lse, *plain[1:], True, True)
    torch.library.opcheck(triton_op._apply_qkvpacked.bwd_op, bwd_args)


@requires_triton
def test_torch_compile_fullgraph_packed():
    qkv, kw = make_case(2, 2, 12, 16, grid=4, table=True, positions="batch", amm=True, seed=1)
    x = qkv.to(DEV, torch.float32)
    t, p = kw["rel_pos_bias"].to(DEV, torch.float32), kw["positions"].to(DEV)

    def fn(x, t, p):
        return amm_attention_qkvpacked(x, rel_pos_bias=t, grid=4, positions=p, amm=True, backend="triton")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, t, p), fn(x, t, p))


@requires_triton
def test_empty_sequence_packed():
    x = torch.randn(2, 0, 3, 2, 16, device=DEV, requires_grad=True)
    out = amm_attention_qkvpacked(x, backend="triton")
    assert out.shape == (2, 0, 2, 16)
    out.sum().backward()
    assert x.grad.shape == x.shape


# ----------------------------------------------------------------------------- validation

@pytest.mark.parametrize("make,kw,exc,match", [
    (lambda: [1.0], {}, TypeError, "qkv must be a torch.Tensor"),
    (lambda: torch.randn(2, 16, 3, 32), {}, ValueError, r"qkv must be \[B, N, 3, H, D\].*\(2, 16, 3, 32\)"),
    (lambda: torch.randn(3, 2, 2, 16, 8), {}, ValueError, r"qkv must be \[B, N, 3, H, D\]"),
    (lambda: torch.randn(2, 16, 3, 2, 8).long(), {}, TypeError, "qkv must be float16"),
    (lambda: torch.randn(1, 4, 3, 1, 300), {}, ValueError, r"head dim D = qkv.shape\[-1\]"),
    (lambda: torch.randn(2, 15, 3, 2, 8), {"rel_pos_bias": torch.randn(49, 2), "grid": 4}, ValueError,
     r"N = qkv.shape\[1\] = 15 must equal rows\*cols"),
    (lambda: torch.randn(2, 15, 3, 2, 8), {"amm": True}, ValueError, r"qkv.shape\[1\]"),
    (lambda: torch.randn(2, 16, 3, 2, 8), {"rel_pos_bias": torch.randn(40, 2)}, ValueError,
     r"rel_pos_bias must be .*>= 49, 2"),
    (lambda: torch.randn(2, 16, 3, 2, 8), {"bias": torch.randn(3, 2, 16, 16)}, ValueError,
     "bias of shape .* not broadcastable"),
    (lambda: torch.randn(2, 16, 3, 2, 8), {"scale": "0.1"}, TypeError, "scale must be a float"),
    (lambda: torch.randn(2, 16, 3, 2, 8), {"backend": "cudnn"}, ValueError, "backend must be"),
])
def test_bad_input_raises(make, kw, exc, match):
    with pytest.raises(exc, match=match):
        amm_attention_qkvpacked(make(), **kw)


@requires_triton
def test_float64_on_triton_names_other_backends():
    with pytest.raises(ValueError, match="float64.*torch"):
        amm_attention_qkvpacked(torch.randn(2, 16, 3, 2, 8, dtype=torch.float64), backend="triton")


def test_public_export():
    assert edt_kernels.amm_attention_qkvpacked is amm_attention_qkvpacked


# ----------------------------------------------------------------------------- wiring

class _Entries:
    """Counts the calls of the packed and the unpacked entry made by one module file."""

    def __init__(self, monkeypatch, module):
        self.calls = []
        for name in ("amm_attention", "amm_attention_qkvpacked"):
            real = getattr(module, name)

            def spy(*args, _real=real, _name=name, **kw):
                self.calls.append(_name)
                return _real(*args, **kw)

            monkeypatch.setattr(module, name, spy)


@pytest.mark.parametrize("kind,entry", [("timm_style", "amm_attention_qkvpacked"),
                                        ("timm_style_qk_norm", "amm_attention"),
                                        ("mdt", "amm_attention_qkvpacked"),
                                        ("edt_local", "amm_attention_qkvpacked")])
def test_patched_modules_call_the_packed_entry(kind, entry, monkeypatch):
    """patch_model: timm/MDT/EDT attention reads its fused qkv as one packed
    tensor; timm with per-head q/k norms keeps the split entry (the norms make
    new q/k tensors).  Output and gradients equal the unpatched module's."""
    import test_patch as tp
    from edt_kernels import _patch_kinds

    model = tp.make_model(kind).eval()
    x, c = tp.inputs()
    want = tp.run(model, x, c)
    tp.patch(model, kind)
    entries = _Entries(monkeypatch, _patch_kinds)
    tp.assert_same_run(tp.run(model, x, c), want)
    assert entries.calls and set(entries.calls) == {entry}


@requires_triton
def test_patched_mdt_with_ids_keep_grad_in_place_on_triton():
    """A patched MDT attention on the triton backend (masked tokens): the qkv
    projection's output gradient is the packed backward's buffer."""
    import test_patch as tp

    model = tp.make_model("mdt", depth=1).train()
    attn = model.blocks[0].attn
    tp.patch(model, "mdt", backend="triton")
    grad_ptr = {}

    def keep(mod, inp, out):  # returns None: the output is not replaced
        out.register_hook(lambda g: grad_ptr.update(p=g.data_ptr()))

    attn.qkv.register_forward_hook(keep)
    ids_keep = torch.stack([torch.randperm(tp.N, generator=torch.Generator().manual_seed(s))[:11] for s in (0, 1)])
    x = torch.randn(2, 11, tp.DIM, device=DEV)
    y = attn(x, ids_keep)
    with _Allocations() as rec:
        y.backward(torch.ones_like(y))
    assert [outs[0][0] for name, outs in rec.ops if "qkvpacked_bwd" in name] == [grad_ptr["p"]]


def test_diffusers_fused_qkv_calls_the_packed_entry(monkeypatch):
    """diffusers' fused to_qkv without q/k norms: one packed tensor; the result
    equals the stock FusedAttnProcessor2_0 (output and gradients)."""
    pytest.importorskip("diffusers", reason="diffusers is not installed (the [diffusers] extra)")
    from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0

    from edt_kernels import diffusers as edk_diffusers
    from edt_kernels import patch_model

    torch.manual_seed(0)
    attn = Attention(16, heads=2, dim_head=8, bias=True)
    attn.fuse_projections()
    attn.set_processor(FusedAttnProcessor2_0())
    x = torch.randn(2, 16, 16, requires_grad=True)
    want = attn(x)
    want_grads = torch.autograd.grad(want.square().sum(), [x] + list(attn.parameters()), allow_unused=True)
    patch_model(attn)
    entries = _Entries(monkeypatch, edk_diffusers)
    got = attn(x)
    got_grads = torch.autograd.grad(got.square().sum(), [x] + list(attn.parameters()), allow_unused=True)
    assert entries.calls == ["amm_attention_qkvpacked"]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(got_grads, want_grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
