"""edt.models: published state dicts, fixture outputs on every backend, the
kernel backends == the authors' eager path, AMM switching, masking, FLOP
counts and bad input.

Fixtures (``tests/fixtures``) were produced by the authors' code; see their README.
"""
import warnings

import pytest
import torch

import edt.models.common as common
import edt.models.edt as edt_module
import edt.models.mdt as mdt_module
import edt_kernels
from edt.models import (
    EDT,
    EDT_models,
    MDTv2,
    MDTv2_models,
    create_model,
    load_state_dict_strict,
    measured_macs,
)
from conftest import load_fixture
from tolerances import FWD_TOL, GRAD_TOL, assert_close
from helpers.model_runs import randomize_

FIXTURE_ATOL = 1e-4  # fixtures README: float32 model outputs agree to < 1e-4 max abs
# The authors' code path (materialised bias and AMM, plain-PyTorch token/adaLN work).
EAGER = common.EAGER

ALL_NAMES = sorted(EDT_models) + sorted(MDTv2_models)
PUBLISHED = ["EDT-S/2", "EDT-B/2", "EDT-XL/2", "MDTv2-S/2", "MDTv2-B/2", "MDTv2-XL/2"]

# Tiny configurations (8x8 token grid) that keep every code path of the published layouts.
TINY_EDT = dict(input_size=16, patch_size=2, in_channels=4, hidden_size=16, depth=12, num_heads=[2, 2, 2, 2, 2],
                stages_depth=[2, 2, 2, 3, 3], dims=[16, 24, 32, 24, 16], num_classes=10, size="S")
# EDT-XL layout: mid masking before block 4 of stage 0.
TINY_EDT_XL = dict(TINY_EDT, depth=11, stages_depth=[5, 1, 1, 2, 2], size="XL", amm_blocks=[8, 10])
TINY_MDT = dict(input_size=16, patch_size=2, in_channels=4, hidden_size=32, depth=6, num_heads=2,
                num_classes=10, mask_ratio=0.3, decode_layer=2)
TINY = {"EDT": (EDT, TINY_EDT), "EDT-XL": (EDT, TINY_EDT_XL), "MDTv2": (MDTv2, TINY_MDT)}


@pytest.fixture
def torch_backend(monkeypatch, kernels_env):
    """Kernel calls on their PyTorch backends: the model wiring is what is
    tested (the Triton interpreter is exercised by the *_on_triton tests)."""
    kernels_env("EDT_KERNELS_BACKEND", "torch")


def _assert_grads_close(grads_f, grads_p, rel: float, all_used: bool = True) -> None:
    """Per tensor: max |fused - plain| <= rel * max |plain| + the float32 rounding of the
    model's largest gradient (one ulp of it: the float noise that a gradient whose true value is
    exactly 0, such as a bias table seen by softmax rows alone, carries; it scales with the
    problem). ``all_used``: every parameter must get a gradient (False for MDT's unmasked
    forward, which skips the side block and mask token)."""
    assert grads_f.keys() == grads_p.keys()
    largest = max(g.abs().max().item() for g in grads_p.values() if g is not None)
    noise = torch.finfo(torch.float32).eps * largest
    for n in grads_f:
        assert (grads_f[n] is None) == (grads_p[n] is None), f"{n}: gradient on one path only"
        if grads_p[n] is None:
            assert not all_used, f"{n} got no gradient"
            continue
        scale = grads_p[n].abs().max().item()
        err = (grads_f[n] - grads_p[n]).abs().max().item()
        assert err <= rel * scale + noise, (f"{n}: max error {err:.3g} vs max |grad| {scale:.3g} "
                                            f"(float noise allowed {noise:.3g})")


def _pair(kind: str, **overrides):
    """(kernel model on backend "auto", the same weights on the eager backend)."""
    cls, config = TINY[kind]
    fused = cls(**dict(config, **overrides), backend="auto")
    randomize_(fused)
    plain = cls(**dict(config, **overrides), backend=EAGER)
    plain.load_state_dict(fused.state_dict())
    return fused, plain


def _inputs(model, batch: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, model.in_channels, model.input_size, model.input_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, model.num_classes, (batch,), generator=g)
    return x, t, y


# ----------------------------------------------------------------------------- published formats

@pytest.mark.parametrize("name", PUBLISHED)
def test_state_dict_matches_published(name):
    official = load_fixture("official_state_dicts.json")[name]
    with torch.device("meta"):
        model = create_model(name)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert list(ours) == list(official["state_dict"])  # same keys, same order
    assert ours == official["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == official["params"]
    if "amm_blocks" in official:
        assert list(model.amm_blocks) == official["amm_blocks"]


def test_no_amm_variants_share_the_state_dict():
    with torch.device("meta"):
        for size in ("S", "B", "XL"):
            a, b = create_model(f"EDT-{size}/2"), create_model(f"EDT-{size}/2_noAMM")
            assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
            assert a.amm_blocks and b.amm_blocks == ()


@pytest.mark.parametrize("backend", sorted({"auto", "torch", EAGER}))
def test_fixture_outputs(backend):
    """The authors' outputs on every backend; ``auto`` is what a CPU user gets (the C++ kernels
    when a compiler is there)."""
    fx = load_fixture("official_edt_s_tiny.pt")
    model = EDT(**fx["config"], backend=backend)
    model.load_state_dict(fx["state_dict"], strict=True)
    model.eval()
    assert list(model.amm_blocks) == fx["amm_blocks"]
    with torch.no_grad():
        out_amm = model(fx["x"], fx["t"], fx["y"])
        out_cfg = model.forward_with_cfg(fx["x_cfg"], fx["t_cfg"], fx["y_cfg"], fx["cfg_scale"])
        model.set_amm(False)
        out_no_amm = model(fx["x"], fx["t"], fx["y"])
    torch.testing.assert_close(out_amm, fx["out_amm_eval"], atol=FIXTURE_ATOL, rtol=0)
    torch.testing.assert_close(out_cfg, fx["out_cfg_amm_eval"], atol=FIXTURE_ATOL, rtol=0)
    torch.testing.assert_close(out_no_amm, fx["out_no_amm_eval"], atol=FIXTURE_ATOL, rtol=0)
    # AMM changes the output more than the tolerance: the comparison above can fail.
    assert (fx["out_amm_eval"] - fx["out_no_amm_eval"]).abs().max() > 10 * FIXTURE_ATOL


@pytest.mark.slow
def test_fixture_outputs_on_triton():
    """The published forward (AMM on, then off for the first sample) on the
    Triton kernels (the interpreter on CPU): the same golden outputs."""
    from edt_kernels import available_backends

    if "triton" not in available_backends():
        pytest.skip("triton backend not available (triton not importable)")
    fx = load_fixture("official_edt_s_tiny.pt")
    model = EDT(**fx["config"], backend="triton")
    model.load_state_dict(fx["state_dict"], strict=True)
    model.eval()
    with torch.no_grad():
        out_amm = model(fx["x"], fx["t"], fx["y"])
        model.set_amm(False)
        out_no_amm = model(fx["x"][:1], fx["t"][:1], fx["y"][:1])  # eval: samples are independent
    torch.testing.assert_close(out_amm, fx["out_amm_eval"], atol=FIXTURE_ATOL, rtol=0)
    torch.testing.assert_close(out_no_amm, fx["out_no_amm_eval"][:1], atol=FIXTURE_ATOL, rtol=0)


def test_fixture_local_false_is_no_amm(torch_backend):
    fx = load_fixture("official_edt_s_tiny.pt")
    model = EDT(**fx["config"], local=False).eval()
    model.load_state_dict(fx["state_dict"], strict=True)
    with torch.no_grad():
        out = model(fx["x"], fx["t"], fx["y"])
    torch.testing.assert_close(out, fx["out_no_amm_eval"], atol=FIXTURE_ATOL, rtol=0)


# ----------------------------------------------------------------------------- FLOPs

def test_flops_match_authors_counter():
    official = load_fixture("official_state_dicts.json")
    with torch.device("meta"):
        for name in ("EDT-S/2", "EDT-B/2", "EDT-XL/2"):
            assert create_model(name).get_flops() == official[name]["official_get_flops"], name
    fx = load_fixture("official_edt_s_tiny.pt")
    assert EDT(**fx["config"]).get_flops() == fx["gflops_official"]


@pytest.mark.parametrize("kind", ["EDT", "MDTv2"])
def test_flops_equal_measured_matmul_macs(kind):
    cls, config = TINY[kind]
    model = cls(**config)
    assert model.get_flops() == measured_macs(model)


def test_mdt_flops_without_skip_projections_match_paper():
    # The papers' MDTv2 column (~6.06 / 23.0 / 118.6 GFLOPs) leaves out the long-skip projections.
    with torch.device("meta"):
        got = {n: create_model(n).get_flops(include_skip=False) / 1e9 for n in ("MDTv2-S/2", "MDTv2-B/2", "MDTv2-XL/2")}
    assert got["MDTv2-S/2"] == pytest.approx(6.06, abs=0.01)
    assert got["MDTv2-B/2"] == pytest.approx(23.0, abs=0.05)
    assert got["MDTv2-XL/2"] == pytest.approx(118.6, abs=0.1)


# ----------------------------------------------------------------------------- kernels == eager

def _run(model, inputs, enable_mask, seed, grad_weight=None):
    g = torch.Generator().manual_seed(seed)
    out = model(*inputs, enable_mask=enable_mask, generator=g)
    if grad_weight is None:
        return out, None
    model.zero_grad(set_to_none=True)
    (out * grad_weight).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return out, grads


@pytest.mark.parametrize("enable_mask", [False, True], ids=["full", "masked"])
@pytest.mark.parametrize("kind", ["EDT", "EDT-XL", "MDTv2"])
def test_kernels_equal_eager_training(kind, enable_mask, torch_backend):
    fused, plain = _pair(kind)
    fused.train()
    plain.train()
    inputs = _inputs(fused)
    w = torch.randn(inputs[0].shape[0], fused.out_channels, fused.input_size, fused.input_size,
                    generator=torch.Generator().manual_seed(7))
    out_f, grads_f = _run(fused, inputs, enable_mask, seed=3, grad_weight=w)
    out_p, grads_p = _run(plain, inputs, enable_mask, seed=3, grad_weight=w)
    assert_close(out_f, out_p, torch.float32, FWD_TOL, name="output")
    _assert_grads_close(grads_f, grads_p, rel=1e-5, all_used=enable_mask or kind != "MDTv2")


def test_batched_modulation_gradients_and_what_it_keeps():
    """The batched modulation linear: float64 gradients of input, weights and biases (gradcheck), and
    its backward keeps the input and the parameters themselves, no concatenated copy."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    weights = [torch.randn(k, 5, dtype=torch.float64, generator=g, requires_grad=True) for k in (4, 6, 2)]
    biases = [torch.randn(k, dtype=torch.float64, generator=g, requires_grad=True) for k in (4, 6, 2)]
    assert torch.autograd.gradcheck(lambda x, *p: common._ConcatLinear.apply(x, 3, *p), (x, *weights, *biases))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = common._ConcatLinear.apply(x, 3, *weights, *biases)
    want = x @ torch.cat(weights).t() + torch.cat(biases)
    assert torch.allclose(out, want) and out.shape == (3, 12)
    assert len(saved) == 4 and all(any(t is s for s in saved) for t in (x, *weights))


@pytest.mark.parametrize("kind", ["EDT", "EDT-XL", "MDTv2"])
def test_kernels_equal_eager_eval_with_amm(kind, torch_backend):
    fused, plain = _pair(kind, **({"amm_blocks": [1, 4]} if kind == "MDTv2" else {}))
    fused.eval()
    plain.eval()
    assert fused.amm_blocks
    inputs = _inputs(fused)
    with torch.no_grad():
        assert_close(fused(*inputs), plain(*inputs), torch.float32, FWD_TOL, name="eval+amm")
        x = torch.cat([inputs[0], inputs[0]])
        t = torch.cat([inputs[1], inputs[1]])
        y = torch.cat([inputs[2], torch.full_like(inputs[2], fused.num_classes)])
        assert_close(fused.forward_with_cfg(x, t, y, 3.0), plain.forward_with_cfg(x, t, y, 3.0),
                     torch.float32, FWD_TOL, name="cfg")


# Smallest layouts that still run every kernel: 4x4 token grid, one block per stage
# (five in EDT's stage 0 for the mid masking).
TRITON_CASES = {
    "EDT": dict(input_size=8, depth=9, stages_depth=[5, 1, 1, 1, 1], mid_mask=True, size=None, amm_blocks=[7, 8]),
    "MDTv2": dict(input_size=8, depth=4, decode_layer=2, amm_blocks=[0, 3]),
}


@pytest.mark.parametrize("kind", sorted(TRITON_CASES))
def test_kernels_equal_eager_on_triton(kind, monkeypatch):
    """Every kernel of the fused path on its Triton backend (the interpreter on
    CPU): masked training forward + backward, then eval with AMM."""
    from edt_kernels import available_backends

    if "triton" not in available_backends():
        pytest.skip("triton backend not available (triton not importable)")
    fused, plain = _pair(kind, **TRITON_CASES[kind])
    fused.backend = "triton"
    fused.train()
    plain.train()
    inputs = _inputs(fused, batch=2)
    w = torch.randn(2, fused.out_channels, fused.input_size, fused.input_size,
                    generator=torch.Generator().manual_seed(7))
    out_f, grads_f = _run(fused, inputs, True, seed=3, grad_weight=w)
    out_p, grads_p = _run(plain, inputs, True, seed=3, grad_weight=w)
    assert_close(out_f, out_p, torch.float32, GRAD_TOL, name="masked output")
    _assert_grads_close(grads_f, grads_p, rel=1e-4)
    fused.eval()
    plain.eval()
    with torch.no_grad():
        assert_close(fused(*inputs), plain(*inputs), torch.float32, GRAD_TOL, name="eval+amm output")


class _CallLog:
    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, *args, **kwargs):
        self.calls.append(kwargs)
        return self.fn(*args, **kwargs)


def test_attention_gets_positions_and_the_model_backend(monkeypatch, torch_backend):
    log = _CallLog(edt_kernels.nn.amm_attention_qkvpacked)
    monkeypatch.setattr(edt_kernels.nn, "amm_attention_qkvpacked", log)
    fused, plain = _pair("MDTv2")
    fused.train()
    plain.train()
    inputs = _inputs(fused)
    _run(plain, inputs, True, seed=0)
    assert log.calls and all(c["backend"] == EAGER for c in log.calls)  # the eager path: eager attention
    log.calls.clear()
    _run(fused, inputs, True, seed=0)
    assert all(c["backend"] == "auto" for c in log.calls)
    n_encoder = len(fused.en_inblocks) + len(fused.en_outblocks)
    with_positions = [c for c in log.calls if c["positions"] is not None]
    assert len(with_positions) == n_encoder
    assert all(c["amm"] is None for c in log.calls)  # training: no AMM
    assert with_positions[0]["positions"].shape[1] < fused.grid ** 2


# Every edt_kernels op a model calls, with the module that imports it.
MODEL_OPS = {
    "layernorm_modulate": (common, edt_module), "gated_residual": (common,),
    "patch_merge_modulate": (edt_module,), "masked_shortcut": (edt_module, mdt_module),
    "random_masking": (mdt_module,), "unshuffle_with_mask_token": (mdt_module,),
}


@pytest.mark.parametrize("backend", ["auto", EAGER])
def test_every_op_gets_the_model_backend(backend, monkeypatch, torch_backend):
    logs = {}
    for name, modules in MODEL_OPS.items():
        logs[name] = _CallLog(getattr(edt_kernels, name))
        for mod in modules:
            monkeypatch.setattr(mod, name, logs[name])
    logs["amm_attention"] = _CallLog(edt_kernels.nn.amm_attention_qkvpacked)
    monkeypatch.setattr(edt_kernels.nn, "amm_attention_qkvpacked", logs["amm_attention"])
    for kind in ("EDT-XL", "MDTv2"):
        model = TINY[kind][0](**TINY[kind][1], backend=backend).train()
        _run(model, _inputs(model), True, seed=0)
    for name, log in logs.items():
        assert log.calls, f"{name} was never called"
        assert all(c["backend"] == backend for c in log.calls), name


def test_token_ops_agree_across_backends():
    """The token/adaLN ops the models call: the eager backend equals the
    Triton kernels (interpreter on CPU), and the fused patch merge with a
    sub-token keep mask equals the published slicing of EDT's DownSample."""
    from edt_kernels import available_backends

    if "triton" not in available_backends():
        pytest.skip("triton backend not available (triton not importable)")
    g = torch.Generator().manual_seed(0)
    B, n, C = 2, 4, 8
    L = n * n
    x = torch.randn(B, L, C, generator=g)
    shift, scale, gate = (torch.randn(B, C, generator=g) for _ in range(3))
    shift4, scale4 = torch.randn(B, 4 * C, generator=g), torch.randn(B, 4 * C, generator=g)
    keep = torch.rand(B, L, generator=g) >= 0.4
    ids_restore = torch.stack([torch.randperm(L, generator=g) for _ in range(B)])
    ids_keep = torch.argsort(ids_restore, dim=1)[:, :10]
    mask_token, pos = torch.randn(1, 1, C, generator=g), torch.randn(1, L, C, generator=g)
    cases = {
        "layernorm_modulate": ((x, shift, scale), {}),
        "gated_residual": ((x, gate, x.flip(1)), {}),
        "gather_tokens": ((x, ids_keep), {}),
        "unshuffle_with_mask_token": ((x[:, :10], ids_restore, mask_token, pos), {}),
        "masked_shortcut": ((x, x.flip(1), keep.float()), {}),
        "patch_merge_modulate": ((x, shift4, scale4, keep), {"grid": n}),
    }
    for name, (args, kw) in cases.items():
        op = getattr(edt_kernels, name)
        assert_close(op(*args, **kw, backend=EAGER), op(*args, **kw, backend="triton"), torch.float32, FWD_TOL,
                     name=name)

    def merge(t):  # the published DownSample slicing: (B, n*n, C) -> (B, n/2*n/2, 4C)
        t = t.view(B, n, n, -1)
        parts = [t[:, 0::2, 0::2], t[:, 1::2, 0::2], t[:, 0::2, 1::2], t[:, 1::2, 1::2]]
        return torch.cat(parts, -1).view(B, L // 4, -1)

    mask = keep.float().unsqueeze(-1).expand(B, L, C)
    eager = common.modulate(torch.nn.functional.layer_norm(merge(x), (4 * C,), eps=1e-6), shift4, scale4) * merge(mask)
    for backend in (EAGER, "triton"):
        assert_close(edt_kernels.patch_merge_modulate(x, shift4, scale4, keep, grid=n, backend=backend), eager,
                     torch.float32, FWD_TOL, name=f"merge vs published slicing ({backend})")
    ratio = torch.tensor([0.37])
    out_e = edt_kernels.random_masking(x, ratio, torch.Generator().manual_seed(1), backend=EAGER)
    out_k = edt_kernels.random_masking(x, ratio, torch.Generator().manual_seed(1), backend="triton")
    for a, b in zip(out_e, out_k):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


# ----------------------------------------------------------------------------- backend=

@pytest.mark.parametrize("cls", [EDT, MDTv2])
def test_backend_argument(cls):
    config = TINY[cls.__name__][1]
    model = cls(**config, backend=EAGER)
    assert model.backend == EAGER and model.config["backend"] == EAGER
    assert all(m.backend == EAGER for m in model.modules() if hasattr(m, "backend"))
    with pytest.raises(TypeError, match="backend must be a str"):
        cls(**config, backend=True)
    with pytest.raises(TypeError, match="backend must be a str"):
        model.backend = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cls(**config)  # the default raises no warning


def test_backend_setter_reaches_every_module():
    model = EDT(**TINY_EDT)
    model.backend = "torch"
    owners = [m for m in model.modules() if hasattr(m, "backend")]
    assert len(owners) > len(model.blocks) and all(m.backend == "torch" for m in owners)
    assert all(blk.attn.backend == "torch" for blk in model.blocks)
    rebuilt = EDT(**model.config)
    assert rebuilt.backend == "auto"  # config records the constructor arguments


# ----------------------------------------------------------------------------- AMM switching, masking

def test_amm_only_in_eval_and_switchable(torch_backend):
    model, _ = _pair("EDT")
    inputs = _inputs(model)
    model.eval()
    with torch.no_grad():
        on = model(*inputs)
        previous = model.set_amm(False)
        off = model(*inputs)
        assert previous == (7, 10) and model.amm_blocks == ()
        model.set_amm(True, blocks=[8])
        other = model(*inputs)
        assert model.amm_blocks == (8,)
        model.set_amm(True)
        assert model.amm_blocks == (7, 10)
        torch.testing.assert_close(model(*inputs), on, atol=0, rtol=0)
    assert (on - off).abs().max() > 1e-3 and (other - off).abs().max() > 1e-3
    model.train()
    with torch.no_grad():
        train_on = model(*inputs, generator=torch.Generator().manual_seed(0))
        model.set_amm(False)
        train_off = model(*inputs, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(train_on, train_off, atol=0, rtol=0)
    with pytest.raises(ValueError, match="out of range"):
        model.set_amm(True, blocks=[12])


@pytest.mark.parametrize("kind", ["EDT", "EDT-XL", "MDTv2"])
def test_masking_is_seeded_and_changes_output(kind, torch_backend):
    model, _ = _pair(kind)
    model.train()
    model.y_embedder.dropout_prob = 0.0
    inputs = _inputs(model)
    with torch.no_grad():
        a = model(*inputs, enable_mask=True, generator=torch.Generator().manual_seed(5))
        b = model(*inputs, enable_mask=True, generator=torch.Generator().manual_seed(5))
        c = model(*inputs, enable_mask=True, generator=torch.Generator().manual_seed(6))
        full = model(*inputs)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert (a - c).abs().max() > 1e-4
    assert (a - full).abs().max() > 1e-4


class _MaskingLog:
    """random_masking as the model calls it, its outputs kept."""

    def __init__(self):
        self.outputs = []

    def __call__(self, *args, **kwargs):
        out = edt_kernels.random_masking(*args, **kwargs)
        self.outputs.append(out)
        return out


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mdt_sort_kept_same_output_and_mask(backend, monkeypatch, kernels_env):
    """sort_kept=True (kept tokens in grid order) vs False (the draw's order):
    same mask from the same draws, the attention gets the sorted positions,
    and the output and every gradient agree up to float summation order
    (float64 on the PyTorch backends; float32 through the Triton kernels)."""
    from edt_kernels import available_backends

    if backend == "triton":
        if "triton" not in available_backends():
            pytest.skip("triton backend not available (triton not importable)")
        config, dtype = dict(TINY_MDT, **TRITON_CASES["MDTv2"]), torch.float32
    else:
        kernels_env("EDT_KERNELS_BACKEND", "torch")
        config, dtype = TINY_MDT, torch.float64
    log = _MaskingLog()
    monkeypatch.setattr(mdt_module, "random_masking", log)
    attn_log = _CallLog(edt_kernels.nn.amm_attention_qkvpacked)
    monkeypatch.setattr(edt_kernels.nn, "amm_attention_qkvpacked", attn_log)
    models = {}
    for sort in (True, False):
        models[sort] = MDTv2(**config, sort_kept=sort, backend="auto").to(dtype).train()
        assert models[sort].config["sort_kept"] is sort
        if backend == "triton":
            models[sort].backend = "triton"
    randomize_(models[True])
    models[False].load_state_dict(models[True].state_dict())
    x, t, y = _inputs(models[True], batch=2 if backend == "triton" else 3)
    x = x.to(dtype)
    w = torch.randn(x.shape[0], models[True].out_channels, *x.shape[2:], generator=torch.Generator().manual_seed(7),
                    dtype=dtype)
    runs = {}
    for sort in (True, False):
        attn_log.calls.clear()
        runs[sort] = _run(models[sort], (x, t, y), True, seed=3, grad_weight=w)
        positions = [c["positions"] for c in attn_log.calls if c["positions"] is not None]
        assert positions and all(torch.equal(p, log.outputs[-1][3]) for p in positions)
    (_, mask_s, restore_s, keep_s), (_, mask_u, restore_u, keep_u) = log.outputs
    assert torch.equal(mask_s, mask_u)
    assert torch.equal(keep_s, keep_u.sort(dim=1).values)
    assert not torch.equal(keep_u, keep_s)  # the draw's order is not already sorted here
    assert torch.equal(torch.gather(restore_s, 1, keep_s), torch.arange(keep_s.shape[1]).expand_as(keep_s))
    (out_s, grads_s), (out_u, grads_u) = runs[True], runs[False]
    assert_close(out_s, out_u, dtype, FWD_TOL, name="output")
    if dtype == torch.float64:
        for n in grads_u:
            assert_close(grads_s[n], grads_u[n], dtype, GRAD_TOL, name=n)
    else:
        _assert_grads_close(grads_s, grads_u, rel=1e-4)


def test_mdt_sort_kept_must_be_bool():
    with pytest.raises(TypeError, match="sort_kept must be a bool"):
        MDTv2(**TINY_MDT, sort_kept=1)


def test_edt_mid_mask_only_for_xl_layout():
    xl, _ = _pair("EDT-XL")
    s, _ = _pair("EDT")
    assert xl.mid_mask and not s.mid_mask
    with pytest.raises(ValueError, match="mid_mask"):
        EDT(**dict(TINY_EDT, mid_mask=True))


def test_mdt_masked_ratio_and_cfg_schedule(torch_backend):
    model, _ = _pair("MDTv2")
    inputs = _inputs(model, batch=2)
    model.eval()
    with torch.no_grad():
        x = torch.cat([inputs[0], inputs[0]])
        t = torch.tensor([100, 900, 100, 900])
        y = torch.cat([inputs[2], torch.full_like(inputs[2], model.num_classes)])
        raw = model(x, t, y)
        out = model.forward_with_cfg(x, t, y, cfg_scale=4.0)
    # MDT's power-cosine guidance schedule
    s = 3.0 * (1 - torch.cos(((1 - t[:2] / 1000.0) ** 4) * torch.pi)) / 2 + 1
    cond, uncond = raw[:2, :3], raw[2:, :3]
    expected = uncond + s.view(-1, 1, 1, 1) * (cond - uncond)
    torch.testing.assert_close(out[:2, :3], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[2:, :3], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, 3:], raw[:, 3:], atol=0, rtol=0)


# ----------------------------------------------------------------------------- bad input

def test_unknown_model_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        create_model("EDT-M/2")
    for name in ALL_NAMES:
        assert name in str(err.value)


def test_strict_checkpoint_loading_names_the_keys():
    model = EDT(**TINY_EDT)
    good = model.state_dict()
    bad = dict(good)
    del bad["blocks.3.attn.qkv.weight"]
    bad["blocks.99.mlp.fc1.weight"] = torch.zeros(1)
    bad["final_layer.linear.bias"] = torch.zeros(7)
    with pytest.raises(ValueError) as err:
        load_state_dict_strict(model, {"ema": bad})
    msg = str(err.value)
    assert "blocks.3.attn.qkv.weight" in msg and "blocks.99.mlp.fc1.weight" in msg
    assert "final_layer.linear.bias" in msg
    with pytest.raises(RuntimeError, match="blocks.3.attn.qkv.weight"):
        model.load_state_dict(bad, strict=True)
    load_state_dict_strict(model, {"model": good, "opt": {}})  # the training-checkpoint layout loads


def test_bad_configurations(torch_backend):
    with pytest.raises(ValueError, match="sum"):
        EDT(**dict(TINY_EDT, depth=11))
    with pytest.raises(ValueError, match="symmetric"):
        EDT(**dict(TINY_EDT, dims=[16, 24, 32, 28, 16]))
    with pytest.raises(ValueError, match="mask_ratio"):
        MDTv2(**dict(TINY_MDT, mask_ratio=None))(*_inputs(EDT(**TINY_EDT)), enable_mask=True)
    with pytest.raises(ValueError, match=r"\[B, C, 16, 16\]"):
        EDT(**TINY_EDT)(torch.zeros(1, 4, 12, 12), torch.zeros(1), torch.zeros(1, dtype=torch.long))
