"""The oracle: softmax attention in float32 under an explicit boolean mask. Every kernel test compares against it.

Slow (it materialises the ``(B, H, Lq, Lk)`` scores) and exact; it is also the ``eager`` backend.
"""

import torch

from .common import masked_attention, pattern_bool_mask


def reference_attention(query, key, value, mask, scaling=None) -> torch.Tensor:
    """The oracle: softmax attention in float32 under an explicit boolean `mask` (True = attend), broadcastable to
    ``(B, H, Lq, Lk)``. Grouped-query key/value heads are repeated. Returns ``(B, H, Lq, D)`` float32."""
    out, _ = masked_attention(query.float(), key.float(), value.float(), mask, scaling)
    return out


def reference_pattern_attention(query, key, value, spec, scaling=None) -> torch.Tensor:
    """`spec`'s pattern on a plain causal sequence by `reference_attention`, returned in the query's dtype."""
    mask = pattern_bool_mask(spec, query.shape[2], query.shape[1], query.device)
    return reference_attention(query, key, value, mask, scaling).to(query.dtype)
