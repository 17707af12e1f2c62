"""edt-kernels: fused kernels for diffusion transformers (DiT, MDT, EDT).

    >>> from edt_kernels import amm_attention
    >>> out = amm_attention(q, k, v, rel_pos_bias=table, grid=16, positions=ids_keep, amm=True)
"""
from .amm import AMM, amm_offset_table, modulation_matrix, relative_position_index  # noqa: F401
from .attention import amm_attention, amm_attention_qkvpacked, available_backends  # noqa: F401
from .reference import reference_attention  # noqa: F401
# -- more exports below (one line per module) --
from .ops.adaln import gated_residual, layernorm_modulate, mlp_gelu_tanh  # noqa: F401
from .ops.diffusion_loss import diffusion_loss  # noqa: F401
from .ops.tokens import gather_tokens, masked_shortcut, patch_merge_modulate, random_masking, scatter_tokens, unshuffle_with_mask_token  # noqa: F401,E501
from .nn import AMMAttention, RelativePositionBias  # noqa: F401
from .patch import PatchReport, patch_model, unpatch_model  # noqa: F401
from .amm_presets import AMM_PRESETS, apply_amm  # noqa: F401
from .backends import check_values, refresh, set_backend, set_check_values  # noqa: F401

__version__ = "0.1.0"
