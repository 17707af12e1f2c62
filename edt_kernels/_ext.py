"""Build and load the C++/CUDA extension in ``csrc/``.

The operators live in the ``torch.ops.edt_kernels_cpp`` namespace (schemas in
``csrc/ops.cpp``).  They come from, in order of preference:

1. a prebuilt module ``edt_kernels._C`` (``edt_kernels._C_cuda`` for the CUDA
   kernels), made by ``EDT_KERNELS_BUILD_EXT=1 pip install -e . --no-build-isolation``
   (see ``edt_kernels_build.py``), used when it was built from the current sources;
2. a just-in-time build with ``torch.utils.cpp_extension.load`` (ninja) on first
   use, cached in ``$EDT_KERNELS_BUILD_DIR/<tag>``, else ``$TORCH_EXTENSIONS_DIR/edt_kernels/<tag>``,
   else ``~/.cache/edt_kernels/<tag>`` (``<tag>`` = python, torch and a CPU
   fingerprint, because the JIT build uses ``-march=native``); a build and load
   hold that directory's OS lock (:func:`build_lock`), which a killed process
   gives up with its life.

When neither works (no compiler, no ninja, a compile error) nothing raises at
import: :func:`cpu_extension_error` returns the reason and the ``cpp`` attention
backend is simply not offered.

Environment: ``EDT_KERNELS_JIT=0`` never compiles at run time;
``EDT_KERNELS_NATIVE=0`` builds without ``-march=native``;
``EDT_KERNELS_BUILD_VERBOSE=1`` shows the compiler output.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional

import torch

from ._tracing import constant_while_traced

__all__ = [
    "CSRC_DIR",
    "CPU_SOURCES",
    "CUDA_SOURCES",
    "cpu_extension_error",
    "cuda_extension_error",
    "unavailable_reason",
    "require_cpu",
    "require_cuda",
    "source_hash",
    "cpu_cflags",
    "cuda_cflags",
    "write_hash_header",
    "build_directory",
    "build_lock",
]

_log = logging.getLogger("edt_kernels")

# csrc/ shipped inside the package (a wheel: setup.py's build_py copies it), else
# csrc/ at the repository root (a checkout or an editable install).
CSRC_DIR = next((d for d in (Path(__file__).resolve().parent / "csrc", Path(__file__).resolve().parent.parent / "csrc")
                 if (d / "ops.cpp").exists()), Path(__file__).resolve().parent.parent / "csrc")
CPU_SOURCES = ["ops.cpp", "amm_attention_cpu.cpp", "tokens_cpu.cpp"]
CUDA_SOURCES = ["tokens_cuda.cu"]
_HASH_MARKER = "edt_kernels_src_"

_lock = threading.Lock()
_state = {}  # kind -> None (loaded) or str (reason it is unavailable)


def _files() -> List[Path]:
    names = CPU_SOURCES + CUDA_SOURCES
    headers = sorted(p.name for p in CSRC_DIR.glob("*.h")) + sorted(p.name for p in CSRC_DIR.glob("*.cuh"))
    return [CSRC_DIR / n for n in names + headers]


def source_hash() -> Optional[str]:
    """Hash of every source of the extension (C++ and CUDA), or None when
    ``csrc/`` is not present (an installed, non-editable package)."""
    files = _files()
    if not all(f.exists() for f in files):
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _native_ok(cxx: str) -> bool:
    if os.environ.get("EDT_KERNELS_NATIVE", "1") == "0":
        return False
    try:
        r = subprocess.run([cxx, "-march=native", "-x", "c++", "-E", "-o", os.devnull, os.devnull],
                           capture_output=True, timeout=30)
        return r.returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def write_hash_header(directory: Path) -> Path:
    """Write ``edt_kernels_src_hash.h`` (the source hash compiled into the
    libraries, see ``csrc/ops.cpp``) into ``directory``, touching it only when
    it changes so that an incremental build recompiles just the files using it."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "edt_kernels_src_hash.h"
    text = f"#define EDT_KERNELS_SRC_HASH {_HASH_MARKER}{source_hash() or 'unknown'}\n"
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return directory


def cpu_cflags(native: bool, hash_dir: Optional[Path] = None) -> List[str]:
    """Compiler flags of the CPU sources (also used by ``edt_kernels_build``)."""
    flags = ["-O3", "-fopenmp", "-ffp-contract=fast", "-Wno-unknown-pragmas"]
    if hash_dir is not None:
        flags += [f"-I{hash_dir}", "-DEDT_KERNELS_HAVE_HASH_HEADER"]
    if native:
        flags.append("-march=native")
    return flags


def _cpu_tag() -> str:
    info = platform.machine()
    try:
        text = Path("/proc/cpuinfo").read_text()
        for key in ("model name", "flags", "Features"):
            m = re.search(rf"^{key}\s*:\s*(.*)$", text, re.M)
            if m:
                info += m.group(1)
    except OSError:
        info += platform.processor()
    return hashlib.sha256(info.encode()).hexdigest()[:8]


def build_directory() -> Path:
    """Where the JIT build is cached."""
    tag = (f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__.split('+')[0]}"
           f"-{'cu' + torch.version.cuda.replace('.', '') if torch.version.cuda else 'cpu'}-{_cpu_tag()}")
    if os.environ.get("EDT_KERNELS_BUILD_DIR"):
        root = Path(os.environ["EDT_KERNELS_BUILD_DIR"])
    elif os.environ.get("TORCH_EXTENSIONS_DIR"):
        root = Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "edt_kernels"
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edt_kernels"
    return root / tag


def _summarise(exc: BaseException) -> str:
    """The compiler's first error lines of a failed build (else the message)."""
    text = str(exc)
    errors = [ln.strip() for ln in text.splitlines() if re.search(r"\b(error|fatal error)\b\s*:", ln, re.I)]
    if errors:
        summary = "compile error: " + " | ".join(errors[:3])
    else:
        summary = next((ln.strip() for ln in text.splitlines() if ln.strip()), repr(exc))
    return summary[:500] + (" ..." if len(summary) > 500 else "")


def _prebuilt(module: str) -> Optional[str]:
    """Path of an up-to-date prebuilt library, or None."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not os.path.exists(spec.origin):
        return None
    want = source_hash()
    if want is None:  # installed package without sources: trust the build
        return spec.origin
    if (_HASH_MARKER + want).encode() in Path(spec.origin).read_bytes():
        return spec.origin
    _log.warning("edt_kernels: prebuilt %s was built from other sources than csrc/; "
                 "compiling the extension instead", spec.origin)
    return None


def _build_unavailable_reason(kind: str) -> Optional[str]:
    """Why a just-in-time build of ``kind`` ("cpu" or "cuda") cannot start here, or None."""
    from torch.utils import cpp_extension

    if os.environ.get("EDT_KERNELS_JIT", "1") == "0":
        return "no prebuilt extension and EDT_KERNELS_JIT=0"
    if source_hash() is None:
        return f"extension sources not found in {CSRC_DIR}"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler found (CXX={cxx!r} is not on PATH)"
    if not cpp_extension.is_ninja_available():
        return "ninja not found (pip install ninja)"
    if kind == "cuda" and cpp_extension.CUDA_HOME is None:
        return "CUDA toolkit (nvcc) not found: set CUDA_HOME"
    return None


@constant_while_traced  # see _load
def unavailable_reason(kind: str = "cpu") -> Optional[str]:
    """Why the extension (``kind`` "cpu" or "cuda") cannot be had here, without
    building or loading it: the recorded load error once it was tried, else
    None when a prebuilt library exists or a just-in-time build can start.
    The one answer to "can the C++ extension be had?" before a first use."""
    if kind in _state:
        return _state[kind]
    if _prebuilt("edt_kernels._C" if kind == "cpu" else "edt_kernels._C_cuda") is not None:
        return None
    return _build_unavailable_reason(kind)


def _up_to_date(build_dir: Path, name: str) -> bool:
    lib = build_dir / f"{name}.so"
    if not lib.exists():
        return False
    newest = max(f.stat().st_mtime for f in _files())
    return lib.stat().st_mtime >= newest


def _jit_load(kind: str) -> None:
    from torch.utils import cpp_extension

    cxx = os.environ.get("CXX", "c++")
    build_dir = build_directory() / kind
    build_dir.mkdir(parents=True, exist_ok=True)
    gen_dir = write_hash_header(build_dir / "gen")
    name = "edt_kernels_cpp" if kind == "cpu" else "edt_kernels_cuda"
    verbose = os.environ.get("EDT_KERNELS_BUILD_VERBOSE", "0") == "1"
    if not _up_to_date(build_dir, name):
        _log.warning("edt_kernels: compiling the %s extension (first use, about a minute; cached in %s)",
                     kind, build_dir)
    kwargs = dict(name=name, build_directory=str(build_dir), extra_ldflags=["-fopenmp"],
                  is_python_module=False, verbose=verbose)
    if kind == "cpu":
        kwargs.update(sources=[str(CSRC_DIR / n) for n in CPU_SOURCES],
                      extra_cflags=cpu_cflags(_native_ok(cxx), gen_dir))
    else:
        kwargs.update(sources=[str(CSRC_DIR / n) for n in CUDA_SOURCES],
                      extra_cflags=["-O3", f"-I{gen_dir}", "-DEDT_KERNELS_HAVE_HASH_HEADER"],
                      extra_cuda_cflags=cuda_cflags(gen_dir))
    with build_lock(build_dir):
        cpp_extension.load(**kwargs)


#: The OS lock around a build and load in one build directory (see ``build_lock``).
BUILD_LOCK_NAME = "build.lock"


@contextmanager
def build_lock(build_dir: Path):
    """Hold the build directory's OS lock (``filelock.FileLock``: ``fcntl.flock`` on Linux,
    ``LockFileEx`` on Windows) for a build and load.

    The operating system releases it when its holder exits in any way, SIGKILL
    included, so a killed build delays the next process by nothing; a live
    build makes it wait for that one build. Inside, no other process of any
    Python can be building here, so torch's own lock file (``lock``, whose mere
    existence makes ``cpp_extension.load`` wait, forever when its writer was
    killed) can only be a leftover and is removed."""
    from filelock import FileLock

    build_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(build_dir / BUILD_LOCK_NAME))
    if not _try_acquire(lock):
        _log.warning("edt_kernels: waiting for another process building the extension in %s", build_dir)
        lock.acquire()
    try:
        torch_lock = build_dir / "lock"
        if torch_lock.exists():
            _log.warning("edt_kernels: removing %s, left by a build that was killed", torch_lock)
            torch_lock.unlink(missing_ok=True)
        yield
    finally:
        lock.release()


def _try_acquire(lock) -> bool:
    from filelock import Timeout

    try:
        lock.acquire(timeout=0)
    except Timeout:
        return False
    return True


def cuda_cflags(hash_dir: Optional[Path] = None) -> List[str]:
    """nvcc flags of the CUDA sources (also used by ``edt_kernels_build``)."""
    flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    if hash_dir is not None:
        flags += [f"-I{hash_dir}", "-DEDT_KERNELS_HAVE_HASH_HEADER"]
    return flags


def _load_one(kind: str) -> None:
    """Load one extension or raise (caller holds the lock)."""
    path = _prebuilt("edt_kernels._C" if kind == "cpu" else "edt_kernels._C_cuda")
    if path is not None:
        torch.ops.load_library(path)
    else:
        why = _build_unavailable_reason(kind)
        if why is not None:
            raise RuntimeError(why)
        _jit_load(kind)
    torch.ops.edt_kernels_cpp.source_hash()  # the schemas are registered


# torch.compile traces the backend choice, and Dynamo can trace neither the file-system checks nor a
# build, a load or a lock: while a graph is traced, these two answers are computed eagerly, once, and
# are constants of the graph.  A first call inside torch.compile builds and loads the extension as an
# eager one does, and "auto" picks the same backend compiled as eager.
@constant_while_traced
def _load(kind: str) -> Optional[str]:
    if kind in _state:  # fast path, without the lock, once settled
        return _state[kind]
    with _lock:
        if kind not in _state:
            try:
                if kind == "cuda":
                    if not torch.cuda.is_available() or torch.version.cuda is None:
                        raise RuntimeError("torch has no CUDA device")
                    if "cpu" not in _state:
                        _load_cpu_locked()
                    if _state["cpu"] is not None:
                        raise RuntimeError(f"the CPU extension (operator schemas) is unavailable: {_state['cpu']}")
                    _load_one("cuda")
                    _state["cuda"] = None
                else:
                    _load_cpu_locked()
            except Exception as exc:  # noqa: BLE001 - any failure means "not offered"
                _state[kind] = _summarise(exc)
            if _state[kind] is not None:
                _log.warning("edt_kernels: %s extension unavailable: %s", kind, _state[kind])
        return _state[kind]


def _load_cpu_locked() -> None:
    try:
        _load_one("cpu")
        _state["cpu"] = None
    except Exception as exc:  # noqa: BLE001
        _state["cpu"] = _summarise(exc)


def cpu_extension_error() -> Optional[str]:
    """None when the CPU extension is loaded (building it on first call), else
    why it is unavailable."""
    return _load("cpu")


def cuda_extension_error() -> Optional[str]:
    """None when the CUDA token kernels are loaded, else why they are unavailable."""
    return _load("cuda")


def require_cpu() -> None:
    reason = cpu_extension_error()
    if reason is not None:
        raise RuntimeError(f"edt_kernels C++ extension unavailable: {reason}")


def require_cuda() -> None:
    reason = cuda_extension_error()
    if reason is not None:
        raise RuntimeError(f"edt_kernels CUDA extension unavailable: {reason}")
