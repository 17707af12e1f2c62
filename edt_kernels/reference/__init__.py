"""Plain-PyTorch references: the definitions every kernel, test, benchmark and
fallback imports.  One submodule per op family."""
from .attention import reference_attention, reference_attention_lse  # noqa: F401
from .diffusion_loss import reference_diffusion_loss  # noqa: F401
from .adaln import reference_gated_residual, reference_layernorm_modulate, reference_mlp_gelu_tanh  # noqa: F401
from .tokens import (  # noqa: F401
    reference_gather_tokens, reference_masked_shortcut, reference_patch_merge,
    reference_patch_merge_modulate, reference_random_masking, reference_scatter_tokens,
    reference_unshuffle_with_mask_token,
)
