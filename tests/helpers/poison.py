"""The ``poison`` fixture: every output a Triton launcher allocates starts as NaN
(floating point) or -7777 (integers), so that an element a kernel does not write
shows up in the comparison.  A test module takes it with
``from helpers.poison import poison  # noqa: F401``."""
import pytest
import torch

INT_POISON = -7777


def poisoned_empty(shape, dtype, device) -> torch.Tensor:
    """``empty_output``'s signature, the memory filled with the poison of ``dtype``."""
    fill = float("nan") if dtype.is_floating_point else INT_POISON
    return torch.full(shape, fill, dtype=dtype, device=device)


@pytest.fixture
def poison(monkeypatch):
    """Launchers allocate through ``_triton_utils.empty_output`` only: it returns poisoned memory."""
    import edt_kernels.ops._triton_utils as triton_utils

    monkeypatch.setattr(triton_utils, "empty_output", poisoned_empty)
