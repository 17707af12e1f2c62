"""Kernels: one module per op (Triton kernels, launchers, custom op, autograd)."""
