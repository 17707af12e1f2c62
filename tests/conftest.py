"""Shared test set-up.

Without a CUDA device the Triton kernels run through Triton's interpreter,
which must be chosen before triton is first imported: we set
``TRITON_INTERPRET=1`` here (unless the caller set it either way).
"""
import os
import pathlib

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


def load_fixture(name: str):
    """Golden outputs of the authors' code (copied from ../shared/fixtures)."""
    path = FIXTURES / name
    if not path.exists():
        pytest.skip(f"fixture {name} not found in {FIXTURES}")
    if path.suffix == ".json":
        import json

        return json.loads(path.read_text())
    return torch.load(path, weights_only=False)


def triton_device() -> str:
    """Device on which the Triton backend runs in this session."""
    return "cuda" if _HAS_CUDA else "cpu"


@pytest.fixture
def device() -> str:
    return triton_device()


@pytest.fixture
def one_thread():
    """Tiny matmuls: one intra-op thread is faster and immune to a loaded CI box;
    the global RNG state is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.random.fork_rng():
        yield
    torch.set_num_threads(before)
