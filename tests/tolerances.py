"""Tolerances, stated once, keyed by dtype, and the two rules that use them.

Rule 1 (``assert_close``, what every kernel test uses): a kernel run in dtype
X is compared elementwise with the float64 reference of the same inputs and
must satisfy ``|kernel - ref| <= atol + rtol * |ref|`` with ``(atol, rtol)``
fixed per dtype by the tables below (``FWD_TOL`` for outputs, ``GRAD_TOL``
for gradients, which sum over tokens and are looser).  The low-precision
entries are of the size xformers uses (``float16 4e-3``, ``bfloat16 2e-2``);
they are fixed numbers, not derived from each test's inputs.

Rule 2 (``assert_within_torch_error``, flash-attention's rule): the kernel's
largest error against the float64 reference is at most ``2x`` the largest
error of the same PyTorch computation done in the same low dtype, plus
``atol`` of ``FWD_TOL``.
"""
import torch

FWD_TOL = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (2e-2, 2e-2),
}
# Gradients accumulate over N (and over B*N*N for the table): looser.
GRAD_TOL = {
    torch.float64: (1e-9, 1e-8),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype,
                 table=FWD_TOL, name: str = "") -> None:
    atol, rtol = table[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol,
                               equal_nan=True, msg=lambda m: f"{name}: {m}")


def assert_within_torch_error(actual: torch.Tensor, torch_lowp: torch.Tensor, expected: torch.Tensor,
                              dtype: torch.dtype, name: str = "", factor: float = 2.0) -> None:
    """Rule 2: ``max|actual - ref| <= factor * max|torch_lowp - ref| + atol``."""
    ref = expected.double()
    err = (actual.double() - ref).abs().max().item()
    base = (torch_lowp.double() - ref).abs().max().item()
    atol = FWD_TOL[dtype][0]
    assert err <= factor * base + atol, (f"{name}: error {err:.3g} > {factor} x PyTorch's own {dtype} "
                                         f"error {base:.3g} + {atol:g}")
