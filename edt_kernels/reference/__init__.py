"""Plain-PyTorch references: the definitions every kernel, test, benchmark and
fallback imports.  One submodule per op family."""
from .attention import reference_attention, reference_attention_lse  # noqa: F401
