"""What a user installs: the supported Triton range and the wheel.

- ``check_versions``: the rule that decides whether the installed triton can
  run the kernels (too old; interpreter with a numpy it does not work with);
- with such a triton, ``import edt_kernels`` still works and the Triton
  backend is refused with that reason (simulated versions, in a subprocess);
- the sdist and the wheel carry ``csrc/``; the wheel, installed into a fresh
  venv, builds and runs the ``cpp`` backend from outside the checkout.
"""
import json
import os
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

from edt_kernels import _triton_support as TS

ROOT = Path(__file__).resolve().parent.parent
CSRC = sorted(p.name for p in (ROOT / "csrc").iterdir() if p.suffix in (".cpp", ".h", ".cu", ".cuh"))


# ----------------------------------------------------------------------------- version rule

@pytest.mark.parametrize("triton,numpy,interpret,expect", [
    (None, "2.4.6", True, "triton is not installed"),
    ("3.3.1", "2.3.5", False, "older than 3.6"),
    ("3.5.0", "2.3.5", True, "older than 3.6"),
    ("3.6.0", "2.4.6", True, "pip install 'numpy<2.4'"),
    ("3.6.0+git5f0a1b2", "2.4.0", True, "pip install 'numpy<2.4'"),
    ("3.6.0", "2.4.6", False, None),   # compiled kernels do not use numpy that way
    ("3.6.0", "2.3.5", True, None),
    ("3.7.1", "2.4.6", True, None),
    ("3.9.0", "2.4.6", True, None),
])
def test_check_versions(triton, numpy, interpret, expect):
    why = TS.check_versions(triton, numpy, interpret)
    if expect is None:
        assert why is None
    else:
        assert why is not None and expect in why
        assert why.count("\n") == 0


def test_declared_range_matches_pyproject():
    text = (ROOT / "pyproject.toml").read_text()
    assert f'"triton{TS.SUPPORTED_RANGE}; platform_system == \'Linux\'"' in text


def test_parse_version():
    assert TS.parse_version("3.6.0") == (3, 6, 0)
    assert TS.parse_version("3.10.0rc1") == (3, 10, 0)
    assert TS.parse_version("3.6.0+git1234") == (3, 6, 0)


SIMULATE = textwrap.dedent(r"""
    import json, sys, torch
    from importlib import metadata
    real = metadata.version
    fake = {"triton": sys.argv[1], "numpy": sys.argv[2]}   # what an old/mismatched install reports
    metadata.version = lambda name: fake.get(name) or real(name)
    import edt_kernels as E
    out = {"backends": E.available_backends()}
    q = torch.randn(1, 2, 4, 8)
    try:
        E.amm_attention(q, q, q, backend="triton")
    except ValueError as exc:
        out["attention_error"] = str(exc)
    try:
        E.layernorm_modulate(torch.randn(1, 4, 8), torch.randn(1, 8), torch.randn(1, 8), backend="triton")
    except ValueError as exc:
        out["adaln_error"] = str(exc)
    x, s, c = torch.randn(1, 4, 8), torch.randn(1, 8), torch.randn(1, 8)
    ref = torch.nn.functional.layer_norm(x, (8,), eps=1e-6) * (1 + c[:, None]) + s[:, None]
    out["auto_ok"] = bool(torch.allclose(E.layernorm_modulate(x, s, c), ref, atol=1e-5))
    print("RESULT" + json.dumps(out))
""")


@pytest.mark.parametrize("triton,numpy,interpret,expect", [
    ("3.3.1", "2.4.6", "0", "older than 3.6"),
    ("3.6.0", "2.4.6", "1", "pip install 'numpy<2.4'"),
])
def test_unusable_triton_costs_the_backend_not_the_import(triton, numpy, interpret, expect):
    env = dict(os.environ, TRITON_INTERPRET=interpret, PYTHONPATH=str(ROOT), EDT_KERNELS_BACKEND="auto",
               EDT_KERNELS_JIT="0")  # no C++ build: only the Triton backend is in question
    proc = subprocess.run([sys.executable, "-c", SIMULATE, triton, numpy], env=env, capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1][6:])
    assert "triton" not in out["backends"] and "torch" in out["backends"]
    assert expect in out["attention_error"] and expect in out["adaln_error"]
    assert out["auto_ok"]


# ----------------------------------------------------------------------------- sdist and wheel

def _copy_sources(dest: Path) -> Path:
    """The tracked files of the checkout (no build/, no egg-info, no caches)."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=False)
    if files.returncode != 0:
        pytest.skip("not a git checkout: cannot list the tracked files")
    names = [n for n in files.stdout.decode().split("\0") if n]
    for name in set(names):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes(src.read_bytes())
    return dest


def _run(cmd, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """sdist from a copy of the checkout, then the wheel built from that sdist."""
    tmp = tmp_path_factory.mktemp("dist")
    src = _copy_sources(tmp / "src")
    dist = tmp / "dist"
    dist.mkdir()
    _run([sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_sdist({str(dist)!r})"],
         cwd=src, timeout=300)
    sdist = next(dist.glob("*.tar.gz"))
    with tarfile.open(sdist) as tf:
        tf.extractall(tmp / "unpacked", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    unpacked = next((tmp / "unpacked").iterdir())
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
          "-w", str(dist), str(unpacked)], cwd=tmp, timeout=600)
    return tmp, sdist, next(dist.glob("*.whl"))


@pytest.mark.slow
def test_sdist_and_wheel_carry_csrc(built):
    _, sdist, wheel = built
    with tarfile.open(sdist) as tf:
        in_sdist = {Path(n).name for n in tf.getnames() if "/csrc/" in n}
    with zipfile.ZipFile(wheel) as zf:
        in_wheel = {Path(n).name for n in zf.namelist() if n.startswith("edt_kernels/csrc/")}
        names = zf.namelist()
    assert CSRC and set(CSRC) <= in_sdist, sorted(set(CSRC) - in_sdist)
    assert set(CSRC) <= in_wheel, sorted(set(CSRC) - in_wheel)
    assert "edt_kernels/_triton_support.py" in names and any(n.startswith("edt/") for n in names)


RUN_CPP = textwrap.dedent(r"""
    import json, torch, edt_kernels
    from edt_kernels import _ext, amm_attention, reference_attention
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 16, 8, generator=g, dtype=torch.float64) for _ in range(3))
    table = torch.randn(49, 3, generator=g, dtype=torch.float64)
    out = amm_attention(q, k, v, rel_pos_bias=table, grid=4, amm=True, backend="cpp")
    ref = reference_attention(q, k, v, rel_pos_bias=table, grid=4, amm=True)
    print("RESULT" + json.dumps({"file": edt_kernels.__file__, "csrc": str(_ext.CSRC_DIR),
                                 "err": float((out - ref).abs().max())}))
""")


@pytest.mark.slow
def test_cpp_backend_builds_from_the_installed_wheel(built, tmp_path):
    tmp, _, wheel = built
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], timeout=300)
    py = venv / "bin" / "python"
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    # torch, numpy, triton, ninja from this interpreter's site-packages, never
    # downloaded.  Listed in a .pth file (not --system-site-packages): the .pth
    # files of that directory, such as an editable install of this checkout, are
    # then not run and cannot shadow the wheel.
    paths = dict.fromkeys(p for p in sys.path + [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
                          if p.rstrip("/").endswith(("site-packages", "dist-packages")) and Path(p).is_dir())
    (site / "edt_test_base.pth").write_text("\n".join(paths) + "\n")
    # Without PYTHONPATH: a checkout on it (with an egg-info) would look installed.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index",
          "--force-reinstall", str(wheel)], env=env, cwd=tmp_path, timeout=600)
    env.update(EDT_KERNELS_BUILD_DIR=str(tmp_path / "build"), EDT_KERNELS_JIT="1")
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    proc = _run([str(py), "-c", RUN_CPP], cwd=run_dir, env=env, timeout=900)
    out = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1][6:])
    assert Path(out["file"]).is_relative_to(site), out["file"]
    assert Path(out["csrc"]) == site / "edt_kernels" / "csrc"
    assert out["err"] < 1e-10, out


# ----------------------------------------------------------------------------- optional packages

def test_suite_collects_without_the_optional_packages():
    """A machine without scipy, diffusers or torchmetrics (the GPU machines' software) collects
    the test files that use them; their tests skip with the reason (simulated: the modules are
    made unimportable in a subprocess)."""
    code = textwrap.dedent("""
        import sys
        for name in ("scipy", "diffusers", "torchmetrics"):
            sys.modules[name] = None  # `import name` raises ImportError
        import pytest
        sys.exit(pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *sys.argv[1:]]))
    """)
    files = ["tests/test_evaluate.py", "tests/test_extract_features.py", "tests/test_recipe_e2e.py",
             "tests/test_diffusers.py", "tests/test_qkvpacked.py"]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", code, *files], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    last = res.stdout.strip().splitlines()[-1]
    assert "collected" in last and "error" not in last, res.stdout[-3000:]
