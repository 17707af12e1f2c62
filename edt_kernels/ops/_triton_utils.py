"""Helpers shared by every Triton op (attention, tokens, adaLN): the one
``triton`` import, tile sizes, launch checks, and the backends every token and
adaLN op registers.

Where Triton cannot run here (``edt_kernels._triton_support.triton_unavailable_reason``:
not installed, an unsupported version, an import error) ``triton`` and ``tl``
below are a stand-in on which the kernel definitions still parse
(``triton.jit`` is the identity): every op module imports, and its Triton
backend is registered as unavailable with that reason, which appears in every
dispatch error.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch

from .._triton_support import interpreting, triton_unavailable_reason
from ..backends import FunctionBackend, OpCall, register, select

HAS_TRITON = triton_unavailable_reason() is None
if HAS_TRITON:
    import triton
    import triton.language as tl
else:  # pragma: no cover - e.g. macOS, or an unsupported triton: only the other backends are offered

    class _NoTriton:
        """Lets the kernel definitions be parsed where Triton cannot run."""

        @staticmethod
        def constexpr(value=None):
            return value

        @staticmethod
        def jit(fn=None, **options):
            return fn if fn is not None else (lambda f: f)

    triton = tl = _NoTriton()

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

MAX_GRID_BATCH = 65535  # CUDA's limit on grid axes 1 and 2, where these kernels put the batch
TILE_ELEMENTS = 4096  # elements of one [BLOCK_T, BLOCK_C] tile of the row kernels
MAX_BLOCK_C = 512  # channels per program of the elementwise / row-copy kernels
MAX_TILE_BLOCK_T = 64  # rows per program of the elementwise / row-copy kernels
MAX_ROW_BLOCK_T = 32  # rows per program of the kernels that hold whole rows
ELEMENTS_PER_WARP = 512  # whole-row kernels: one warp per this many tile elements (4..16 warps)


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` on the host.  ``triton.cdiv`` / ``triton.next_power_of_2`` are
    constexpr functions that unwrap their arguments on every call, several µs per
    launch in the launchers; these plain versions give the same integers."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n`` (0 for ``n <= 0``, as ``triton.next_power_of_2``)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def empty_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Every token/adaLN launcher allocates its outputs here (the tests fill
    them with NaN to prove that the kernels write every element)."""
    return torch.empty(shape, dtype=dtype, device=device)


def batch_reason(t: torch.Tensor) -> Optional[str]:
    """Why the token/adaLN kernels cannot take ``t``'s batch (its first dim),
    or None: they put the batch on a CUDA grid axis of at most 65535."""
    if t.dim() and t.shape[0] > MAX_GRID_BATCH:
        return (f"batch B = {t.shape[0]} exceeds {MAX_GRID_BATCH}, the CUDA grid limit of the Triton "
                "token/adaLN kernels")
    return None


def check_launchable(t: torch.Tensor) -> None:
    """The launchers' own guard (dispatch has already turned each of these into a reason)."""
    if not HAS_TRITON:
        raise RuntimeError(f"the Triton kernels cannot run: {triton_unavailable_reason()}; use backend='torch'")
    why = batch_reason(t)
    if why is not None:
        raise ValueError(f"{why}: split the batch or use backend='torch'")
    if t.device.type == "cuda" or (t.device.type == "cpu" and interpreting()):
        return
    raise RuntimeError(f"Triton kernels need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 "
                       f"set before triton is imported), got a tensor on {t.device}; "
                       f"use backend='torch'")


def unit_stride(t: torch.Tensor) -> torch.Tensor:
    """The kernels take batch/row strides but need a unit channel stride."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def promote(*tensors: torch.Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def common_alignment(itemsize: int, *values: int) -> int:
    """The widest vector (elements, at most 16 bytes of ``itemsize``) that every
    size and stride in ``values`` is a multiple of.  The launchers pass it as
    ``ALIGN`` to kernels that call :func:`multiple_of` on those values; 1
    disables the hints.  The pointers are Triton's: it specialises each pointer
    argument on 16-byte alignment, and an unaligned pointer keeps the accesses
    scalar whatever the hints say.

    Triton also specialises integer arguments divisible by 16, so the hints
    matter at widths that are multiples of 8 but not of 16 (EDT-S's 312,
    EDT-XL's 936, head dims 52 and 72), which otherwise load 2 bytes at a time.
    Where 16 divides everything they are redundant and still passed: in the
    sm_90 profile that keeps the attention main loops at D = 64 up to 8 %
    shorter (SASS counted) and costs a token kernel 8 to 32 integer
    instructions, off the critical path of a memory-bound kernel."""
    bits = 0  # OR of the values: its lowest set bit is their common power of two
    for v in values:
        bits |= v
    widest = 16 // itemsize
    return min(widest, bits & -bits) if bits else widest


def alignment(*ts: torch.Tensor) -> int:
    """:func:`common_alignment` of tensors whose last dim is contiguous (1
    otherwise): of each last-dim size and each stride of a dimension longer than
    one, at most 16 bytes of the narrowest dtype."""
    bits, itemsize = 0, 16  # the OR of the values has their common power of two
    for t in ts:
        stride, shape = t.stride(), t.shape
        if stride[-1] != 1 and shape[-1] > 1:
            return 1
        itemsize = min(itemsize, t.element_size())
        bits |= shape[-1]
        for i in range(len(stride) - 1):
            if shape[i] > 1:
                bits |= stride[i]
    return common_alignment(itemsize, bits)


@triton.jit
def multiple_of(value, ALIGN: tl.constexpr):
    """``value`` (a size or stride the launcher found to be a multiple of ALIGN,
    see :func:`common_alignment`) in a form the compiler's alignment analysis
    reads: ``(value // ALIGN) * ALIGN`` is ``value`` and carries its
    divisibility, which a hint on a kernel argument does not.  Tiles whose rows
    start on multiples of ALIGN elements then load and store as vectors, and
    masks such as ``c < C`` stay constant over a vector.  :func:`alignment`
    leaves out the strides of dimensions of length one, which only ever
    multiply index 0: those may not be multiples."""
    if ALIGN > 1:
        value = (value // ALIGN) * ALIGN
    return value


def row_config(n: int) -> Tuple[int, int, int]:
    """(BLOCK_N, BLOCK_T, num_warps) for kernels that hold whole rows of n channels."""
    block_n = next_power_of_2(n)
    block_t = max(1, min(MAX_ROW_BLOCK_T, TILE_ELEMENTS // block_n))
    num_warps = max(4, min(16, block_n * block_t // ELEMENTS_PER_WARP))
    return block_n, block_t, num_warps


def tile_config(c: int) -> Tuple[int, int, int]:
    """(BLOCK_C, BLOCK_T, num_warps) for elementwise/row-copy kernels tiled over channels."""
    block_c = min(next_power_of_2(c), MAX_BLOCK_C)
    block_t = max(1, min(MAX_TILE_BLOCK_T, TILE_ELEMENTS // block_c))
    return block_c, block_t, 4


def rows_per_program(rows: int, other_programs: int, block_t: int, target: int = 1024) -> int:
    """Rows one reducing program walks through: enough programs (about
    ``target``) to fill a GPU, few enough partial rows to keep the reduction
    buffer small.  A multiple of ``block_t``."""
    chunks = max(1, min(cdiv(rows, block_t), cdiv(target, max(1, other_programs))))
    return cdiv(cdiv(rows, chunks), block_t) * block_t


def triton_reasons(call: OpCall) -> List[str]:
    """Why the Triton kernels cannot take these inputs (empty list: they can)."""
    why = []
    device = call.device
    if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
        why.append(f"tensors are on {device} (needs CUDA, or CPU with TRITON_INTERPRET=1)")
    for name, t in call.tensors.items():
        if t is not None and t.is_floating_point() and t.dtype not in TRITON_DTYPES:
            why.append(f"{name} is {t.dtype} (Triton kernels take float16, bfloat16, float32)")
    batch = [r for r in (batch_reason(t) for t in call.tensors.values() if t is not None) if r is not None]
    return why + batch[:1]


def register_op(op: str, triton_fn: Callable, reference_fn: Callable,
                torch_fn: Optional[Callable] = None) -> None:
    """The backends of one token/adaLN op: ``triton`` (``"auto"``'s choice on
    CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1``, of the dtypes
    it takes), ``torch`` (``torch_fn`` where given: plain PyTorch with a leaner
    backward; else the PyTorch reference; any device/dtype) and ``eager``
    (the reference: one backend string works for every op).  The ``cpp``
    backend of the token ops that have compiled kernels registers in
    ``tokens_cpp``."""
    register(op, FunctionBackend("triton", triton_fn, triton_reasons, unavailable=triton_unavailable_reason),
             auto_rank=0)
    register(op, FunctionBackend("torch", torch_fn or reference_fn), auto_rank=100)
    register(op, FunctionBackend("eager", reference_fn))


def dispatch(op: str, backend: str, call: OpCall):
    """Run ``call`` on the backend of ``op`` that ``backend`` names (or ``"auto"`` picks)."""
    return select(op, call, backend).apply(call)


def use_triton(op: str, backend: str, **tensors: Optional[torch.Tensor]) -> bool:
    """Whether ``backend`` (``"auto"`` included) runs ``op`` on these tensors with Triton."""
    return select(op, OpCall((), **tensors), backend).name == "triton"
