"""Tolerances, stated once, keyed by dtype.

A kernel in dtype X is compared with the float64 reference; it must be within
``atol + rtol * |ref|`` where the pair is taken from this table.  Low-precision
entries follow xformers/flash-attention practice (about 2x the error of the
same PyTorch computation done in that dtype, plus a small atol).
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
