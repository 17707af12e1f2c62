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

# Tests of the Triton kernels: marked ``triton`` here (``pytest -m triton`` runs
# them alone, as CI does for each triton version of the supported range).
TRITON_TEST_FILES = {"test_amm_attention.py", "test_tokens.py", "test_adaln.py", "test_compile_sm90.py"}
COMPILE_TEST_FILES = {"test_compile_sm90.py"}  # compile in a subprocess, without the interpreter


def _triton_reasons():
    """(why interpreter/in-process tests cannot run, why compile-only tests cannot run)."""
    from edt_kernels._triton_support import check_versions, installed_versions, triton_unavailable_reason

    tv, nv = installed_versions()
    return triton_unavailable_reason(), check_versions(tv, nv, interpret=False)


class _SkippedTritonModule(pytest.Module):
    """A Triton test file that is not imported (its kernels cannot load here)."""

    skip_reason = ""

    def collect(self):
        pytest.skip(self.skip_reason)


def pytest_pycollect_makemodule(module_path, parent):
    """Where the installed triton cannot run here (too old, or an interpreter that
    does not work with the installed numpy), skip each Triton test file with that
    one reason at collection instead of letting every test fail inside Triton."""
    name = module_path.name
    if name not in TRITON_TEST_FILES:
        return None
    in_process, compiled = _triton_reasons()
    why = compiled if name in COMPILE_TEST_FILES else in_process
    if not why:
        return None
    module = _SkippedTritonModule.from_parent(parent, path=module_path)
    module.skip_reason = f"Triton tests skipped: {why}"
    module.add_marker(pytest.mark.triton)
    return module


def pytest_collection_modifyitems(config, items):
    """Mark the Triton tests (``-m triton``)."""
    for item in items:
        if item.path.name in TRITON_TEST_FILES or "_on_triton" in item.name:
            item.add_marker(pytest.mark.triton)


def pytest_report_header(config):
    in_process, _ = _triton_reasons()
    return f"edt-kernels triton check: {in_process or 'usable'}"


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


@pytest.fixture(autouse=True)
def _kernel_settings():
    """Every test starts and ends with the settings of the environment (``edt_kernels.refresh``)."""
    yield
    from edt_kernels import refresh

    refresh()


@pytest.fixture
def kernels_env(monkeypatch):
    """``kernels_env(name, value)`` sets an ``EDT_KERNELS_*`` variable for this test
    (``value=None`` removes it) and has the package read the environment again: the
    settings are read once per process, at import (``edt_kernels.refresh``)."""
    from edt_kernels import refresh

    def set_env(name: str, value=None):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
        refresh()

    return set_env
