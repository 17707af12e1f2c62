"""diffusers drop-in: patch_model / apply_amm / AMMAttnProcessor on diffusers'
``Attention`` and a tiny random ``DiTTransformer2DModel`` built from its config.

The stock processors (``AttnProcessor2_0`` and friends) are the reference: the
patched transformer must give the same output and gradients to 1e-5 (float32);
with the AMM on, the chosen blocks must compute ``(softmax(q k^T scale) ⊙ M) v``
with the authors' matrix ``M``, checked against a dense processor written here
and set by hand in those blocks.  Skipped only when diffusers is not installed
(``pip install "edt-kernels[diffusers]"``).
"""
import functools
import types
import warnings

import pytest
import torch
from torch import nn

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (the [diffusers] extra)")

from diffusers import DiTTransformer2DModel  # noqa: E402
from diffusers.models.attention import BasicTransformerBlock  # noqa: E402
from diffusers.models.attention_processor import (  # noqa: E402
    Attention, AttnProcessor, AttnProcessor2_0, FusedAttnProcessor2_0, SlicedAttnProcessor)

import edt_kernels  # noqa: E402
from edt_kernels import AMM, apply_amm, patch_model, unpatch_model  # noqa: E402
from edt_kernels.diffusers import AMMAttnProcessor  # noqa: E402
from edt_kernels.patch import UnsupportedModuleError, is_patched  # noqa: E402

from conftest import load_fixture  # noqa: E402
from helpers import model_runs  # noqa: E402

ATOL = 1e-5  # float32, patched vs stock (outputs and gradients)
HEADS, HEAD_DIM, SIDE = 2, 8, 8  # inner width 16; latent 8 x 8, patch 2 -> a 4 x 4 grid of 16 tokens
GRID = 4


# ----------------------------------------------------------------------------- helpers

def make_dit(num_layers=2, seed=0):
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4,
                                  num_layers=num_layers, sample_size=SIDE, patch_size=2, norm_num_groups=1,
                                  num_embeds_ada_norm=1000)
    with torch.no_grad():  # larger random weights than the default init, so that every
        for p in model.parameters():  # attention visibly reaches the output
            p.normal_(0.0, 0.2)
    return model.eval()


def dit_inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, SIDE, SIDE, generator=g), torch.tensor([3, 500]), torch.tensor([1, 7]))


# DiT drops class labels at random in training mode: the same draws each run.
run = functools.partial(model_runs.run, manual_seed=11)
assert_same_run = functools.partial(model_runs.assert_same_run, atol=ATOL)


def sample(model, args):
    """The transformer's output without grad, with the same random draws every call."""
    torch.manual_seed(11)
    with torch.no_grad():
        return model(*args).sample


class DenseAMMProcessor:
    """The published eager DiT-with-AMM self-attention, written out:
    ``to_out((softmax(q k^T scale) ⊙ M) v)``, M materialised."""

    def __init__(self, M):
        self.M = M

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        assert encoder_hidden_states is None and attention_mask is None
        B, N, C = hidden_states.shape
        q, k, v = (f(hidden_states).view(B, N, attn.heads, -1).transpose(1, 2)
                   for f in (attn.to_q, attn.to_k, attn.to_v))
        p = torch.softmax(q @ k.transpose(-2, -1) * attn.scale, dim=-1) * self.M
        out = (p @ v).transpose(1, 2).reshape(B, N, -1)
        return attn.to_out[1](attn.to_out[0](out))


def self_attentions(model):
    return [b.attn1 for b in model.transformer_blocks]


# ----------------------------------------------------------------------------- DiT: equivalence, undo

@pytest.mark.parametrize("mode", ["train", "eval"])
def test_patched_dit_matches_stock(mode):
    model = make_dit().train(mode == "train")
    args = dit_inputs()
    want = run(model, *args)
    report = patch_model(model)
    assert report.names == ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
    assert report.counts() == {"diffusers": 2} and not report.left_alone
    assert all(isinstance(a.processor, AMMAttnProcessor) for a in self_attentions(model))
    assert_same_run(run(model, *args), want)


def test_state_dict_untouched_and_undo_restores_processors_exactly():
    model = make_dit()
    args = dit_inputs()
    before = model.state_dict(keep_vars=True)
    processors = [a.processor for a in self_attentions(model)]
    with torch.no_grad():
        stock = sample(model, args)
    report = patch_model(model)
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(before) and all(after[k] is before[k] for k in before)
    assert report.undo() == 2
    assert [a.processor for a in self_attentions(model)] == processors
    assert all(a.processor is p for a, p in zip(self_attentions(model), processors))
    assert not any(is_patched(a) or "_edt_kernels_patch" in a.__dict__ for a in self_attentions(model))
    with torch.no_grad():
        assert torch.equal(sample(model, args), stock)
    patch_model(model)
    assert unpatch_model(model) == 2  # by model, too
    assert all(a.processor is p for a, p in zip(self_attentions(model), processors))


def test_amm_blocks_equal_dense_reference_and_undo():
    depth, chosen = edt_kernels.AMM_PRESETS["DiT-S/2"]
    model = make_dit(num_layers=depth).train()  # the AMM applies in training too (eval_only=False)
    args = dit_inputs()
    with torch.no_grad():
        stock = sample(model, args)
    processors = [a.processor for a in self_attentions(model)]
    handle = apply_amm(model, "DiT-S/2")
    assert handle.names == ["transformer_blocks.8", "transformer_blocks.10"]
    got = run(model, *args)
    handle.undo()
    # apply_amm patched, undo unpatched: the very same processors again
    assert all(a.processor is p for a, p in zip(self_attentions(model), processors))
    with torch.no_grad():
        assert torch.equal(sample(model, args), stock)

    M = load_fixture("official_amm_matrices.pt")[GRID]  # the authors' matrix for the 4 x 4 grid
    torch.testing.assert_close(edt_kernels.modulation_matrix(GRID), M.float(), atol=1e-6, rtol=1e-6)
    for i in chosen:  # the reference: stock processors everywhere else, the dense AMM in those blocks
        model.transformer_blocks[i].attn1.set_processor(DenseAMMProcessor(M.float()))
    want = run(model, *args)
    assert_same_run(got, want)
    assert (got[0] - stock).abs().max() > 1e-3  # the AMM changes the output: the test can fail


def test_preset_dit_xl_2_on_transformer_blocks_and_pipeline_object():
    model = make_dit(num_layers=28)
    pipe = types.SimpleNamespace(transformer=model)  # what DiTPipeline exposes
    handle = apply_amm(pipe, "DiT-XL/2")
    assert handle.names == [f"transformer_blocks.{i}" for i in (15, 17, 19, 22, 24)]
    on = [i for i, a in enumerate(self_attentions(model)) if is_patched(a) and a.processor.amm == AMM()]
    assert on == [15, 17, 19, 22, 24]
    assert handle.undo() == 5 and not any(is_patched(a) for a in self_attentions(model))
    with pytest.raises(ValueError, match=r"for a model with 28 blocks in model.blocks \(or model.transformer_blocks\)"):
        apply_amm(make_dit(num_layers=2), "DiT-XL/2")
    with pytest.raises(IndexError, match="out of range for model.transformer_blocks of length 2"):
        apply_amm(make_dit(num_layers=2), [2])
    report = patch_model(pipe)
    assert len(report) == 28
    assert unpatch_model(pipe) == 28


def test_eval_only_amm_and_amm_everywhere():
    model = make_dit()
    args = dit_inputs()
    with torch.no_grad():
        stock = sample(model, args)
    report = patch_model(model, amm=True)
    with torch.no_grad():
        everywhere = sample(model, args)
    report.undo()
    M = load_fixture("official_amm_matrices.pt")[GRID].float()
    for a in self_attentions(model):
        a.set_processor(DenseAMMProcessor(M))
    with torch.no_grad():
        torch.testing.assert_close(everywhere, sample(model, args), atol=ATOL, rtol=ATOL)
    for a in self_attentions(model):
        a.set_processor(AttnProcessor2_0())
    with apply_amm(model, [0, 1], eval_only=True):
        model.train()
        with torch.no_grad():
            torch.testing.assert_close(sample(model, args), stock, atol=ATOL, rtol=ATOL)
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(sample(model, args), everywhere, atol=ATOL, rtol=ATOL)


def test_verify_and_compile_fullgraph():
    model = make_dit()
    args = dit_inputs()
    report = patch_model(model, verify=True, backend="torch")
    assert len(report) == 2
    plain = sample(model, args)
    handle = apply_amm(model, [1])  # on a patched model: sets the installed processor's AMM
    processor = model.transformer_blocks[1].attn1.processor
    assert processor.amm == AMM() and model.transformer_blocks[0].attn1.processor.amm is None
    with torch.no_grad():
        want = sample(model, args)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        got = sample(compiled, args)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=ATOL)
    assert not torch.allclose(want, plain, atol=1e-3)
    assert handle.undo() == 1
    assert model.transformer_blocks[1].attn1.processor is processor and processor.amm is None  # still patched
    assert torch.equal(sample(model, args), plain)
    report.undo()


# ----------------------------------------------------------------------------- Attention options

def _attention(case):
    torch.manual_seed(0)
    if case == "spatial_norm_4d":
        attn = Attention(32, heads=2, dim_head=16, bias=True, spatial_norm_dim=3, residual_connection=True)
    elif case == "group_norm_4d":  # the VAE mid-block layout
        attn = Attention(16, heads=2, dim_head=8, bias=True, norm_num_groups=4, residual_connection=True,
                         rescale_output_factor=1.5, upcast_softmax=True, eps=1e-6)
    elif case == "qk_layer_norm":
        attn = Attention(16, heads=2, dim_head=8, bias=True, qk_norm="layer_norm")
    elif case == "qk_rms_norm":
        attn = Attention(16, heads=2, dim_head=8, qk_norm="rms_norm")
    elif case == "residual_rescale":
        attn = Attention(16, heads=2, dim_head=8, residual_connection=True, rescale_output_factor=2.0)
    elif case == "fused":
        attn = Attention(16, heads=2, dim_head=8, bias=True, qk_norm="layer_norm")
        attn.fuse_projections()
        attn.set_processor(FusedAttnProcessor2_0())
    elif case == "classic_no_scale":  # scale_qk=False: diffusers picks the classic AttnProcessor
        attn = Attention(16, heads=2, dim_head=8, scale_qk=False, qk_norm="layer_norm")
        assert type(attn.processor) is AttnProcessor
    else:
        raise AssertionError(case)
    with torch.no_grad():  # non-trivial norms and biases, values of order one
        for p in attn.parameters():
            p.add_(0.1 * torch.randn_like(p))
    C = attn.query_dim
    x = torch.randn(2, C, 4, 4) if case.endswith("4d") else torch.randn(2, 16, C)
    kw = {"temb": torch.randn(2, 3, 2, 2)} if case == "spatial_norm_4d" else {}
    return attn, x, kw


class _Wrap(nn.Module):
    """Attention.forward takes temb through **cross_attention_kwargs."""

    def __init__(self, attn, kw):
        super().__init__()
        self.attn, self.kw = attn, kw

    def forward(self, x):
        return self.attn(x, **self.kw)


@pytest.mark.parametrize("case", ["spatial_norm_4d", "group_norm_4d", "qk_layer_norm", "qk_rms_norm",
                                  "residual_rescale", "fused", "classic_no_scale"])
def test_attention_options_match_stock(case):
    attn, x, kw = _attention(case)
    model = _Wrap(attn, kw).train()
    want = run(model, x)
    stock = attn.processor
    report = patch_model(model)
    assert report.names == ["attn"], str(report)
    assert attn.processor.fallback is stock
    assert_same_run(run(model, x), want)
    report.undo()
    assert attn.processor is stock


def test_4d_input_gives_the_amm_its_grid():
    attn, _, _ = _attention("group_norm_4d")
    x = torch.randn(2, 16, 2, 8)  # a 2 x 8 grid: needs an explicit AMM config
    cfg = AMM(period=10.0, radius2=9)
    with torch.no_grad():
        stock = attn(x)
    handle = apply_amm(attn, [attn], amm=cfg)
    assert handle.names == [""]
    with torch.no_grad():
        got = attn(x)
    handle.undo()
    M = edt_kernels.modulation_matrix((2, 8), cfg)
    with torch.no_grad():  # the same steps as the stock processor, with M after the softmax
        h = attn.group_norm(x.view(2, 16, 16)).transpose(1, 2)  # (B, N, C)
        q, k, v = (f(h).view(2, 16, 2, 8).transpose(1, 2) for f in (attn.to_q, attn.to_k, attn.to_v))
        p = torch.softmax(q @ k.transpose(-2, -1) * attn.scale, dim=-1) * M
        out = attn.to_out[0]((p @ v).transpose(1, 2).reshape(2, 16, 16))
        want = (out.transpose(1, 2).reshape(2, 16, 2, 8) + x) / attn.rescale_output_factor
        torch.testing.assert_close(got, want, atol=ATOL, rtol=ATOL)
        assert not torch.allclose(got, stock, atol=1e-3)
        assert torch.equal(attn(x), stock)


# ----------------------------------------------------------------------------- left alone, fallbacks

def test_cross_attention_and_other_processors_are_left_alone_and_listed():
    torch.manual_seed(0)
    block = BasicTransformerBlock(16, 2, 8, cross_attention_dim=12, attention_bias=True)  # PixArt/SD-like
    other = Attention(16, heads=2, dim_head=8)
    other.set_processor(SlicedAttnProcessor(slice_size=1))
    gqa = Attention(16, heads=2, kv_heads=1, dim_head=8)
    model = nn.ModuleDict({"block": block, "sliced": other, "gqa": gqa})
    x, enc = torch.randn(2, 16, 16), torch.randn(2, 5, 12)
    with torch.no_grad():
        want = block(x, encoder_hidden_states=enc)
    report = patch_model(model)
    assert report.names == ["block.attn1"]
    left = dict(report.left_alone)
    assert list(left) == ["block.attn2", "sliced", "gqa"]
    assert "cross-attention (cross_attention_dim=12)" in left["block.attn2"]
    assert "processor SlicedAttnProcessor is not one AMMAttnProcessor reproduces" in left["sliced"]
    assert "grouped key/value heads" in left["gqa"]
    assert "left alone block.attn2: Attention: cross-attention" in str(report)
    assert type(block.attn2.processor) is AttnProcessor2_0
    with torch.no_grad():
        torch.testing.assert_close(block(x, encoder_hidden_states=enc), want, atol=ATOL, rtol=ATOL)
    report.undo()
    with pytest.raises(UnsupportedModuleError, match=r"strict=True.*block.attn2.*cross-attention"):
        patch_model(model, strict=True)
    assert not any(is_patched(m) for m in model.modules())
    with pytest.warns(UserWarning, match=r"patched nothing.*Left alone.*x: Attention: cross-attention"):
        assert len(patch_model(nn.ModuleDict({"x": block.attn2}))) == 0
    # apply_amm on the block picks its self-attention, not the cross-attention
    handle = apply_amm(block, [block])
    assert handle.modules == [block.attn1]
    handle.undo()


def test_processor_falls_back_for_masks_and_cross_attention():
    torch.manual_seed(0)
    attn = Attention(16, heads=2, dim_head=8, bias=True)
    x = torch.randn(2, 16, 16)
    mask = torch.zeros(2, 1, 16)
    mask[:, :, 11:] = float("-inf")  # the last 5 keys masked out
    with torch.no_grad():
        want_masked = attn(x, attention_mask=mask)
    patch_model(attn)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, attention_mask=mask), want_masked, atol=ATOL, rtol=ATOL)
    handle = apply_amm(attn, [attn])
    with pytest.raises(ValueError, match="AMM is defined for self-attention.*attention_mask"):
        attn(x, attention_mask=mask)
    handle.undo()
    unpatch_model(attn)

    cross = Attention(16, cross_attention_dim=12, heads=2, dim_head=8)
    enc = torch.randn(2, 5, 12)
    with torch.no_grad():
        want = cross(x, encoder_hidden_states=enc)
    cross.set_processor(AMMAttnProcessor())  # by hand, on a module patch_model leaves alone
    with torch.no_grad():
        torch.testing.assert_close(cross(x, encoder_hidden_states=enc), want, atol=ATOL, rtol=ATOL)
    cross.set_processor(AMMAttnProcessor(amm=True))
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        cross(x, encoder_hidden_states=enc)


def test_hand_set_processor_is_native_and_apply_amm_copies_it_per_module():
    model = make_dit()
    args = dit_inputs()
    with torch.no_grad():
        stock = sample(model, args)
    shared = AMMAttnProcessor()
    for a in self_attentions(model):
        a.set_processor(shared)  # what model.set_attn_processor(shared) does on models that have it
    with torch.no_grad():
        torch.testing.assert_close(sample(model, args), stock, atol=ATOL, rtol=ATOL)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # computing through amm_attention already: no "patched nothing"
        report = patch_model(model)
    assert len(report) == 0
    assert [why for _, why in report.skipped] == ["AMMAttnProcessor: already computed by amm_attention"] * 2
    handle = apply_amm(model, [1])
    a0, a1 = self_attentions(model)
    assert a0.processor is shared and a1.processor is not shared and a1.processor.amm == AMM()
    assert shared.amm is None
    handle.undo()
    assert a1.processor is shared


def test_bad_processor_arguments():
    with pytest.raises(TypeError, match="amm must be"):
        AMMAttnProcessor(amm="on")
    with pytest.raises(TypeError, match="eval_only must be a bool"):
        AMMAttnProcessor(eval_only=1)
    with pytest.raises(TypeError, match="fallback must be"):
        AMMAttnProcessor(fallback=3)
    with pytest.raises(ValueError, match="grid must be positive"):
        AMMAttnProcessor(grid=(0, 4))


# ----------------------------------------------------------------------------- the example

def test_example_tiny_pipeline_patched_amm_undo():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "diffusers_dit_example.py"
    spec = importlib.util.spec_from_file_location("diffusers_dit_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main(["--steps", "2", "--sample-size", "8", "--repeat", "1", "--device", "cpu"])
    assert result["patched"] == 12
    assert result["patched_max_diff"] < 1e-5  # images in [0, 1]
    assert result["amm_blocks"] == ["transformer_blocks.8", "transformer_blocks.10"]
    assert result["amm_max_change"] > 1e-4
    assert result["undo_exact"]
