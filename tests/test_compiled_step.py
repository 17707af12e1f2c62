"""The training and sampling steps of EDT and MDTv2 drawn ahead and compiled whole
(``torch.compile(fullgraph=True)``) on tiny models: the same numbers as eager, no graph break,
and a bounded number of graphs for MDT's varying kept-token count."""
import contextlib
from collections import Counter

import pytest
import torch

from benchmarks.test_bench_host import HostTensors, _GraphCounter, recorded_launches
from edt.diffusion import create_diffusion
from edt.models import EDT_models, MDTv2_models
from edt.train import DiffusionTrainingLoss
from edt.utils import compile_step
from edt_kernels._triton_support import triton_unavailable_reason
from tests.helpers.model_runs import assert_same_run, randomize_
from tests.tolerances import GRAD_TOL

pytestmark = pytest.mark.usefixtures("one_thread")

B = 2
# EDT on backend "auto": the edt_kernels custom ops in the graph (opaque to Dynamo; the Triton
# interpreter runs them here).  MDTv2 on the PyTorch references ("torch"): its masked blocks take
# tens of seconds a step in the interpreter, and its 100-step test is about the kept counts.
TINY = {
    "EDT": lambda backend="auto": EDT_models["EDT-S/2"](input_size=8, hidden_size=16, dims=[16, 24, 32, 24, 16],
                                                        num_heads=[2, 2, 2, 2, 2], num_classes=10,
                                                        backend=backend),
    "MDTv2": lambda backend="torch": MDTv2_models["MDTv2-S/2"](input_size=8, hidden_size=16, depth=4, num_heads=2,
                                                               decode_layer=2, num_classes=10, backend=backend),
}


def _inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 4, 8, 8, generator=g)
    return (x, torch.randint(0, 10, (B,), generator=g), torch.randint(0, 1000, (B,), generator=g),
            torch.randn(x.shape, generator=g), torch.randn(x.shape, generator=g))


def _loss(family: str, **kw):
    """A tiny model with non-zero weights everywhere (so every parameter has a gradient) and its training loss."""
    torch.manual_seed(0)
    model = TINY[family](**kw).train()
    randomize_(model)
    return model, DiffusionTrainingLoss(model, create_diffusion(""), "edt" if family == "EDT" else "mdt")


def _step(loss, fn, seed: int):
    """Losses and parameter gradients of one training step (both passes) on ``seed``'s inputs and draws."""
    loss.model.zero_grad(set_to_none=True)
    x, y, t, n1, n2 = _inputs(seed)
    draws = loss.draw_ahead(B, torch.Generator().manual_seed(100 + seed), "cpu")
    out = fn(x, y, t, n1, n2, draws)
    out[0].backward()
    return out.detach(), {n: p.grad for n, p in loss.model.named_parameters()}


@pytest.mark.parametrize("family", ["MDTv2", "EDT"])
def test_drawn_ahead_forward_is_bit_equal_to_drawing_in_it(family):
    """The draws made ahead are the ones the forward makes from the same CPU generator, in its order."""
    model, _ = _loss(family)
    model.backend = "torch"  # the draws do not depend on the backend
    x, y, t, _, _ = _inputs(0)
    for mask in (False, True):
        want = model(x, t, y, enable_mask=mask, generator=torch.Generator().manual_seed(3))
        draws = model.draw_ahead(B, mask, torch.Generator().manual_seed(3), "cpu")
        assert torch.equal(model(x, t, y, enable_mask=mask, draws=draws), want)


@pytest.mark.parametrize("family", ["MDTv2", "EDT"])
def test_whole_step_traces_as_one_graph_and_mdt_kept_counts_stay_bounded(family):
    """fullgraph=True (a graph break raises) for the training step (full + masked pass) and
    forward_with_cfg; MDTv2: at most 8 graphs over 100 steps of new kept-token counts; EDT: one
    graph, though its first step is traced with the diffusion's device tables not yet made."""
    import torch._dynamo as dynamo

    model, loss = _loss(family)
    dynamo.reset()
    try:
        graphs = _GraphCounter()
        train = torch.compile(loss, fullgraph=True, backend=graphs)
        steps = 100 if family == "MDTv2" else 3
        kept = set()
        for s in range(steps):
            x, y, t, n1, n2 = _inputs(s)
            draws = loss.draw_ahead(B, torch.Generator().manual_seed(100 + s), "cpu")
            if family == "MDTv2":
                kept.add(draws[1].values[-2])
            train(x, y, t, n1, n2, draws)[0].backward()
        if family == "MDTv2":
            assert len(kept) >= 3, kept  # the count did change from step to step
        assert graphs.graphs <= (8 if family == "MDTv2" else 1), graphs.graphs
        model.eval()
        cfg_graphs = _GraphCounter()
        cfg = torch.compile(model.forward_with_cfg, fullgraph=True, backend=cfg_graphs)
        with torch.no_grad():
            cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 10)]), 1.5)
        assert cfg_graphs.graphs == 1
    finally:
        dynamo.reset()


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_amm_table_is_a_constant_of_the_compiled_sampling_step(backend, monkeypatch, kernels_env):
    """EDT's forward_with_cfg (AMM on) compiled before any AMM table was made: the table is made
    once, eagerly, while the graph is traced, and is a constant of it.  Dynamo never traces the
    table's construction (here it would raise: fullgraph), so no graph rebuilds the table and
    copies it to the device per call; one graph serves every call, with eager's numbers."""
    import torch._dynamo as dynamo
    from edt_kernels import amm
    from edt_kernels.ops import _attention_op

    kernels_env("EDT_KERNELS_BACKEND", None if backend == "auto" else backend)
    made = []

    def build_untraceable(*args):
        torch._dynamo.graph_break()  # a no-op when run eagerly; a traced call fails under fullgraph
        made.append(args)
        return build(*args)

    build = amm._amm_offset_table_cpu
    monkeypatch.setattr(amm, "_amm_offset_table_cpu", build_untraceable)
    monkeypatch.setattr(_attention_op, "_amm_tables", {})
    amm._amm_offset_table_on.__wrapped__.cache_clear()
    model, _ = _loss("EDT")
    model.eval()
    x, y, t, _, _ = _inputs(1)
    args = (torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 10)]), 1.5)
    graphs = _GraphCounter()
    dynamo.reset()
    try:
        step = torch.compile(model.forward_with_cfg, fullgraph=True, backend=graphs)
        with torch.no_grad():
            got = [step(*args) for _ in range(2)]
    finally:
        dynamo.reset()
        amm._amm_offset_table_on.__wrapped__.cache_clear()  # no table made by the patched builder stays
    assert graphs.graphs == 1 and len(made) >= 1
    with torch.no_grad():
        want = model.forward_with_cfg(*args)
    for out in got:
        torch.testing.assert_close(out, want, atol=0, rtol=0)


def test_constant_while_traced_gives_each_traced_call_its_constant():
    """Two different tensors of one function, and one of them twice, in one graph through
    AOTAutograd; made once per traced call, never per call of the compiled function."""
    import torch._dynamo as dynamo
    from edt_kernels._tracing import constant_while_traced

    made = []

    @constant_while_traced
    def table(n: int, scale: float = 1.0) -> torch.Tensor:
        made.append(n)
        return torch.arange(n, dtype=torch.float32) * scale

    def f(x):
        return x * table(3).sum() + x * table(4, scale=2.0).sum() + x * table(3)[1]

    x = torch.ones(2)
    dynamo.reset()
    try:
        compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
        got = [compiled(x) for _ in range(3)]
    finally:
        dynamo.reset()
    assert made == [3, 4, 3]
    for out in got:
        assert torch.equal(out, f(x))


class _Everything:
    """Every kernel name: ``recorded_launches`` counts each launch and runs it."""

    def __contains__(self, name) -> bool:
        return True


@pytest.mark.parametrize("family,kernels", [("EDT", "auto"), ("EDT", "triton"), ("MDTv2", "triton")])
def test_compiled_step_matches_eager(family, kernels, kernels_env):
    """Inductor (compile_step's default mode) on the training step (forward, loss, backward; the
    custom ops in the graph) and on forward_with_cfg: eager's numbers; the module's state_dict
    keys are untouched.  ``auto`` takes the C++ kernels on this CPU; ``triton`` the Triton custom
    ops that a GPU's compiled step calls (run by the interpreter here), with MDT's masked pass and
    its kept positions.  (Inductor costs minutes on this CPU per graph pair: one model each.)"""
    import torch._dynamo as dynamo

    if kernels == "triton":
        why = triton_unavailable_reason()
        if why:
            pytest.skip(why)
        kernels_env("EDT_KERNELS_BACKEND", "triton")
    model, loss = _loss(family, backend="auto")
    keys = list(model.state_dict())
    atol = GRAD_TOL[torch.float32][0]
    launches = Counter()
    dynamo.reset()
    try:
        compiled = compile_step(loss, "reduce-overhead", torch.device("cpu"))  # = default on the CPU
        with recorded_launches(launches, execute=_Everything()):
            got = _step(loss, compiled, 0)
        want = _step(loss, loss, 0)
        silent = [n for n, g in want[1].items() if g is not None and not g.any()]
        assert not silent, f"parameters the comparison cannot see (zero gradient): {silent}"
        assert_same_run(got, want, atol)
        model.eval()
        x, y, t, _, _ = _inputs(1)
        args = (torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 10)]), 1.5)
        with torch.no_grad():
            want = model.forward_with_cfg(*args)
            with recorded_launches(launches, execute=_Everything()):
                got = compile_step(model.forward_with_cfg, "default", torch.device("cpu"))(*args)
        torch.testing.assert_close(got, want, atol=atol, rtol=atol)
    finally:
        dynamo.reset()
    assert list(model.state_dict()) == keys
    attention = {k for k in launches if k.startswith("triton._amm_attn_")}
    if kernels == "triton":  # the compiled graphs ran the Triton attention, forward and backward
        assert {"triton._amm_attn_fwd_kernel", "triton._amm_attn_bwd_dq_kernel"} <= attention, launches
    else:
        assert not attention, launches


def _host_tensor_nodes(graphs) -> list:
    """The nodes of FX graphs whose value is a host (CPU) tensor of at least one dimension."""
    found = []
    for gm in graphs:
        for node in gm.graph.nodes:
            vals = node.meta.get("val")
            for v in vals if isinstance(vals, (list, tuple)) else [vals]:
                if isinstance(v, torch.Tensor) and v.device.type == "cpu" and v.dim() > 0:
                    found.append(f"{node.op} {node.target} {tuple(v.shape)}")
    return found


@pytest.mark.parametrize("family", ["EDT", "MDTv2"])
def test_steps_read_and_make_no_host_tensor(family):
    """Model, inputs and draws on the meta device, where a tensor has no data but says where it
    lives: after a first step has made the per-device tables, the eager training step (both
    passes, the loss, backward) and the CFG sampling loop read and make no host tensor; nor do
    the compiled training and CFG graphs (AOTAutograd's forward and backward), the way
    Inductor's CUDA-graph check reads them, and no compiled step mutates its inputs.  On a GPU
    such a tensor is a copy between host and device (from pageable memory it waits for the
    device) or host work inside the step, and in a compiled step it keeps the step from being
    one CUDA graph.  The PyTorch references stand in for the kernels, which do not run on meta."""
    import torch._dynamo as dynamo
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._guards import TracingContext

    meta = torch.device("meta")
    model, loss = _loss(family)
    model.backend = "torch"
    model.to(meta)
    x, y, t, n1, n2 = (a.to(meta) for a in _inputs(0))

    def train_step(fn, watch=True):
        draws = loss.draw_ahead(B, torch.Generator().manual_seed(100), meta)  # before the step, as edt.train
        with HostTensors() if watch else contextlib.nullcontext() as seen:
            fn(x, y, t, n1, n2, draws)[0].backward()
        return seen.ops if watch else None

    train_step(loss)  # makes the diffusion's device tables
    assert train_step(loss) == {}

    sampler = create_diffusion("4")
    cfg_args = (torch.cat([y, torch.full_like(y, 10)]), 1.5)
    model.eval()

    def sample_loop():
        z = torch.zeros(2 * B, 4, 8, 8, device=meta)
        with torch.no_grad(), HostTensors() as seen:
            sampler.p_sample_loop(model.forward_with_cfg, tuple(z.shape), z, clip_denoised=False,
                                  model_kwargs=dict(y=cfg_args[0], cfg_scale=cfg_args[1]), device=meta)
        return seen.ops

    sample_loop()
    assert sample_loop() == {}

    graphs, mutated = [], []

    def keep(gm, example_inputs):
        graphs.append(gm)
        info = TracingContext.try_get().fw_metadata.input_info  # AOTAutograd applies mutations outside the graph
        mutated.extend(i for i, inp in enumerate(info) if inp.mutates_data or inp.mutates_metadata)
        return make_boxed_func(gm.forward)

    backend = aot_autograd(fw_compiler=keep, bw_compiler=keep)
    dynamo.reset()
    try:
        model.train()
        train_step(torch.compile(loss, fullgraph=True, backend=backend), watch=False)  # Dynamo refuses the mode
        model.eval()
        with torch.no_grad():
            torch.compile(model.forward_with_cfg, fullgraph=True, backend=backend)(
                torch.cat([x, x]), torch.cat([t, t]), *cfg_args)
    finally:
        dynamo.reset()
    assert len(graphs) >= 3  # training forward and backward, CFG forward
    assert _host_tensor_nodes(graphs) == []
    assert mutated == []  # Inductor's other reason to leave a step out of CUDA graphs


def test_compile_mode_is_checked():
    with pytest.raises(ValueError, match="compile mode"):
        compile_step(torch.nn.Linear(2, 2), "fast", torch.device("cpu"))


def test_frozen_sampling_step_packs_each_table_once(monkeypatch):
    """``frozen(model)`` (the benchmarks' CFG steps, as edt.sample's frozen model): inside it no
    parameter takes a gradient, so a second sampling step re-uses every packed attention table;
    after it (also after an error) exactly the parameters that took one take one again."""
    from edt.utils import frozen
    from edt_kernels.ops import amm_attention as triton_op

    if triton_unavailable_reason():
        pytest.skip(triton_unavailable_reason())
    builds = []
    build = triton_op._build_grid
    monkeypatch.setattr(triton_op, "_build_grid", lambda *a: builds.append(1) or build(*a))
    model, _ = _loss("EDT", backend="triton")
    model.eval()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and len(trainable) < len(list(model.parameters()))  # pos_embed takes none
    x, y, t, _, _ = _inputs(1)
    args = (torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 10)]), 1.5)
    with torch.no_grad():
        model.forward_with_cfg(*args)
        unfrozen = len(builds)
        model.forward_with_cfg(*args)
        assert len(builds) == 2 * unfrozen > 0  # a trainable table is packed at every call
        with frozen(model):
            model.forward_with_cfg(*args)
            n = len(builds)
            model.forward_with_cfg(*args)
            assert len(builds) == n
    with pytest.raises(RuntimeError, match="inside"), frozen(model):
        assert not any(p.requires_grad for p in model.parameters())
        raise RuntimeError("inside")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
