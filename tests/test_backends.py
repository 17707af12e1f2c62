"""The backend registry shared by every op, and the ``"eager"`` backend (the
authors' published materialising code path) of ``amm_attention``."""
import pytest
import torch

import edt_kernels
from edt_kernels.amm import relative_position_index
from edt_kernels.attention import select_backend, validate_inputs
from edt_kernels.reference.attention import eager_attention, eager_rel_pos_bias, reference_attention
from tolerances import GRAD_TOL, assert_close


def _attn_inputs(B=2, H=3, grid=(4, 4), N=13, D=11, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows, cols = grid
    q, k, v = (torch.randn(B, H, N, D, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(3))
    table = torch.randn((2 * rows - 1) * (2 * cols - 1) + 3, H, generator=gen,
                        dtype=torch.float64).requires_grad_()
    positions = torch.stack([torch.randperm(rows * cols, generator=gen)[:N] for _ in range(B)])
    bias = torch.randn(1, H, N, N, generator=gen, dtype=torch.float64).requires_grad_()
    modulation = torch.rand(B, 1, N, N, generator=gen, dtype=torch.float64)
    return (q, k, v), dict(rel_pos_bias=table, grid=grid, positions=positions, amm=edt_kernels.AMM(period=7.0, radius2=9), bias=bias,
                           modulation=modulation)


def test_eager_backend_equals_reference_float64():
    (q, k, v), kw = _attn_inputs()
    out = edt_kernels.amm_attention(q, k, v, backend="eager", **kw)
    ref = reference_attention(q, k, v, **kw)
    assert_close(out, ref, torch.float64, name="eager out")
    d = torch.randn_like(out)
    leaves = [q, k, v, kw["rel_pos_bias"], kw["bias"]]
    for g, r, n in zip(torch.autograd.grad(out, leaves, d), torch.autograd.grad(ref, leaves, d),
                       ["dq", "dk", "dv", "dtable", "dbias"]):
        assert_close(g, r, torch.float64, GRAD_TOL, n)


def test_eager_full_grid_and_no_options():
    (q, k, v), kw = _attn_inputs(N=16)
    for extra in (dict(rel_pos_bias=kw["rel_pos_bias"], grid=(4, 4), amm=True), {}):
        out = edt_kernels.amm_attention(q, k, v, backend="eager", **extra)
        assert_close(out, reference_attention(q, k, v, **extra), torch.float64, name=str(sorted(extra)))


def test_eager_rel_pos_bias_is_the_table_gather():
    """The published materialised bias: [1, H, L, L], or [B, H, N, N] at positions."""
    (q, _, _), kw = _attn_inputs()
    table, grid, pos = kw["rel_pos_bias"].detach(), kw["grid"], kw["positions"]
    full = eager_rel_pos_bias(table, grid)
    assert full.shape == (1, 3, 16, 16)
    assert torch.equal(full[0], table[relative_position_index(grid)].permute(2, 0, 1))
    sub = eager_rel_pos_bias(table, grid, pos)
    assert sub.shape == (2, 3, 13, 13)
    assert torch.equal(sub, table[relative_position_index(grid, pos)].permute(0, 3, 1, 2))


def test_eager_low_precision_runs_in_input_dtype():
    """float32 q with a float32 table: the result is q's dtype and matches the
    float64 reference to float32 accuracy."""
    (q, k, v), kw = _attn_inputs()
    kw32 = dict(kw, rel_pos_bias=kw["rel_pos_bias"].detach().float(), bias=kw["bias"].detach().float(),
                modulation=kw["modulation"].float())
    out = eager_attention(q.detach().float(), k.detach().float(), v.detach().float(), **kw32)
    assert out.dtype == torch.float32
    assert_close(out, reference_attention(q, k, v, **kw), torch.float32, name="eager fp32")


def test_auto_never_picks_eager(monkeypatch, kernels_env):
    kernels_env("EDT_KERNELS_BACKEND")
    q = torch.randn(1, 2, 16, 8, dtype=torch.float64)
    inp = validate_inputs(q, q, q, grid=4, amm=True)
    assert select_backend(inp, "auto").name != "eager"
    assert select_backend(inp, "eager").name == "eager"
    kernels_env("EDT_KERNELS_BACKEND", "eager")
    assert select_backend(inp, "auto").name == "eager"
    assert "eager" in edt_kernels.available_backends()


@pytest.mark.parametrize("op", ["gather_tokens", "layernorm_modulate"])
def test_token_and_adaln_ops_take_eager(op):
    """One backend string for every op: "eager" is the PyTorch reference there."""
    x = torch.randn(2, 8, 4)
    if op == "gather_tokens":
        ids = torch.tensor([[1, 3], [0, 7]])
        out = edt_kernels.gather_tokens(x, ids, backend="eager")
        assert torch.equal(out, edt_kernels.gather_tokens(x, ids, backend="torch"))
    else:
        s = torch.randn(2, 4)
        out = edt_kernels.layernorm_modulate(x, s, s, backend="eager")
        assert torch.equal(out, edt_kernels.layernorm_modulate(x, s, s, backend="torch"))


def test_tolerance_rule_two_can_fail():
    """Rule 2 of tests/tolerances.py accepts a kernel as accurate as PyTorch in
    float16 and rejects one far worse (the check can fail)."""
    from tolerances import assert_within_torch_error

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 64, generator=gen, dtype=torch.float64)
    ref = x.softmax(-1)
    lowp = x.half().softmax(-1)
    assert_within_torch_error(lowp, lowp, ref, torch.float16, "same")
    with pytest.raises(AssertionError, match="PyTorch's own"):
        assert_within_torch_error(lowp + 0.05, lowp, ref, torch.float16, "worse")


def test_available_backends_tell_the_truth(monkeypatch):
    """No compiler, no prebuilt library, nothing loaded yet: 'cpp' is not
    offered, and asking for it says why (without trying to build)."""
    from edt_kernels import _ext, backends
    from edt_kernels.backends import OpCall

    monkeypatch.setattr(_ext, "_state", {})
    monkeypatch.setattr(_ext, "_prebuilt", lambda module: None)
    monkeypatch.setenv("CXX", "no-such-compiler-edt")
    monkeypatch.delenv("EDT_KERNELS_JIT", raising=False)
    assert "cpp" not in edt_kernels.available_backends()
    assert "cpp" not in backends.available("gather_tokens")
    assert "torch" in edt_kernels.available_backends() and "eager" in edt_kernels.available_backends()
    x = torch.randn(2, 4, 3)
    with pytest.raises(ValueError, match="no C\\+\\+ compiler found"):
        backends.select("gather_tokens", OpCall((), x=x), "cpp")
    assert _ext._state == {}  # nothing was built or loaded


def _traced_targets(fn, *args):
    """The functions in the graph torch.compile(fullgraph=True) makes of ``fn(*args)``, called once."""
    import torch._dynamo as dynamo

    targets = []

    def record(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    dynamo.reset()
    try:
        torch.compile(fn, backend=record, fullgraph=True)(*args)
    finally:
        dynamo.reset()
    return targets


def _attention_args():
    q = torch.randn(1, 2, 16, 8)
    return q, torch.randn_like(q), torch.randn_like(q), torch.randn(49, 2)


def _auto_attention(q, k, v, table):
    return edt_kernels.amm_attention(q, k, v, rel_pos_bias=table, grid=4)


def test_a_first_call_inside_torch_compile_loads_the_extension(monkeypatch):
    """Nothing loaded yet and the first call traced by torch.compile: the extension is loaded then,
    eagerly, and "auto" puts the same C++ kernel in the graph as an eager call runs (Dynamo traces
    neither the build, the lock nor the file checks: fullgraph holds)."""
    from edt_kernels import _ext

    if _ext.cpu_extension_error() is not None:
        pytest.skip(f"C++ extension unavailable: {_ext.cpu_extension_error()}")
    monkeypatch.setattr(_ext, "_state", {})
    assert any("amm_attention_cpp_fwd" in t for t in _traced_targets(_auto_attention, *_attention_args()))
    assert _ext._state == {"cpu": None}


def test_inside_torch_compile_a_missing_compiler_is_a_reason(monkeypatch):
    """The same cold start with no compiler: "auto" takes another backend and the reason is
    recorded, as an eager call does (no build was started)."""
    from edt_kernels import _ext

    monkeypatch.setattr(_ext, "_state", {})
    monkeypatch.setattr(_ext, "_prebuilt", lambda module: None)
    monkeypatch.setenv("CXX", "no-such-compiler-edt")
    monkeypatch.delenv("EDT_KERNELS_JIT", raising=False)
    targets = _traced_targets(_auto_attention, *_attention_args())
    assert targets and not any("cpp" in t for t in targets)
    assert list(_ext._state) == ["cpu"] and "no C++ compiler found" in _ext._state["cpu"]


def test_triton_import_error_is_a_reason(monkeypatch, kernels_env):
    from edt_kernels import _triton_support

    why = "triton import failed: ImportError: no module"
    monkeypatch.setattr(_triton_support, "_cached", {False: why, True: why})
    x, s = torch.randn(2, 4, 3), torch.randn(2, 3)
    with pytest.raises(ValueError, match="triton import failed: ImportError"):
        edt_kernels.layernorm_modulate(x, s, s, backend="triton")
    kernels_env("EDT_KERNELS_BACKEND")
    assert torch.equal(edt_kernels.layernorm_modulate(x, s, s), edt_kernels.layernorm_modulate(x, s, s, backend="torch"))


def test_a_batch_beyond_the_triton_grid_is_a_reason(monkeypatch, kernels_env):
    """B > 65535 does not fit the grid axis on which the Triton token/adaLN
    kernels put the batch: a reason of that backend, so that "auto" takes the
    next one and an explicit backend="triton" names it (nothing is launched)."""
    from edt_kernels import backends
    from edt_kernels.backends import OpCall

    kernels_env("EDT_KERNELS_BACKEND")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU tensors fit the triton backend but for B
    B = 65536
    x, s = torch.randn(B, 1, 2), torch.randn(B, 2)
    assert backends.select("layernorm_modulate", OpCall((), x=x[:1], shift=s[:1], scale=s[:1])).name == "triton"
    assert backends.select("layernorm_modulate", OpCall((), x=x, shift=s, scale=s)).name == "torch"
    assert torch.equal(edt_kernels.layernorm_modulate(x, s, s),
                       edt_kernels.layernorm_modulate(x, s, s, backend="torch"))
    with pytest.raises(ValueError, match=r"backend 'triton' does not support these inputs: batch B = 65536 "
                                         r"exceeds 65535.*\(supported by: .*torch"):
        edt_kernels.layernorm_modulate(x, s, s, backend="triton")


def test_unknown_backend_names_the_choices():
    x, s = torch.randn(2, 4, 3), torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"backend must be one of \['auto', 'eager', 'torch', 'triton'\]"):
        edt_kernels.layernorm_modulate(x, s, s, backend="cuda")


def test_settings_are_read_once_and_changed_through_the_api(monkeypatch):
    """The environment is read at import and by ``refresh``; ``set_backend`` changes the
    choice at run time; every change reaches calls whose choice was cached before."""
    from edt_kernels import backends

    q = torch.randn(1, 2, 16, 8, dtype=torch.float64)
    inp = validate_inputs(q, q, q, grid=4, amm=True)
    monkeypatch.delenv("EDT_KERNELS_BACKEND", raising=False)
    edt_kernels.refresh()
    default = select_backend(inp).name
    assert default != "eager"
    monkeypatch.setenv("EDT_KERNELS_BACKEND", "eager")
    assert select_backend(inp).name == default  # not re-read per call
    edt_kernels.refresh()
    assert select_backend(inp).name == "eager"
    edt_kernels.set_backend("torch")
    assert select_backend(inp).name == "torch" and backends.env_backend() == "torch"
    assert select_backend(inp, "eager").name == "eager"  # a named backend is kept
    edt_kernels.set_backend("auto")
    assert select_backend(inp).name == default
    with pytest.raises(TypeError, match="backend must be a str"):
        edt_kernels.set_backend(3)


def test_a_failed_choice_is_not_cached_and_lists_every_reason():
    """The cache keeps choices, not failures: the same unsupported input raises again,
    with every backend's reasons."""
    q = torch.randn(1, 2, 16, 8, device="meta")
    inp = validate_inputs(q, q, q)
    for _ in range(2):
        with pytest.raises(ValueError, match=r"backend 'triton' does not support these inputs: .*meta"):
            select_backend(inp, "triton")
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    for _ in range(2):
        with pytest.raises(ValueError, match=r"backend 'triton' does not support these inputs: .*float64"):
            edt_kernels.layernorm_modulate(x, x[:, 0], x[:, 0], backend="triton")
