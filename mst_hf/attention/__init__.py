"""Hybrid Sparse Attention (HSA) for transformers models: the public door of `mst_hf.attention`.

Importing this package registers the attention implementation ``"mst_hsa"`` with transformers'
``AttentionInterface`` and ``AttentionMaskInterface``. Layout (``api -> impl``):

- `patterns`: `HSASpec` (the settings, validated once) and the mask functions; a leaf (torch only);
- `interface`: the transformers glue (``config.mst_hsa``, the mask object, the two registered functions);
- `dispatch`: which kernel runs (a forced backend, or ``auto``: measured once per shape, cached);
- `impl`: `reference` (the oracle of every kernel test), `sdpa`, `flex`, `triton` (Triton imported lazily).
"""

from .dispatch import hsa_attention
from .impl.reference import reference_attention
from .interface import (
    DEFAULT_HSA_STATE,
    HSA_BACKEND_ENV,
    HSA_NAME,
    HSAMask,
    configure_hsa,
    dense_pattern_message,
    get_hsa_spec,
    get_hsa_state,
    hsa_attention_forward,
    hsa_mask_interface,
    register,
    set_hsa_active,
    validate_hsa_state,
    warn_if_dense,
)
from .patterns import (
    BACKENDS,
    LAYER_CHOICES,
    PATTERNS,
    HSASpec,
    attention_density,
    mean_attended_keys,
    pattern_mask_fn,
)

register()

__all__ = [
    "BACKENDS",
    "DEFAULT_HSA_STATE",
    "HSAMask",
    "HSASpec",
    "HSA_BACKEND_ENV",
    "HSA_NAME",
    "LAYER_CHOICES",
    "PATTERNS",
    "attention_density",
    "configure_hsa",
    "dense_pattern_message",
    "get_hsa_spec",
    "get_hsa_state",
    "hsa_attention",
    "hsa_attention_forward",
    "hsa_mask_interface",
    "mean_attended_keys",
    "pattern_mask_fn",
    "reference_attention",
    "register",
    "set_hsa_active",
    "validate_hsa_state",
    "warn_if_dense",
]
