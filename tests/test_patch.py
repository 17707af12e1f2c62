"""patch_model / unpatch_model / apply_amm on DiT-, MDT- and EDT-style models.

The MDT and EDT attention classes below are small stand-ins written from the
published formulas (BEiT/Swin relative-position bias, EDT's AMM) and the
published state_dict names (``attn.qkv``, ``attn.proj``,
``attn.rel_pos_bias.relative_position_bias_table``; MDT also stores
``relative_position_index``): same attributes, same forward semantics
(MDT: ``forward(x, ids_keep)`` gathers the bias at ``ids_keep``; EDT:
``local`` AMM applied after the softmax in eval mode only).
``TimmStyleAttention`` mirrors timm's ``Attention`` (non-fused path) for
machines without timm; the tests marked ``timm`` use the real class and are
skipped, saying so, when timm cannot be imported.

Everything is float32 on the CPU with the ``amm_attention`` backend picked by
"auto"; patched and unpatched forwards must agree to < 1e-5.
"""
import functools
import math
import os
import types

import pytest
import torch
from torch import nn

import edt_kernels
from edt_kernels import AMM, AMM_PRESETS, apply_amm, patch_model, unpatch_model
from edt_kernels.amm import KEEP
from edt_kernels.patch import PatchReport, UnsupportedModuleError, is_patched

from conftest import load_fixture
from helpers import model_runs
from helpers.model_runs import run

TIMM_WHEEL_DIR = os.environ.get("EDT_TIMM_WHEEL_DIR",
                                os.path.join(os.path.expanduser("~"), ".cache", "edt_kernels", "wheels"))


def _timm_attention_from_wheel():
    """timm's own ``Attention`` class, executed from the source in its wheel.

    ``import timm`` needs a torchvision built for the installed torch, which a
    CPU-only CI machine cannot get; ``Attention`` itself needs only torch.  CI
    downloads the wheel (``.ci/extra_test_deps.sh``: ``pip download --no-deps
    timm``) and this runs ``timm/layers/attention.py`` as the module
    ``timm.layers.attention``, with its three helper imports stubbed: an
    identity ``register_notrace_function``, ``use_fused_attn() -> True``
    (timm's default on torch 2) and the rotary helper, which ``Attention``
    does not use.  The stub modules are removed again after loading."""
    import glob
    import sys
    import types
    import zipfile

    wheels = sorted(glob.glob(os.path.join(TIMM_WHEEL_DIR, "timm-*.whl")))
    if not wheels:
        raise ImportError(f"no timm wheel in {TIMM_WHEEL_DIR}")
    src = zipfile.ZipFile(wheels[-1]).read("timm/layers/attention.py").decode()
    stubs = {
        "timm": types.ModuleType("timm"),
        "timm.layers": types.ModuleType("timm.layers"),
        "timm.layers._fx": types.ModuleType("timm.layers._fx"),
        "timm.layers.config": types.ModuleType("timm.layers.config"),
        "timm.layers.pos_embed_sincos": types.ModuleType("timm.layers.pos_embed_sincos"),
    }
    stubs["timm"].__path__ = []
    stubs["timm.layers"].__path__ = []
    stubs["timm.layers._fx"].register_notrace_function = lambda fn: fn
    stubs["timm.layers.config"].use_fused_attn = lambda *args, **kwargs: True
    stubs["timm.layers.pos_embed_sincos"].apply_rot_embed_cat = None
    module = types.ModuleType("timm.layers.attention")
    module.__package__ = "timm.layers"
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    try:
        exec(compile(src, f"{wheels[-1]}/timm/layers/attention.py", "exec"), module.__dict__)
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
    return module.Attention, os.path.basename(wheels[-1])


try:  # timm is optional (it needs a torchvision matching the installed torch)
    from timm.models.vision_transformer import Attention as TimmAttention

    _TIMM_ERROR = None
    TIMM_SOURCE = "installed timm"
except Exception as exc:  # ImportError, or torchvision failing to load its ops
    try:
        TimmAttention, TIMM_SOURCE = _timm_attention_from_wheel()
        _TIMM_ERROR = None
    except Exception as exc2:  # noqa: BLE001
        TimmAttention, TIMM_SOURCE = None, None
        _TIMM_ERROR = f"{type(exc).__name__}: {exc}; from a wheel: {type(exc2).__name__}: {exc2}"

needs_timm = pytest.mark.skipif(TimmAttention is None,
                                reason=f"timm's Attention is not importable here ({_TIMM_ERROR})")

ATOL = 1e-5  # float32, patched vs unpatched (outputs and gradients)
DIM, HEADS, GRID = 32, 2, 4  # head dim 16, N = 16 tokens
N = GRID * GRID


# ----------------------------------------------------------------------------- stand-ins

def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimmStyleAttention(nn.Module):
    """timm ``Attention`` semantics (qkv -> per-head softmax attention -> proj)."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_norm=False, attn_drop=0.0,
                 proj_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x, attn_mask=None):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if attn_mask is not None:
            attn = attn + (torch.zeros_like(attn).masked_fill(~attn_mask, float("-inf"))
                           if attn_mask.dtype == torch.bool else attn_mask)
        attn = self.attn_drop(attn.softmax(-1))
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(self.norm(x)))


def published_index(n):
    """BEiT/Swin relative_position_index for an n x n grid, written out:
    (r_i - r_j + n - 1) * (2n - 1) + (c_i - c_j + n - 1)."""
    idx = torch.empty(n * n, n * n, dtype=torch.long)
    for i in range(n * n):
        for j in range(n * n):
            idx[i, j] = (i // n - j // n + n - 1) * (2 * n - 1) + (i % n - j % n + n - 1)
    return idx


def published_amm(n, dtype=torch.float32):
    """The published dense AMM 0.5 exp(cos(2 pi d / (4 (n-1) sqrt 2))), zero below its
    value at token 3n-1 (EDT's float cut-off); float32 as the published buffer, or ``dtype``."""
    r = torch.arange(n * n) // n
    c = torch.arange(n * n) % n
    d = ((r[:, None] - r[None]) ** 2 + (c[:, None] - c[None]) ** 2).double().sqrt()
    m = 0.5 * torch.exp(torch.cos(2 * math.pi / (4 * (n - 1) * math.sqrt(2)) * d))
    return torch.where(m < m[0, 3 * n - 1], torch.zeros_like(m), m).to(dtype)


class MDTRelativePositionBias(nn.Module):
    def __init__(self, window_size, num_heads):
        super().__init__()
        self.window_size = window_size
        self.relative_position_bias_table = nn.Parameter(
            torch.randn((2 * window_size[0] - 1) * (2 * window_size[1] - 1) + 3, num_heads))
        self.register_buffer("relative_position_index", published_index(window_size[0]))

    def forward(self):
        n = self.window_size[0] * self.window_size[1]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1).contiguous()


class MDTAttention(nn.Module):
    """MDT/MDTv2 attention: relative-position bias gathered at ``ids_keep``."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0.0,
                 proj_drop=0.0, num_patches=None):
        super().__init__()
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        side = int(num_patches ** 0.5)
        self.rel_pos_bias = MDTRelativePositionBias([side, side], num_heads)

    def get_masked_rel_bias(self, B, ids_keep):
        bias = self.rel_pos_bias().unsqueeze(0).repeat(B, 1, 1, 1)  # (B, H, L, L)
        H, L = bias.shape[1], bias.shape[-1]
        K = ids_keep.shape[1]
        bias = torch.gather(bias, 2, ids_keep[:, None, :, None].expand(B, H, K, L))
        return torch.gather(bias, 3, ids_keep[:, None, None, :].expand(B, H, K, K))

    def forward(self, x, ids_keep=None):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn + (self.get_masked_rel_bias(B, ids_keep) if ids_keep is not None else self.rel_pos_bias())
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class EDTRelativePositionBias(nn.Module):
    def __init__(self, window_size, num_heads):
        super().__init__()
        self.window_size = window_size
        self.num_heads = num_heads
        self.relative_position_bias_table = nn.Parameter(
            torch.randn((2 * window_size[0] - 1) * (2 * window_size[1] - 1), num_heads))
        self.relative_position_index = published_index(window_size[0])  # not a buffer (as published)

    def forward(self):
        n = self.window_size[0] * self.window_size[1]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1).contiguous()


class EDTAttentionBlock(nn.Module):
    """EDT attention: bias table, AMM after the softmax when ``local`` and in eval mode."""

    def __init__(self, dim, input_resolution, num_heads, qkv_bias=True, qk_scale=None,
                 attn_drop=0.0, proj_drop=0.0, local=False):
        super().__init__()
        self.dim = dim
        self.input_resolution = input_resolution
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.local = local
        if local:
            self.modulation_matrix = published_amm(input_resolution)[None, None]
        self.rel_pos_bias = EDTRelativePositionBias([input_resolution] * 2, num_heads)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x, mask=None):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = (q * self.scale) @ k.transpose(-2, -1) + self.rel_pos_bias().unsqueeze(0)
        attn = self.softmax(attn)
        if self.local and not self.training:
            attn = attn * self.modulation_matrix.to(attn.device)
        attn = self.attn_drop(attn)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class Block(nn.Module):
    """adaLN-Zero DiT block around any attention ``attn(x, **kw)``."""

    def __init__(self, dim, attn):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = attn
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(approximate="tanh"), nn.Linear(2 * dim, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))  # random, not zero:
        # with DiT's zero init the attention would not reach the output and the tests could not fail.

    def forward(self, x, c, **kw):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), **kw)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class TinyModel(nn.Module):
    """``blocks`` of adaLN blocks (a DiT without the embedders) and a linear head."""

    def __init__(self, make_attn, depth=2, dim=DIM):
        super().__init__()
        self.blocks = nn.ModuleList([Block(dim, make_attn()) for _ in range(depth)])
        self.head = nn.Linear(dim, dim)

    def forward(self, x, c, **kw):
        for block in self.blocks:
            x = block(x, c, **kw)  # (B, N, C)
        return self.head(x)


def make_model(kind, depth=2, seed=0):
    torch.manual_seed(seed)
    makers = {
        "timm_style": lambda: TimmStyleAttention(DIM, num_heads=HEADS, qkv_bias=True),
        "timm_style_qk_norm": lambda: TimmStyleAttention(DIM, num_heads=HEADS, qkv_bias=True, qk_norm=True),
        "timm": lambda: TimmAttention(DIM, num_heads=HEADS, qkv_bias=True),
        "mdt": lambda: MDTAttention(DIM, num_heads=HEADS, qkv_bias=True, num_patches=N),
        "edt": lambda: EDTAttentionBlock(DIM, GRID, HEADS, local=False),
        "edt_local": lambda: EDTAttentionBlock(DIM, GRID, HEADS, local=True),
    }
    return TinyModel(makers[kind], depth=depth)


def patch(model, kind, **kw):
    if kind.startswith("timm_style"):  # not timm's own class: declare what it computes
        kw.setdefault("targets", {TimmStyleAttention: "timm"})
    return patch_model(model, **kw)


def inputs(seed=1, n=N, batch=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, n, DIM, generator=g), torch.randn(batch, DIM, generator=g)


assert_same_run = functools.partial(model_runs.assert_same_run, atol=ATOL)


def attention_modules(model):
    return [b.attn for b in model.blocks]


KINDS = ["timm_style", "timm_style_qk_norm", pytest.param("timm", marks=needs_timm), "mdt", "edt", "edt_local"]
KIND_OF = {"timm_style": "timm", "timm_style_qk_norm": "timm", "timm": "timm", "mdt": "mdt", "edt": "edt",
           "edt_local": "edt"}


# ----------------------------------------------------------------------------- equivalence

@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("kind", KINDS)
def test_patched_matches_original(kind, mode):
    model = make_model(kind)
    model.train(mode == "train")
    x, c = inputs()
    want = run(model, x, c)
    report = patch(model, kind)
    assert [p.kind for p in report] == [KIND_OF[kind]] * 2
    assert all(is_patched(a) for a in attention_modules(model))
    got = run(model, x, c)
    assert_same_run(got, want)


def test_mdt_ids_keep_matches_original():
    model = make_model("mdt")
    g = torch.Generator().manual_seed(3)
    keep = 11  # masked training: 11 of 16 tokens, different per sample
    ids_keep = torch.stack([torch.randperm(N, generator=g)[:keep] for _ in range(2)])
    x, c = inputs(n=keep)
    want = run(model, x, c, ids_keep=ids_keep)
    patch_model(model)
    got = run(model, x, c, ids_keep=ids_keep)
    assert_same_run(got, want)


def test_edt_nonpublished_modulation_matrix_is_kept():
    model = make_model("edt_local").eval()
    for attn in attention_modules(model):
        attn.modulation_matrix = attn.modulation_matrix * 1.5 + 0.1
    x, c = inputs()
    want = run(model, x, c)
    patch_model(model)
    assert all(a._edt_kernels_patch.native_modulation is not None for a in attention_modules(model))
    assert_same_run(run(model, x, c), want)


def test_amm_actually_changes_edt_eval_output():
    # guards the eval-mode equivalence above against an AMM that does nothing
    model = make_model("edt_local").eval()
    x, c = inputs()
    patch_model(model)
    with torch.no_grad():
        with_amm = model(x, c)
        for a in attention_modules(model):
            a.local = False
        without = model(x, c)
    assert (with_amm - without).abs().max() > 1e-2


# ----------------------------------------------------------------------------- state_dict / unpatch

@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_untouched_and_unpatch_exact(kind):
    model = make_model(kind).eval()
    x, c = inputs()
    before = model.state_dict(keep_vars=True)
    with torch.no_grad():
        out_before = model(x, c)
    report = patch(model, kind)
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(before)
    for key in before:
        assert after[key] is before[key], key  # the very same tensors
    n = unpatch_model(report)
    assert n == len(report) == 2
    for attn in attention_modules(model):
        assert "forward" not in attn.__dict__ and not is_patched(attn)
        assert attn.forward.__func__ is type(attn).forward
    with torch.no_grad():
        assert torch.equal(model(x, c), out_before)


def test_unpatch_restores_a_previous_instance_forward():
    model = make_model("mdt")
    attn = model.blocks[0].attn
    custom = types.MethodType(type(attn).forward, attn)
    attn.forward = custom
    patch_model(model)
    assert attn.forward is not custom
    assert unpatch_model(model) == 2
    assert attn.__dict__["forward"] is custom


def test_patch_is_idempotent_and_report_lists_modules():
    model = make_model("mdt")
    report = patch_model(model)
    assert isinstance(report, PatchReport)
    assert report.names == ["blocks.0.attn", "blocks.1.attn"]
    assert report.counts() == {"mdt": 2}
    assert "blocks.1.attn: mdt (MDTAttention)" in str(report)
    again = patch_model(model)
    assert len(again) == 0 and [n for n, _ in again.skipped] == report.names
    assert unpatch_model(again) == 0  # the second report patched nothing
    assert report.undo() == 2


def test_timm_like_class_is_not_detected_without_targets():
    model = make_model("timm_style")
    with pytest.warns(UserWarning, match=r"patched nothing in TinyModel.*looked like attention: "
                                         r".*TimmStyleAttention x 2 \(e\.g\. blocks\.0\.attn\)"):
        report = patch_model(model)
    assert len(report) == 0
    assert report.seen == [("blocks.0.attn", "test_patch.TimmStyleAttention"),
                           ("blocks.1.attn", "test_patch.TimmStyleAttention")]
    assert "look like attention: test_patch.TimmStyleAttention x 2" in str(report)


def test_nothing_patched_strict_raises_and_touches_nothing():
    model = make_model("timm_style")
    with pytest.raises(UnsupportedModuleError, match=r"patched nothing.*TimmStyleAttention.*targets="):
        patch_model(model, strict=True)
    with pytest.raises(UnsupportedModuleError, match="No module looked like attention"):
        patch_model(nn.Sequential(nn.Linear(4, 4), nn.GELU()), strict=True)
    assert not any(is_patched(m) for m in model.modules())
    with pytest.raises(TypeError, match="strict must be a bool"):
        patch_model(model, strict="yes")
    # something patched, or already computing through amm_attention: no warning
    import warnings as _w

    with _w.catch_warnings():
        _w.simplefilter("error")
        assert len(patch(model, "timm_style", strict=True)) == 2
        assert len(patch(model, "timm_style", strict=True)) == 0  # already patched: fine
        native = TinyModel(lambda: edt_kernels.AMMAttention(DIM, HEADS, grid=GRID), depth=1)
        assert [n for n, _ in patch_model(native, strict=True).skipped] == ["blocks.0.attn"]
    unpatch_model(model)


def test_project_modules_are_recognised_by_type():
    class MyAMMAttention(edt_kernels.AMMAttention):  # a subclass, defined outside the package
        pass

    class BiasHolder(nn.Module):
        """qkv/proj/num_heads/scale and this package's RelativePositionBias, plus an EDT-like
        ``local`` flag: a module of this project, not an EDT checkpoint class."""

        def __init__(self):
            super().__init__()
            self.qkv, self.proj = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
            self.num_heads, self.scale, self.local, self.input_resolution = HEADS, 0.25, False, GRID
            self.rel_pos_bias = edt_kernels.RelativePositionBias(GRID, HEADS)

        def forward(self, x):
            return x

    model = nn.ModuleDict({"a": MyAMMAttention(DIM, HEADS, grid=GRID), "b": BiasHolder()})
    report = patch_model(model)
    assert len(report) == 0
    assert report.skipped == [("a", "AMMAttention: already computed by amm_attention")]
    assert [n for n, _ in report.seen] == ["b"]  # listed as seen, not patched as an EDT block
    assert not is_patched(model["b"])
    handle = apply_amm(model, [model["a"]])
    assert model["a"].amm == AMM()
    handle.undo()
    assert model["a"].amm is None


@pytest.mark.parametrize("kind", ["timm_style", "mdt"])
def test_attention_dropout_in_training_runs_eagerly_with_one_warning(kind):
    model = make_model(kind)
    for a in attention_modules(model):
        a.attn_drop.p = 0.25
    model.train()
    x, c = inputs()
    kw = {}
    if kind == "mdt":  # masked training: 11 of 16 tokens
        g = torch.Generator().manual_seed(3)
        kw["ids_keep"] = torch.stack([torch.randperm(N, generator=g)[:11] for _ in range(2)])
        x, c = inputs(n=11)
    torch.manual_seed(123)
    want = run(model, x, c, **kw)
    patch(model, kind)
    with pytest.warns(UserWarning, match="attention dropout p=0.25 in training mode") as record:
        torch.manual_seed(123)  # the same dropout masks as the original forward drew
        got = run(model, x, c, **kw)
    assert len([w for w in record if "attention dropout" in str(w.message)]) == 2  # once per module
    assert_same_run(got, want)
    torch.manual_seed(5)
    again = run(model, x, c, **kw)  # other masks: the dropout is live, and no second warning
    assert not torch.allclose(again[0], got[0])
    model.eval()
    with torch.no_grad():
        out = model(x, c, **kw)
    for a in attention_modules(model):
        a.attn_drop.p = 0.0
    with torch.no_grad():
        torch.testing.assert_close(model(x, c, **kw), out, atol=0, rtol=0)  # eval: no dropout
    unpatch_model(model)


# ----------------------------------------------------------------------------- AMM

def dense_attention(attn, x, M=None):
    """(softmax(q k^T scale [+ bias]) [⊙ M]) v -> proj, for timm-style modules."""
    B, T, C = x.shape
    q, k, v = attn.qkv(x).reshape(B, T, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)
    p = torch.softmax(q @ k.transpose(-2, -1) * attn.scale, dim=-1)
    if M is not None:
        p = p * M
    return attn.proj((p @ v).transpose(1, 2).reshape(B, T, C))


def capture_attention(model):
    records, hooks = {}, []
    for i, block in enumerate(model.blocks):
        hooks.append(block.attn.register_forward_hook(
            lambda mod, args, out, i=i: records.__setitem__(i, (args[0].detach(), out.detach()))))
    return records, hooks


@pytest.mark.parametrize("kind", ["timm_style", pytest.param("timm", marks=needs_timm)])
def test_apply_amm_preset_only_in_those_blocks(kind):
    depth, chosen = AMM_PRESETS["DiT-S/2"]
    model = make_model(kind, depth=depth)
    x, c = inputs()
    with torch.no_grad():
        out_before = model(x, c)
    targets = {TimmStyleAttention: "timm"} if kind == "timm_style" else None
    handle = apply_amm(model, "DiT-S/2", targets=targets)
    assert handle.names == ["blocks.8", "blocks.10"]
    M = load_fixture("official_amm_matrices.pt")[GRID]  # the authors' matrix for the 4 x 4 grid
    records, hooks = capture_attention(model)
    with torch.no_grad():
        out_amm = model(x, c)
    for h in hooks:
        h.remove()
    assert sorted(records) == list(range(depth))
    with torch.no_grad():
        for i, (inp, out) in records.items():
            want = dense_attention(model.blocks[i].attn, inp, M if i in chosen else None)
            torch.testing.assert_close(out, want, atol=ATOL, rtol=ATOL, msg=lambda m: f"block {i}: {m}")
    assert (out_amm - out_before).abs().max() > 1e-3
    assert handle.undo() == 2
    assert not any(is_patched(a) for a in attention_modules(model))  # apply_amm patched, undo unpatched
    with torch.no_grad():
        assert torch.equal(model(x, c), out_before)


def test_apply_amm_on_patched_model_restores_previous_settings():
    model = make_model("timm_style", depth=3)
    report = patch(model, "timm_style")
    x, c = inputs()
    with torch.no_grad():
        plain = model(x, c)
    cfg = AMM(radius2=2)
    with apply_amm(model, [model.blocks[1]], amm=cfg, eval_only=True) as handle:
        st = model.blocks[1].attn._edt_kernels_patch
        assert st.amm is cfg and st.amm_eval_only
        model.train()
        with torch.no_grad():
            assert torch.equal(model(x, c), plain)  # eval_only: no AMM while training
        model.eval()
        with torch.no_grad():
            assert not torch.allclose(model(x, c), plain)
    assert handle.names == ["blocks.1"]
    assert all(is_patched(a) for a in attention_modules(model))  # still patched by patch_model
    assert model.blocks[1].attn._edt_kernels_patch.amm is KEEP
    with torch.no_grad():
        assert torch.equal(model(x, c), plain)
    report.undo()


@pytest.mark.parametrize("off", [False, None], ids=["False", "None"])
def test_apply_amm_off_disables_edt_native_amm(off):
    model = make_model("edt_local").eval()
    x, c = inputs()
    with torch.no_grad():
        native = model(x, c)
        for a in attention_modules(model):
            a.local = False
        no_amm = model(x, c)
        for a in attention_modules(model):
            a.local = True
    handle = apply_amm(model, [0, 1], amm=off)
    with torch.no_grad():
        torch.testing.assert_close(model(x, c), no_amm, atol=ATOL, rtol=ATOL)
    handle.undo()
    with torch.no_grad():
        torch.testing.assert_close(model(x, c), native, atol=0, rtol=0)
    report = patch_model(model, amm=off)  # patch_model's None is no AMM too (KEEP keeps the module's)
    with torch.no_grad():
        torch.testing.assert_close(model(x, c), no_amm, atol=ATOL, rtol=ATOL)
    report.undo()


def test_patch_model_amm_everywhere_and_explicit_grid():
    model = make_model("timm_style", depth=2)
    x, c = inputs()
    rows, cols = 2, 8  # a non-square grid needs an explicit AMM config
    cfg = AMM(period=10.0, radius2=9)
    handle = apply_amm(model, [0, 1], grid=(rows, cols), amm=cfg, targets={TimmStyleAttention: "timm"})
    M = edt_kernels.modulation_matrix((rows, cols), cfg)
    records, hooks = capture_attention(model)
    with torch.no_grad():
        model(x, c)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        for i, (inp, out) in records.items():
            torch.testing.assert_close(out, dense_attention(model.blocks[i].attn, inp, M), atol=ATOL, rtol=ATOL)
    handle.undo()
    report = patch(model, "timm_style", amm=True)
    records, hooks = capture_attention(model)
    with torch.no_grad():
        model(x, c)
    for h in hooks:
        h.remove()
    M = load_fixture("official_amm_matrices.pt")[GRID]
    with torch.no_grad():
        for i, (inp, out) in records.items():
            torch.testing.assert_close(out, dense_attention(model.blocks[i].attn, inp, M), atol=ATOL, rtol=ATOL)
    report.undo()


def test_amm_attention_modules_take_apply_amm():
    model = TinyModel(lambda: edt_kernels.AMMAttention(DIM, HEADS, qkv_bias=True, grid=GRID), depth=2)
    x, c = inputs()
    with torch.no_grad():
        before = model(x, c)
    handle = apply_amm(model, [1])
    assert model.blocks[1].attn.amm == AMM() and model.blocks[0].attn.amm is None
    with torch.no_grad():
        assert not torch.allclose(model(x, c), before)
    handle.undo()
    assert model.blocks[1].attn.amm is None
    with torch.no_grad():
        assert torch.equal(model(x, c), before)


# ----------------------------------------------------------------------------- torch.compile

# The compiled region is checked with amm_attention's "torch" backend (fast to
# trace on a CPU); the kernels' own custom ops have their opcheck tests.

def test_compile_fullgraph_patched_model():
    model = make_model("timm_style", depth=2).eval()
    patch(model, "timm_style", backend="torch")
    handle = apply_amm(model, [1])
    x, c = inputs()
    with torch.no_grad():
        want = model(x, c)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        got = compiled(x, c)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=ATOL)
    handle.undo()


def test_compile_fullgraph_mdt_with_ids_keep_backward():
    model = make_model("mdt", depth=1)
    patch_model(model, backend="torch")
    ids_keep = torch.stack([torch.randperm(N)[:9] for _ in range(2)])
    x, c = inputs(n=9)
    want = run(model, x, c, ids_keep=ids_keep)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    got = run(compiled, x, c, ids_keep=ids_keep)
    assert_same_run(got, want)


# ----------------------------------------------------------------------------- errors

def test_unknown_type_in_targets_lists_supported_kinds():
    model = make_model("mdt")
    with pytest.raises(UnsupportedModuleError, match=r"not a supported attention type.*'timm'.*'mdt'.*'edt'"):
        patch_model(model, targets=[nn.LayerNorm])
    assert not any(is_patched(m) for m in model.modules())


def test_bad_options_raise():
    model = make_model("timm_style")
    with pytest.raises(ValueError, match="unknown attention kind 'flash'"):
        patch_model(model, targets={TimmStyleAttention: "flash"})
    with pytest.raises(TypeError, match="targets"):
        patch_model(model, targets="timm")
    with pytest.raises(ValueError, match="do not occur in the model"):
        patch_model(model, targets=[MDTAttention])
    with pytest.raises(ValueError, match="backend must be"):
        patch_model(model, backend="cudnn")
    with pytest.raises(TypeError, match="amm must be"):
        patch_model(model, amm="yes")
    with pytest.raises(TypeError):
        patch_model(model, fused=True)  # no silently dropped options
    with pytest.raises(ValueError, match="unknown AMM preset 'DiT-L/2'"):
        apply_amm(model, "DiT-L/2")
    with pytest.raises(ValueError, match="for a model with 28 blocks"):
        apply_amm(model, "DiT-XL/2")
    with pytest.raises(IndexError, match="out of range"):
        apply_amm(model, [5], targets={TimmStyleAttention: "timm"})
    with pytest.raises(UnsupportedModuleError, match="contains no supported attention"):
        apply_amm(model, [0])  # timm-like class not declared
    with pytest.raises(TypeError, match="amm must be"):
        apply_amm(model, [0], amm="published", targets={TimmStyleAttention: "timm"})
    with pytest.raises(TypeError, match="unpatch_model takes"):
        unpatch_model("model")
    assert not any(is_patched(m) for m in model.modules())


def test_runtime_refusals():
    model = make_model("timm_style")
    patch(model, "timm_style")
    apply_amm(model, [0])
    x, c = inputs(n=12)  # 12 tokens: not a square grid
    with pytest.raises(ValueError, match="N = 12 tokens is not a square"):
        model(x, c)
    x, c = inputs()
    edt = make_model("edt")
    patch_model(edt)
    with pytest.raises(NotImplementedError, match="mask"):
        edt.blocks[0].attn(x, mask=torch.zeros(N, N))


def test_mdt_with_foreign_index_layout_is_refused():
    model = make_model("mdt")
    model.blocks[1].attn.rel_pos_bias.relative_position_index.copy_(published_index(GRID).t())
    with pytest.raises(UnsupportedModuleError, match="blocks.1.attn.*not the BEiT/Swin layout"):
        patch_model(model)
    assert not any(is_patched(m) for m in model.modules())  # nothing half-patched


def test_verify_refuses_a_wrong_declaration():
    class NotTimm(TimmStyleAttention):
        def forward(self, x, attn_mask=None):
            return super().forward(x) * 2

    model = TinyModel(lambda: NotTimm(DIM, num_heads=HEADS), depth=1)
    with pytest.raises(RuntimeError, match="differs from the original"):
        patch_model(model, targets={NotTimm: "timm"}, verify=True)
    assert not is_patched(model.blocks[0].attn)
    assert len(patch(make_model("mdt"), "mdt", verify=True)) == 2


def test_timm_kind_attn_mask():
    torch.manual_seed(0)
    attn = TimmStyleAttention(DIM, num_heads=HEADS, qkv_bias=True)
    x = torch.randn(2, N, DIM)
    mask = torch.rand(2, 1, N, N) > 0.3
    mask[..., 0] = True  # every row keeps a key
    float_mask = torch.randn(1, HEADS, N, N)
    with torch.no_grad():
        want = attn(x, attn_mask=mask), attn(x, attn_mask=float_mask)
    patch_model(attn, targets={TimmStyleAttention: "timm"})
    with torch.no_grad():
        torch.testing.assert_close(attn(x, attn_mask=mask), want[0], atol=ATOL, rtol=ATOL)
        torch.testing.assert_close(attn(x, attn_mask=float_mask), want[1], atol=ATOL, rtol=ATOL)


# ----------------------------------------------------------------------------- real timm

@needs_timm
def test_timm_autodetect_and_qk_norm_and_mask():
    torch.manual_seed(0)
    attn = TimmAttention(DIM, num_heads=HEADS, qkv_bias=True, qk_norm=True, norm_layer=nn.LayerNorm)
    x = torch.randn(2, N, DIM)
    mask = torch.rand(2, 1, N, N) > 0.3
    mask[..., 0] = True  # every row keeps a key
    with torch.no_grad():
        want, want_masked = attn(x), attn(x, attn_mask=mask)
    report = patch_model(attn)
    assert report.names == [""] and report.patched[0].kind == "timm"
    with torch.no_grad():
        torch.testing.assert_close(attn(x), want, atol=ATOL, rtol=ATOL)
        torch.testing.assert_close(attn(x, attn_mask=mask), want_masked, atol=ATOL, rtol=ATOL)


# ----------------------------------------------------------------------------- this repo's edt.models

def test_edt_models_attention_is_native_and_takes_apply_amm():
    # edt.models builds its attention as its blocks do: an AMMAttention with a qkv bias, AMM in eval only
    common = pytest.importorskip("edt.models.common", reason="edt.models is not in this checkout")
    torch.manual_seed(0)

    def make():
        attn = common._attention(DIM, HEADS, GRID, extra_rows=0, persistent_index=False,
                                 rel_pos_first=True, backend="auto")
        nn.init.normal_(attn.rel_pos_bias.relative_position_bias_table)
        return attn

    model = TinyModel(make, depth=2).eval()
    report = patch_model(model)
    assert len(report) == 0 and [n for n, _ in report.skipped] == ["blocks.0.attn", "blocks.1.attn"]
    x, c = inputs()
    with torch.no_grad():
        before = model(x, c)
    handle = apply_amm(model, [1], eval_only=True)
    attn = model.blocks[1].attn
    assert attn.amm == AMM() and attn.amm_eval_only is True and model.blocks[0].attn.amm is None
    records, hooks = capture_attention(model)
    with torch.no_grad():
        model(x, c)
    for h in hooks:
        h.remove()
    inp, out = records[1]
    M = load_fixture("official_amm_matrices.pt")[GRID]
    with torch.no_grad():
        B, T, C = inp.shape
        q, k, v = attn.qkv(inp).reshape(B, T, 3, HEADS, C // HEADS).permute(2, 0, 3, 1, 4)
        bias = attn.rel_pos_bias.relative_position_bias_table[published_index(GRID)].permute(2, 0, 1)
        p = torch.softmax(q @ k.transpose(-2, -1) * attn.scale + bias, dim=-1) * M
        want = attn.proj((p @ v).transpose(1, 2).reshape(B, T, C))
    torch.testing.assert_close(out, want, atol=ATOL, rtol=ATOL)
    with apply_amm(model, [0], amm=AMM(radius2=1)):  # the models' attention takes any AMM config
        assert model.blocks[0].attn.amm == AMM(radius2=1)
    assert model.blocks[0].attn.amm is None
    assert handle.undo() == 1
    assert attn.amm is None and attn.amm_eval_only is True
    with torch.no_grad():
        assert torch.equal(model(x, c), before)
