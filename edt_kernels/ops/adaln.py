"""adaLN kernels of a DiT block: ``layernorm_modulate`` and ``gated_residual``.

    layernorm_modulate(x, shift, scale) = LayerNorm(x) * (1 + scale[:, None]) + shift[:, None]
    gated_residual(x, gate, y)           = x + gate[:, None] * y

(no-affine LayerNorm, eps 1e-6, fp32 statistics; ``x, y`` ``[B, L, C]``,
``shift, scale, gate`` ``[B, C]``; definitions in
``edt_kernels.reference.adaln``).  They run twice per block and are memory
bound, so each is one pass over the rows forward and one backward.  The
shift/scale/gate gradients are sums over the tokens: each program accumulates
its rows in fp32 registers and writes one partial row; a small ``torch.sum``
over the ``[B, P, C]`` partials finishes (deterministic, no atomics).

The block's MLP, ``mlp_gelu_tanh`` (``ops/mlp.py``), keeps the input and the
pre-activation for its backward, not the activation.

Re-exported from one module per op (``layernorm_modulate``, ``gated_residual``, ``mlp``);
the shared Triton helpers live in ``ops/_triton_utils.py`` and the argument
checks in ``edt_kernels/_validation.py``.
"""
from __future__ import annotations

from .._validation import check_eps, check_shape, check_tensor  # noqa: F401
from ._triton_utils import (  # noqa: F401
    HAS_TRITON, MAX_GRID_BATCH, TRITON_DTYPES, check_launchable, dispatch, interpreting, promote, register_op,
    row_config, rows_per_program, tile_config, tl, triton, triton_reasons, unit_stride,
    use_triton,
)
from ._triton_utils import empty_output as _empty  # noqa: F401
from .gated_residual import (  # noqa: F401
    _gated_residual_bwd_op, _gated_residual_op, gated_residual, gated_residual_backward, gated_residual_forward,
)
from .layernorm_modulate import (  # noqa: F401
    _check_adaln_rows, _layernorm_modulate_bwd_op, _layernorm_modulate_op, layernorm_modulate, ln_modulate_backward,
    ln_modulate_forward,
)
from .mlp import mlp_gelu_tanh  # noqa: F401

__all__ = ["layernorm_modulate", "gated_residual", "mlp_gelu_tanh"]
