"""Token kernels of masked diffusion training (MDTv2, EDT): the public names,
re-exported from one module per op (``gather_scatter``, ``random_masking``,
``unshuffle``, ``masked_shortcut``, ``patch_merge_modulate``).

Public functions (definitions in ``edt_kernels.reference.tokens``; every one
takes ``backend="auto" | "triton" | "torch" | "eager"`` (and ``"cpp"`` for
gather/scatter/unshuffle), see ``edt_kernels.backends``):

- ``random_masking(x, mask_ratio, generator=None, *, len_keep=None, noise=None, sort_kept=False)`` -> ``(x_kept, mask, ids_restore, ids_keep)``
- ``gather_tokens(x, ids)`` / ``scatter_tokens(y, ids, length)``
- ``unshuffle_with_mask_token(x_kept, ids_restore, mask_token, pos_embed=None)``
- ``masked_shortcut(x, x_before, mask)``
- ``patch_merge_modulate(x, shift, scale, keep_mask=None, *, grid=None, eps=1e-6)``

Custom ops (namespace ``edt_kernels``; fake kernels and autograd registered, so
torch.compile traces them).  ``x`` is ``[B, L, C]``, index tensors int64::

    gather_tokens(Tensor x, Tensor ids) -> Tensor
        # [B, L, C], [B, K] -> [B, K, C]; out[b, k] = x[b, ids[b, k]]
    scatter_tokens(Tensor y, Tensor ids, int length) -> Tensor
        # [B, K, C], [B, K] -> [B, length, C]; out[b, ids[b, k]] = y[b, k], 0 elsewhere
    unshuffle_with_mask_token(Tensor x_kept, Tensor ids_restore, Tensor mask_token,
                              Tensor? pos_embed) -> Tensor
        # [B, K, C], [B, L], [1, 1, C], [1, L, C] -> [B, L, C]
    unshuffle_with_mask_token_backward(Tensor dout, Tensor ids_restore, int len_keep,
                                       bool need_dpos) -> (Tensor, Tensor, Tensor)
        # -> dx_kept [B, K, C] (dout's dtype), dmask_token [1, 1, C] float32,
        #    dpos_embed [1, L, C] float32 (or [0] when not need_dpos)
    random_masking_gather(Tensor x, Tensor ids_shuffle, int len_keep) -> (Tensor, Tensor, Tensor)
        # -> x_kept [B, K, C], mask [B, L] float32, ids_restore [B, L] int64
    sort_kept_ids(Tensor ids_shuffle, int len_keep) -> Tensor
        # [B, L] permutation -> the same with entries [:len_keep] and [len_keep:] each ascending
    masked_shortcut(Tensor x, Tensor x_before, Tensor mask) -> Tensor
        # [B, L, C], [B or 1, L, C], [B, L] (bool or float) -> [B, L, C]
    masked_shortcut_backward(Tensor dout, Tensor x, Tensor x_before, Tensor mask,
                             bool need_dmask) -> (Tensor, Tensor, Tensor)
        # -> dx, dx_before (x_before's shape), dmask [B, L] float32 (or [0])
    patch_merge_modulate(Tensor x, Tensor shift, Tensor scale, Tensor? keep_mask,
                         int height, int width, float eps) -> Tensor
        # [B, H*W, C], [B, 4C], [B, 4C], [B, H*W/4] -> [B, H*W/4, 4C]
    patch_merge_modulate_backward(Tensor dout, Tensor x, Tensor scale, Tensor? keep_mask,
                                  int height, int width, float eps) -> (Tensor, Tensor, Tensor)
        # -> dx like x, dshift and dscale float32 [B, 4C]

The gather/scatter/unshuffle schemas equal those of the compiled extension's
token kernels (``csrc/``), which are the ``"cpp"`` backend of these ops
(``ops.tokens_cpp``, custom ops ``edt_kernels::<name>_cpp``).  The ops do not validate: the public
functions do (indices must be in range, ``ids`` rows unique, ``ids_restore``
rows permutations), and the kernels mask every index so that an out-of-range
value is never dereferenced (its row reads as zero / the mask token).
"""
from __future__ import annotations

from .._validation import check_id_values as _check_id_values  # noqa: F401
from .._validation import check_ids as _check_ids  # noqa: F401
from .._validation import check_tokens as _check_tokens  # noqa: F401
from ._triton_utils import empty_output as _empty  # noqa: F401
from .gather_scatter import (  # noqa: F401
    _gather_tokens_op, _scatter_tokens_op, gather_rows, gather_tokens, invert_ids, scatter_rows, scatter_tokens,
    unshuffle_rows,
)
from .masked_shortcut import (  # noqa: F401
    _masked_shortcut_bwd_op, _masked_shortcut_op, masked_shortcut, masked_shortcut_backward, masked_shortcut_forward,
)
from .patch_merge_modulate import _patch_merge_bwd_op, _patch_merge_op, patch_merge_modulate  # noqa: F401
from .random_masking import _masking_gather_op, _sort_kept_op, masking_gather, random_masking, sort_kept  # noqa: F401
from .unshuffle import _unshuffle_bwd_op, _unshuffle_op, unshuffle_backward, unshuffle_with_mask_token  # noqa: F401
from . import tokens_cpp  # noqa: F401  (registers the "cpp" backend of gather/scatter/unshuffle)

__all__ = [
    "random_masking",
    "gather_tokens",
    "scatter_tokens",
    "unshuffle_with_mask_token",
    "masked_shortcut",
    "patch_merge_modulate",
]
