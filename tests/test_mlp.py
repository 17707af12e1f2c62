"""edt_kernels.mlp_gelu_tanh (the block MLP keeping x and the pre-activation
only) and the lean torch backends of layernorm_modulate and
patch_merge_modulate (x and the row statistics only): the reference's forward
bit for bit, float64 gradients against the reference, what the backward
keeps, bad input."""
import pytest
import torch

from edt_kernels import layernorm_modulate, mlp_gelu_tanh, patch_merge_modulate
from edt_kernels.reference import (reference_layernorm_modulate, reference_mlp_gelu_tanh,
                                   reference_patch_merge_modulate)
from tolerances import GRAD_TOL, assert_close


def _saved(fn):
    """(fn(), [shapes of the tensors saved for backward])."""
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, shapes


def _mlp_inputs(dtype, bias=True, C=20, H=52, Co=20):
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=dtype).requires_grad_(True)  # noqa: E731
    return (mk(2, 7, C), mk(H, C) * 0.3, mk(H) if bias else None, mk(Co, H) * 0.3, mk(Co) if bias else None)


def _leafify(ts):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in ts]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_mlp_float64_forward_and_gradients(bias):
    args = _leafify(_mlp_inputs(torch.float64, bias))
    ref_args = _leafify(args)
    out = mlp_gelu_tanh(*args)
    ref = reference_mlp_gelu_tanh(*ref_args)
    assert torch.equal(out, ref)  # same ops in the same order
    w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    for a, r in zip(args, ref_args):
        if r is not None:
            assert_close(a.grad, r.grad, torch.float64, GRAD_TOL, name="mlp grad")


def test_mlp_keeps_no_activation():
    args = _leafify(_mlp_inputs(torch.float32))
    _, lean = _saved(lambda: mlp_gelu_tanh(*args))
    _, ref = _saved(lambda: mlp_gelu_tanh(*args, backend="eager"))
    assert sorted(lean) == [(2, 7, 20), (2, 7, 52), (20, 52), (52, 20)]  # x, h = fc1(x), w1, w2
    assert len([s for s in ref if s == (2, 7, 52) or s == (14, 52)]) == 2  # the reference: h and GELU(h)


def test_mlp_float32_matches_eager_and_autocast_dtypes():
    args = _leafify(_mlp_inputs(torch.float32))
    ref_args = _leafify(args)
    out, ref = mlp_gelu_tanh(*args), mlp_gelu_tanh(*ref_args, backend="eager")
    assert torch.equal(out, ref)
    out.sum().backward()
    ref.sum().backward()
    for a, r in zip(args, ref_args):
        assert_close(a.grad, r.grad, torch.float32, GRAD_TOL, name="mlp grad float32")
        assert a.grad.dtype == a.dtype


def test_mlp_bad_input():
    x, w1, b1, w2, b2 = _mlp_inputs(torch.float32)
    with pytest.raises(ValueError, match="w1"):
        mlp_gelu_tanh(x, w1.t(), b1, w2, b2)
    with pytest.raises(ValueError, match="b2"):
        mlp_gelu_tanh(x, w1, b1, w2, b1)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        mlp_gelu_tanh([1.0], w1, b1, w2, b2)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        mlp_gelu_tanh(x.long(), w1, b1, w2, b2)
    with pytest.raises(ValueError, match="x must be"):
        mlp_gelu_tanh(torch.tensor(1.0), w1, b1, w2, b2)
    with pytest.raises(TypeError, match="b1 must be a torch.Tensor"):
        mlp_gelu_tanh(x, w1, b1.tolist(), w2, b2)
    with pytest.raises(TypeError, match="w1 must have the dtype of x"):
        mlp_gelu_tanh(x, w1.double(), b1, w2, b2)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts the weights itself
        assert mlp_gelu_tanh(x.detach().bfloat16(), w1, b1, w2, b2).dtype == torch.bfloat16


def _ln_inputs(dtype):
    g = torch.Generator().manual_seed(2)
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_(True) for s in ((3, 9, 37), (3, 37), (3, 37))]


def _assert_lean_is_reference(lean, reference, args, name: str):
    """``lean(*args)`` is ``reference`` on copies of ``args`` bit for bit, and
    their float64 gradients under a random loss agree."""
    ref_args = _leafify(args)
    out, ref = lean(*args), reference(*ref_args)
    assert torch.equal(out, ref)
    w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    for a, r in zip(args, ref_args):
        assert_close(a.grad, r.grad, torch.float64, GRAD_TOL, name=f"{name} grad")


def test_layernorm_modulate_torch_backend_float64():
    _assert_lean_is_reference(lambda *a: layernorm_modulate(*a, 1e-6, backend="torch"),
                              lambda *a: reference_layernorm_modulate(*a, 1e-6), _ln_inputs(torch.float64),
                              "layernorm_modulate")


def test_layernorm_modulate_torch_keeps_x_and_statistics():
    args = _ln_inputs(torch.float32)
    h = args[0] * 1.0  # a non-leaf input, as in a model
    _, lean = _saved(lambda: layernorm_modulate(h, args[1], args[2], backend="torch"))
    _, ref = _saved(lambda: layernorm_modulate(h, args[1], args[2], backend="eager"))
    assert [s for s in lean if s == (3, 9, 37)] == [(3, 9, 37)]  # x only, no normalised copy
    assert len([s for s in ref if s == (3, 9, 37)]) == 2  # x and the normalised rows


def test_layernorm_modulate_torch_backend_partial_requires_grad():
    x, shift, scale = _ln_inputs(torch.float64)
    out = layernorm_modulate(x, shift.detach(), scale.detach(), backend="torch")
    out.sum().backward()
    ref_x = x.detach().clone().requires_grad_(True)
    reference_layernorm_modulate(ref_x, shift.detach(), scale.detach()).sum().backward()
    assert_close(x.grad, ref_x.grad, torch.float64, GRAD_TOL, name="dx")


MERGE_GRID, MERGE_C = (4, 6), 5


def _merge_inputs(dtype, keep: str):
    """x [2, 24, 5] on a 4 x 6 grid, shift and scale [2, 20], and a keep mask
    per input token ("source"), per merged token ("merged") or None."""
    g = torch.Generator().manual_seed(4)
    L = MERGE_GRID[0] * MERGE_GRID[1]
    x, shift, scale = (torch.randn(s, generator=g, dtype=dtype).requires_grad_(True)
                       for s in ((2, L, MERGE_C), (2, 4 * MERGE_C), (2, 4 * MERGE_C)))
    mask = None if keep == "none" else torch.rand(2, L if keep == "source" else L // 4, generator=g) >= 0.4
    return [x, shift, scale], mask


@pytest.mark.parametrize("keep", ["none", "source", "merged"])
def test_patch_merge_modulate_torch_backend_float64(keep):
    args, mask = _merge_inputs(torch.float64, keep)
    _assert_lean_is_reference(lambda *a: patch_merge_modulate(*a, mask, grid=MERGE_GRID, backend="torch"),
                              lambda *a: reference_patch_merge_modulate(*a, mask, MERGE_GRID), args,
                              "patch_merge_modulate")


def test_patch_merge_modulate_torch_keeps_x_and_statistics():
    args, mask = _merge_inputs(torch.float32, "source")
    h = args[0] * 1.0  # a non-leaf input, as in a model
    _, lean = _saved(lambda: patch_merge_modulate(h, args[1], args[2], mask, grid=MERGE_GRID, backend="torch"))
    _, ref = _saved(lambda: patch_merge_modulate(h, args[1], args[2], mask, grid=MERGE_GRID, backend="eager"))
    # x, scale, mean, rstd and the mask as given: no merged, normalised or channel-spread copy
    assert sorted(lean) == sorted([(2, 24, 5), (2, 20), (2, 6, 1), (2, 6, 1), (2, 24)])
    assert len([s for s in ref if s == (2, 6, 20)]) == 3  # merged, normalised rows, the spread mask


def test_patch_merge_modulate_torch_backend_partial_requires_grad():
    (x, shift, scale), mask = _merge_inputs(torch.float64, "merged")
    out = patch_merge_modulate(x, shift.detach(), scale.detach(), mask, grid=MERGE_GRID, backend="torch")
    out.sum().backward()
    ref_x = x.detach().clone().requires_grad_(True)
    reference_patch_merge_modulate(ref_x, shift.detach(), scale.detach(), mask, MERGE_GRID).sum().backward()
    assert_close(x.grad, ref_x.grad, torch.float64, GRAD_TOL, name="dx")
