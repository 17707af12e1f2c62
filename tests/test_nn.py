"""edt_kernels.nn: RelativePositionBias and AMMAttention.

AMMAttention is compared, in float64, with an eager computation written here
from the published formulas (materialised bias, softmax, dense AMM), and with the MDT/EDT
stand-ins of test_patch.py after loading their state_dicts unchanged.
"""
import pytest
import torch
from torch import nn

import edt_kernels
from edt_kernels import AMM, AMMAttention, RelativePositionBias

from conftest import load_fixture
from tolerances import FWD_TOL, GRAD_TOL
from test_patch import (EDTAttentionBlock, MDTAttention, TimmStyleAttention, published_amm,
                        published_index)

DIM, HEADS, GRID = 24, 3, 4
N = GRID * GRID
ATOL64 = 1e-10


def eager_attention(attn, x, positions=None, M=None):
    """proj((softmax(q k^T scale + T[idx(p_i, p_j)]) [⊙ M]) v) with everything materialised."""
    B, T, C = x.shape
    q, k, v = attn.qkv(x).reshape(B, T, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)
    s = q @ k.transpose(-2, -1) * attn.scale
    if attn.rel_pos_bias is not None:
        idx = published_index(GRID)  # (N, N)
        if positions is not None:
            idx = idx[positions[:, :, None], positions[:, None, :]]  # (B, T, T)
        s = s + attn.rel_pos_bias.relative_position_bias_table[idx].movedim(-1, -3)  # (..., H, T, T)
    p = torch.softmax(s, dim=-1)
    if M is not None:
        if positions is not None:
            M = M[positions[:, :, None], positions[:, None, :]][:, None]
        p = p * M.to(p.dtype)
    return attn.proj((p @ v).transpose(1, 2).reshape(B, T, C))


def make(seed=0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    kw.setdefault("grid", GRID)
    kw.setdefault("backend", "torch")  # float64 wiring checks: exact reference backend
    attn = AMMAttention(DIM, HEADS, qkv_bias=True, **kw).to(dtype)
    if attn.rel_pos_bias is not None:
        nn.init.normal_(attn.rel_pos_bias.relative_position_bias_table)  # large enough to matter
    return attn


# ----------------------------------------------------------------------------- RelativePositionBias

def test_relative_position_bias_table_and_dense_bias():
    torch.manual_seed(0)
    rpb = RelativePositionBias(GRID, HEADS, extra_tokens=3)
    assert list(rpb.state_dict()) == ["relative_position_bias_table"]
    table = rpb.relative_position_bias_table
    assert table.shape == ((2 * GRID - 1) ** 2 + 3, HEADS)
    big = RelativePositionBias(16, 8).relative_position_bias_table  # 961 x 8 draws
    assert 0.017 < big.std().item() < 0.023 and big.abs().max() < 0.2 and big.mean().abs() < 3e-3
    dense = rpb()
    assert dense.shape == (HEADS, N, N)
    torch.testing.assert_close(dense, table[published_index(GRID)].permute(2, 0, 1), atol=0, rtol=0)
    pos = torch.stack([torch.randperm(N)[:7] for _ in range(2)])
    masked = rpb(pos)
    assert masked.shape == (2, HEADS, 7, 7)
    for b in range(2):  # the MDT double gather of the full bias
        torch.testing.assert_close(masked[b], dense[:, pos[b]][:, :, pos[b]], atol=0, rtol=0)


def test_relative_position_bias_rectangular_grid():
    rpb = RelativePositionBias((2, 5), 1)
    assert rpb.relative_position_bias_table.shape == (3 * 9, 1)
    assert rpb.grid == (2, 5) and rpb.num_tokens == 10


def test_relative_position_bias_loads_mdt_index_and_refuses_a_foreign_one():
    rpb = RelativePositionBias(GRID, HEADS, extra_tokens=3)
    sd = {"relative_position_bias_table": torch.randn_like(rpb.relative_position_bias_table),
          "relative_position_index": published_index(GRID)}
    rpb.load_state_dict(sd, strict=True)
    torch.testing.assert_close(rpb.relative_position_bias_table, sd["relative_position_bias_table"])
    assert "relative_position_index" in sd  # the caller's dict is not modified
    sd["relative_position_index"] = published_index(GRID).t().contiguous()
    with pytest.raises(RuntimeError, match="not the BEiT/Swin layout"):
        rpb.load_state_dict(sd)


@pytest.mark.parametrize("bad", [dict(num_heads=0), dict(extra_tokens=-1), dict(grid=(0, 3))])
def test_relative_position_bias_bad_arguments(bad):
    kw = dict(grid=GRID, num_heads=HEADS, extra_tokens=0)
    kw.update(bad)
    with pytest.raises((ValueError, TypeError)):
        RelativePositionBias(**kw)


# ----------------------------------------------------------------------------- AMMAttention

def test_amm_attention_state_dict_keys():
    attn = AMMAttention(DIM, HEADS, qkv_bias=True, grid=GRID)
    assert list(attn.state_dict()) == ["qkv.weight", "qkv.bias", "proj.weight", "proj.bias",
                                       "rel_pos_bias.relative_position_bias_table"]
    plain = AMMAttention(DIM, HEADS, rel_pos=False)
    assert list(plain.state_dict()) == ["qkv.weight", "proj.weight", "proj.bias"]  # timm, qkv_bias=False


# (backend, dtype, forward tol, gradient tol): the module's wiring in float64 on the
# exact "torch" backend, and the default dispatch ("auto") in float32.
SETUPS = {
    "torch-float64": ("torch", torch.float64, ATOL64, 1e-9),
    "auto-float32": ("auto", torch.float32, FWD_TOL[torch.float32][0], GRAD_TOL[torch.float32][0]),
}


@pytest.mark.parametrize("setup", list(SETUPS))
@pytest.mark.parametrize("amm", [None, True, AMM(radius2=5, amplitude=1.0)], ids=["no_amm", "amm", "amm_cfg"])
@pytest.mark.parametrize("masked", [False, True], ids=["full", "positions"])
def test_amm_attention_matches_eager(amm, masked, setup):
    backend, dtype, ftol, gtol = SETUPS[setup]
    attn = make(extra_tokens=3, dtype=dtype, backend=backend)
    x = torch.randn(2, 9 if masked else N, DIM, dtype=dtype, requires_grad=True)
    pos = torch.stack([torch.randperm(N)[:9] for _ in range(2)]) if masked else None
    M = None if amm is None else edt_kernels.modulation_matrix(GRID, amm, dtype=dtype)
    out = attn(x, positions=pos, amm=amm if amm is not None else False)
    want = eager_attention(attn, x, pos, M)
    torch.testing.assert_close(out, want, atol=ftol, rtol=ftol)
    g = torch.randn_like(out)
    params = [x] + list(attn.parameters())
    got_grads = torch.autograd.grad(out, params, g)
    want_grads = torch.autograd.grad(want, params, g)
    for p, a, b in zip(["x"] + [n for n, _ in attn.named_parameters()], got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=gtol, rtol=gtol, msg=lambda m: f"d{p}: {m}")


def test_amm_attention_uses_qkv_views(monkeypatch):
    """The module passes its qkv projection's output, reshaped to [B, N, 3, H, D]
    (a view, no copy), to the packed entry."""
    seen = {}
    real = edt_kernels.nn.amm_attention_qkvpacked

    def spy(qkv, **kw):
        seen.update(qkv=qkv)
        return real(qkv, **kw)

    monkeypatch.setattr(edt_kernels.nn, "amm_attention_qkvpacked", spy)
    attn = AMMAttention(DIM, HEADS, grid=GRID)
    proj = {}
    attn.qkv.register_forward_hook(lambda mod, inp, out: proj.update(out=out))
    attn(torch.randn(2, N, DIM))
    qkv = seen["qkv"]
    assert qkv.shape == (2, N, 3, HEADS, DIM // HEADS)
    assert qkv.data_ptr() == proj["out"].data_ptr()  # the projection's memory, not a copy


def test_amm_attention_module_amm_default_override_and_eval_only():
    attn = make(amm=True, amm_eval_only=True)
    x = torch.randn(2, N, DIM, dtype=torch.float64)
    M = edt_kernels.modulation_matrix(GRID, dtype=torch.float64)
    with torch.no_grad():
        attn.train()
        torch.testing.assert_close(attn(x), eager_attention(attn, x), atol=ATOL64, rtol=ATOL64)
        torch.testing.assert_close(attn(x, amm=True), eager_attention(attn, x, M=M), atol=ATOL64, rtol=ATOL64)
        attn.eval()
        torch.testing.assert_close(attn(x), eager_attention(attn, x, M=M), atol=ATOL64, rtol=ATOL64)
        torch.testing.assert_close(attn(x, amm=False), eager_attention(attn, x), atol=ATOL64, rtol=ATOL64)
        assert torch.equal(attn(x, amm=None), attn(x, amm=False))  # None: no AMM, as everywhere
        assert torch.equal(attn(x, amm=edt_kernels.amm.KEEP), attn(x))  # KEEP (the default): the module's own


def test_amm_attention_loads_timm_weights():
    torch.manual_seed(0)
    timm_like = TimmStyleAttention(DIM, num_heads=HEADS, qkv_bias=True).eval()
    attn = AMMAttention(DIM, HEADS, qkv_bias=True, rel_pos=False).eval()
    attn.load_state_dict(timm_like.state_dict(), strict=True)
    x = torch.randn(2, 10, DIM)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), timm_like(x), atol=1e-5, rtol=1e-5)


def test_amm_attention_loads_edt_weights_with_eval_amm():
    torch.manual_seed(0)
    edt = EDTAttentionBlock(DIM, GRID, HEADS, local=True)
    torch.testing.assert_close(edt.modulation_matrix[0, 0], load_fixture("official_amm_matrices.pt")[GRID])
    attn = AMMAttention(DIM, HEADS, qkv_bias=True, grid=GRID, amm=True, amm_eval_only=True)
    attn.load_state_dict(edt.state_dict(), strict=True)
    x = torch.randn(2, N, DIM)
    with torch.no_grad():
        for mode in (True, False):
            edt.train(mode), attn.train(mode)
            torch.testing.assert_close(attn(x), edt(x), atol=1e-5, rtol=1e-5)


def test_amm_attention_loads_mdt_weights_and_ids_keep():
    torch.manual_seed(0)
    mdt = MDTAttention(DIM, num_heads=HEADS, qkv_bias=True, num_patches=N)
    attn = AMMAttention(DIM, HEADS, qkv_bias=True, grid=GRID, extra_tokens=3)
    attn.load_state_dict(mdt.state_dict(), strict=True)  # includes relative_position_index
    ids_keep = torch.stack([torch.randperm(N)[:10] for _ in range(2)])
    x = torch.randn(2, 10, DIM)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, positions=ids_keep), mdt(x, ids_keep=ids_keep), atol=1e-5, rtol=1e-5)
        y = torch.randn(2, N, DIM)
        torch.testing.assert_close(attn(y), mdt(y), atol=1e-5, rtol=1e-5)


def test_amm_attention_published_amm_matches_published_formula():
    # the in-kernel AMM (amm=True) against the published float cut-off, n = 8; float64 inputs
    # compute with the AMM in float64
    torch.manual_seed(0)
    attn = AMMAttention(16, 2, grid=8, rel_pos=False, amm=True).double()
    x = torch.randn(1, 64, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), eager_attention(attn, x, M=published_amm(8, torch.float64)),
                                   atol=ATOL64, rtol=ATOL64)


def test_amm_attention_bad_arguments():
    with pytest.raises(ValueError, match="multiple of num_heads"):
        AMMAttention(10, 3, grid=GRID)
    for dim in (0, -8):
        with pytest.raises(ValueError, match="positive multiple of num_heads"):
            AMMAttention(dim, 8, grid=GRID)
    with pytest.raises(ValueError, match="attn_drop must be 0"):
        AMMAttention(DIM, HEADS, grid=GRID, attn_drop=0.1)
    with pytest.raises(ValueError, match="grid .* is required"):
        AMMAttention(DIM, HEADS)
    with pytest.raises(TypeError, match="amm must be"):
        AMMAttention(DIM, HEADS, grid=GRID, amm="published")
    attn = AMMAttention(DIM, HEADS, grid=GRID)
    with pytest.raises(ValueError, match=f"C = {DIM}"):
        attn(torch.randn(2, N, DIM + 1))
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor \[B, N, C\]"):
        attn(None)
    with pytest.raises(ValueError, match=r"x must be \[B, N, C\]"):
        attn(torch.randn(N, DIM))
    with pytest.raises(ValueError, match="N = qkv.shape\\[1\\] = 15 must equal rows\\*cols"):
        attn(torch.randn(2, 15, DIM))


def test_relative_position_bias_persistent_index_is_mdt_layout():
    rpb = RelativePositionBias(GRID, HEADS, extra_tokens=3, persistent_index=True)
    sd = rpb.state_dict()
    assert list(sd) == ["relative_position_bias_table", "relative_position_index"]
    torch.testing.assert_close(sd["relative_position_index"], published_index(GRID), atol=0, rtol=0)
    other = RelativePositionBias(GRID, HEADS, extra_tokens=3, persistent_index=True)
    other.load_state_dict(sd, strict=True)
    torch.testing.assert_close(other.relative_position_bias_table, rpb.relative_position_bias_table)
    del sd["relative_position_index"]
    with pytest.raises(RuntimeError, match="Missing key.*relative_position_index"):
        other.load_state_dict(sd, strict=True)
    other.load_state_dict(sd, strict=False)
    sd["relative_position_index"] = published_index(GRID).t().contiguous()
    with pytest.raises(RuntimeError, match="not the BEiT/Swin layout"):
        other.load_state_dict(sd)


def test_amm_attention_key_order_and_mdt_index():
    edt_style = AMMAttention(DIM, HEADS, qkv_bias=True, grid=GRID, rel_pos_first=True)
    assert list(edt_style.state_dict()) == ["rel_pos_bias.relative_position_bias_table", "qkv.weight",
                                            "qkv.bias", "proj.weight", "proj.bias"]
    mdt_style = AMMAttention(DIM, HEADS, qkv_bias=True, grid=GRID, extra_tokens=3, persistent_index=True)
    assert list(mdt_style.state_dict()) == ["qkv.weight", "qkv.bias", "proj.weight", "proj.bias",
                                            "rel_pos_bias.relative_position_bias_table",
                                            "rel_pos_bias.relative_position_index"]
    torch.manual_seed(0)
    mdt = MDTAttention(DIM, num_heads=HEADS, qkv_bias=True, num_patches=N)
    assert {k: v.shape for k, v in mdt.state_dict().items()} == \
        {k: v.shape for k, v in mdt_style.state_dict().items()}
    mdt_style.load_state_dict(mdt.state_dict(), strict=True)


def test_amm_active_follows_amm_and_amm_eval_only():
    attn = make(amm=True, amm_eval_only=False)
    attn.train()
    assert attn.amm_active()
    attn.amm_eval_only = True
    assert not attn.amm_active()
    attn.eval()
    assert attn.amm_active()
    attn.amm = None
    assert not attn.amm_active()


def test_amm_attention_backend_must_be_a_string():
    with pytest.raises(TypeError, match="backend must be a str"):
        AMMAttention(DIM, HEADS, grid=GRID, backend=None)
