"""Activation checkpointing (``checkpoint=`` on EDT and MDTv2): the same
outputs and gradients, bit for bit, as the run without it (float64 on the
authors' path, float32 on the kernels, masked passes with their random draws
from the global RNG and from a generator), fewer bytes kept for the backward,
torch.compile, and bad settings."""
import pytest
import torch

from edt.models import EDT, MDTv2
from edt.models.checkpointing import CheckpointSetting, parse_checkpoint, run_block
from helpers.model_runs import randomize_
from test_models import EAGER, TINY, TRITON_CASES

SETTINGS = ["all", 2, "selective"]


def _model(kind, checkpoint, backend, dtype, **overrides):
    cls, config = TINY[kind]
    torch.manual_seed(0)
    model = cls(**dict(config, **overrides), backend=backend, checkpoint=checkpoint)
    randomize_(model)
    return model.to(dtype).train()


def _step(model, dtype, seed_mode: str, batch: int = 3):
    """Output and gradients of one masked training forward (+ the unmasked one)
    under a fixed random loss; the masks come from the global RNG
    (``seed_mode="global"``) or from a generator."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, model.in_channels, model.input_size, model.input_size, generator=g).to(dtype)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, model.num_classes, (batch,), generator=g)
    w = torch.randn(x.shape[0], model.out_channels, *x.shape[2:], generator=g).to(dtype)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    gen = torch.Generator().manual_seed(3) if seed_mode == "generator" else None
    full = model(x, t, y, generator=gen)
    masked = model(x, t, y, enable_mask=True, generator=gen)
    ((full + masked) * w).sum().backward()
    return (full.detach(), masked.detach()), {n: p.grad for n, p in model.named_parameters()}


def _assert_identical(a, b):
    (outs_a, grads_a), (outs_b, grads_b) = a, b
    for oa, ob in zip(outs_a, outs_b):
        assert torch.equal(oa, ob)
    assert grads_a.keys() == grads_b.keys()
    for n in grads_a:
        assert (grads_a[n] is None) == (grads_b[n] is None), n
        if grads_a[n] is not None:
            assert torch.equal(grads_a[n], grads_b[n]), f"{n}: max diff {(grads_a[n] - grads_b[n]).abs().max()}"


@pytest.mark.parametrize("seed_mode", ["global", "generator"])
@pytest.mark.parametrize("setting", SETTINGS, ids=str)
@pytest.mark.parametrize("kind", ["EDT-XL", "MDTv2"])
def test_bit_equal_float64_eager(kind, setting, seed_mode):
    ref = _step(_model(kind, None, EAGER, torch.float64), torch.float64, seed_mode)
    got = _step(_model(kind, setting, EAGER, torch.float64), torch.float64, seed_mode)
    _assert_identical(got, ref)


@pytest.mark.parametrize("kind,setting", [("EDT", "all"), ("MDTv2", "selective")])
def test_bit_equal_on_the_kernels(kind, setting):
    """The kernels' Triton backend (the interpreter on CPU), float32."""
    from edt_kernels import available_backends

    if "triton" not in available_backends():
        pytest.skip("triton backend not available (triton not importable)")
    case = TRITON_CASES[kind]
    ref = _step(_model(kind, None, "triton", torch.float32, **case), torch.float32, "global", 2)
    got = _step(_model(kind, setting, "triton", torch.float32, **case), torch.float32, "global", 2)
    _assert_identical(got, ref)


def _saved_bytes(model) -> int:
    """Bytes of the unique non-parameter storages saved for backward by one masked forward."""
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    x = torch.randn(2, model.in_channels, model.input_size, model.input_size)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x, torch.tensor([1, 2]), torch.tensor([0, 1]), enable_mask=True)
    out.sum().backward()
    return sum(n for p, n in storages.items() if p not in params)


@pytest.mark.parametrize("kind", ["EDT", "MDTv2"])
def test_checkpointing_keeps_fewer_bytes(kind):
    none, every2, every, selective = (_saved_bytes(_model(kind, s, EAGER, torch.float32))
                                      for s in (None, 2, "all", "selective"))
    assert every < every2 < none
    assert selective < none


def test_no_recompute_without_grad():
    model = _model("EDT", "all", EAGER, torch.float32).eval()
    x = torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        a = model(x, torch.tensor([1, 2]), torch.tensor([0, 1]))
    model.checkpoint = parse_checkpoint(None)
    with torch.no_grad():
        assert torch.equal(a, model(x, torch.tensor([1, 2]), torch.tensor([0, 1])))


class _Blocks(torch.nn.Module):
    """Two blocks run through run_block, as the models run theirs."""

    def __init__(self, setting):
        super().__init__()
        from edt.models.common import AdaLNBlock

        self.blocks = torch.nn.ModuleList([AdaLNBlock(16, 2, 4, backend=EAGER) for _ in range(2)])
        self.setting = parse_checkpoint(setting)

    def forward(self, x, c):
        for i, blk in enumerate(self.blocks):
            x = run_block(blk, i, self.setting, x, c)
        return x


@pytest.mark.parametrize("setting", ["all", "selective"])
def test_compiled_checkpointed_blocks(setting):
    """torch.compile (dynamo + AOT autograd; the aot_eager backend keeps the
    test fast) of checkpointed blocks: the results of the uncompiled run."""
    torch._dynamo.reset()
    ref_model, model = _Blocks(None), _Blocks(setting)
    randomize_(ref_model)
    model.load_state_dict(ref_model.state_dict())
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(2, 16, 16, generator=g), torch.randn(2, 16, generator=g)
    ref = ref_model(x, c)
    out = torch.compile(model, backend="aot_eager", fullgraph=True)(x, c)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    ref.square().sum().backward()
    out.square().sum().backward()
    for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-5, msg=lambda m: f"{n}: {m}")


def test_settings_parse_and_bad_values():
    assert parse_checkpoint(None) == parse_checkpoint("none") == CheckpointSetting()
    assert parse_checkpoint("all") == parse_checkpoint(1) == parse_checkpoint("1") == CheckpointSetting(1)
    assert parse_checkpoint(3).covers(3) and not parse_checkpoint(3).covers(4)
    assert parse_checkpoint("selective") == CheckpointSetting(1, selective=True)
    assert str(parse_checkpoint(2)) == "every 2"
    with pytest.raises(ValueError, match="checkpoint"):
        parse_checkpoint("some")
    with pytest.raises(ValueError, match="k >= 1"):
        parse_checkpoint(0)
    with pytest.raises(TypeError, match="checkpoint"):
        parse_checkpoint(True)
    with pytest.raises(TypeError, match="checkpoint"):
        EDT(**TINY["EDT"][1], checkpoint=1.5)
    assert MDTv2(**TINY["MDTv2"][1], checkpoint="all").config["checkpoint"] == "all"
