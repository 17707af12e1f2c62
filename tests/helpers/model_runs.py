"""One forward + backward of a model under a random linear loss, the
comparison of two such runs (the patched-vs-original tests of
``test_patch.py`` and ``test_diffusers.py``), and weights that let a test see
the whole network."""
from typing import Dict, Optional, Tuple

import torch

Run = Tuple[torch.Tensor, Dict[str, Optional[torch.Tensor]]]


def run(model: torch.nn.Module, *args, manual_seed: Optional[int] = None, **kwargs) -> Run:
    """Output and gradients (the first input, ``"x"``, and every parameter, named
    without torch.compile's ``_orig_mod.`` prefix) of ``(out * w).sum()`` with a
    fixed random ``w``.  ``manual_seed``: the global seed set just before the
    forward (for models that draw random numbers in it).  A ``.sample``
    attribute of the output (diffusers' output classes) is the output."""
    model.zero_grad(set_to_none=True)
    x = args[0].clone().requires_grad_(True)
    if manual_seed is not None:
        torch.manual_seed(manual_seed)
    out = model(x, *args[1:], **kwargs)
    out = out.sample if hasattr(out, "sample") else out
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    (out * w).sum().backward()
    grads = {"x": x.grad}
    grads.update({n.removeprefix("_orig_mod."): p.grad for n, p in model.named_parameters()})
    return out.detach(), grads


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-zero weights everywhere (the published init zeroes adaLN gates and
    the output layer, which would hide most of the network from a test)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def assert_same_run(a: Run, b: Run, atol: float) -> None:
    """Same output and the same gradients (present for the same names), to ``atol`` and ``rtol = atol``."""
    (out_a, g_a), (out_b, g_b) = a, b
    torch.testing.assert_close(out_a, out_b, atol=atol, rtol=atol)
    assert g_a.keys() == g_b.keys()
    for name in g_a:
        assert (g_a[name] is None) == (g_b[name] is None), name
        if g_a[name] is not None:
            torch.testing.assert_close(g_a[name], g_b[name], atol=atol, rtol=atol, msg=lambda m: f"{name}: {m}")
