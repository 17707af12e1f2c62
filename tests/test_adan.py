"""The Adan of ``--optimizer adan`` against the authors' Adan (sail-sg/Adan ``adan.py``, the optimiser
xinwangChen/EDT's ``train_mask_adan.py`` imports).

``fixtures/adan_trajectories.json`` holds the parameters after each of six steps of the authors'
``Adan`` (``foreach=False``, float64) on a fixed gradient sequence, for four settings: no weight
decay, their default weight decay (``no_prox=False``: ``p / (1 + lr wd)`` after the step), the
decoupled form (``no_prox=True``: ``p (1 - lr wd)`` before it), and their global gradient-norm
clipping (``max_grad_norm``). The numbers were produced once by running their file; the gradients
and the initial parameters are in the file too.
"""
import json
from pathlib import Path

import pytest
import torch

from edt.train import make_optimizer

FIXTURE = Path(__file__).parent / "fixtures" / "adan_trajectories.json"


def _cases():
    data = json.loads(FIXTURE.read_text())
    return data, [pytest.param(c, id=c["name"]) for c in data["cases"]]


DATA, CASES = _cases()


def _optimizer(params, case, foreach):
    if not case["no_prox"] and case["max_grad_norm"] == 0:
        opt = make_optimizer("adan", params, case["lr"], case["weight_decay"])  # what edt.train builds
        for group in opt.param_groups:
            group["foreach"] = foreach
        return opt
    from pytorch_optimizer import Adan

    return Adan(params, lr=case["lr"], betas=tuple(DATA["betas"]), eps=DATA["eps"],
                weight_decay=case["weight_decay"], weight_decouple=case["no_prox"],
                max_grad_norm=case["max_grad_norm"], foreach=foreach)


@pytest.mark.parametrize("foreach", [False, None], ids=["per-param", "default"])
@pytest.mark.parametrize("case", CASES)
def test_adan_follows_the_authors_trajectory(case, foreach):
    shapes = [tuple(s) for s in DATA["shapes"]]
    params = [torch.nn.Parameter(torch.tensor(v, dtype=torch.float64).reshape(s))
              for v, s in zip(DATA["init"], shapes)]
    opt = _optimizer(params, case, foreach)
    assert opt.param_groups[0]["betas"] == (0.98, 0.92, 0.99) and opt.param_groups[0]["eps"] == 1e-8
    for k, (grads, expected) in enumerate(zip(DATA["grads"], case["params"])):
        for p, g, s in zip(params, grads, shapes):
            p.grad = torch.tensor(g, dtype=torch.float64).reshape(s)
        opt.step()
        for i, (p, e) in enumerate(zip(params, expected)):
            # the same operations in another order (lerp for mul + add): float64 rounding only
            torch.testing.assert_close(p.detach().flatten(), torch.tensor(e, dtype=torch.float64),
                                       rtol=1e-12, atol=1e-14, msg=lambda m: f"step {k + 1}, param {i}: {m}")
    # the steps moved the parameters: a trajectory that stayed put would not test the update
    assert not torch.equal(params[0].detach().flatten(), torch.tensor(DATA["init"][0], dtype=torch.float64))
