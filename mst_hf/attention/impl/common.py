"""What every HSA implementation shares: grouped-query key expansion, the masked softmax math, and the cached
boolean masks of the index layouts (the plain pattern, and the layouts the flex kernels run in).

A layout key is a hashable tuple: ``("pattern", spec, num_heads | 0)``, ``("local", w)``, ``("class_causal", n,
gap)`` (residue classes of n positions, causal inside, ``q - k >= gap``) or ``("fixed_concat", c, n_pad)``
(summary keys padded to n_pad, then all keys). Masks are cached by (layout, lengths, device), least recently used
first out, so a training step rebuilds none.
"""

from collections import OrderedDict

import torch

from ..patterns import generate_local_mask

_CACHE_SIZE = 32


def expand_kv(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Grouped-query keys or values ``(B, Hkv, T, D)`` repeated to ``num_heads`` heads (unchanged when equal)."""
    if x.shape[1] == num_heads:
        return x
    return x.repeat_interleave(num_heads // x.shape[1], dim=1)  # (B, H, T, D)


def masked_attention(query, key, value, mask, scaling=None):
    """Masked softmax attention, differentiable, in the inputs' dtype. Returns ``(out, lse)``; a row with no admitted
    key gives out 0 and lse -inf (as FlexAttention does)."""
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    key, value = expand_kv(key, query.shape[1]), expand_kv(value, query.shape[1])
    scores = (query @ key.transpose(-1, -2)) * scale  # (B, H, Lq, Lk)
    has_key = mask.any(-1, keepdim=True)
    scores = scores.masked_fill(~mask, float("-inf"))
    scores = torch.where(has_key, scores, torch.zeros_like(scores))  # finite dummy row, zeroed below
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    out = torch.exp(scores - lse) @ value
    out = torch.where(has_key, out, torch.zeros_like(out))
    lse = torch.where(has_key, lse, torch.full_like(lse, float("-inf")))
    return out, lse.squeeze(-1)


_MASKS: OrderedDict = OrderedDict()


def cached(key, build):
    """``build()`` once per `key`; the last `_CACHE_SIZE` values are kept."""
    if key in _MASKS:
        _MASKS.move_to_end(key)
        return _MASKS[key]
    value = build()
    _MASKS[key] = value
    if len(_MASKS) > _CACHE_SIZE:
        _MASKS.popitem(last=False)
    return value


def layout_mask_mod(layout: tuple):
    """The mask_mod of a layout key. Built once per key (cache miss), so compiled flex sees the same object."""
    kind = layout[0]
    if kind == "pattern":
        return layout[1].mask_fn(layout[2])
    if kind == "local":
        return generate_local_mask(layout[1])
    if kind == "class_causal":  # residue-class layout: classes of n positions, causal inside, q - k >= gap
        n, gap = layout[1], layout[2]

        def class_causal(b, h, q_idx, kv_idx):
            return (q_idx // n == kv_idx // n) & (q_idx - kv_idx >= gap)

        return class_causal
    if kind == "fixed_concat":  # keys = [summary keys padded to n_pad] + [all keys]
        c, n_pad = layout[1], layout[2]

        def fixed_concat(b, h, q_idx, kv_idx):
            k = kv_idx - n_pad
            summary = (kv_idx < n_pad) & (kv_idx < q_idx // c)
            own_block = (kv_idx >= n_pad) & (k // c == q_idx // c) & (k <= q_idx)
            return summary | own_block

        return fixed_concat
    raise ValueError(f"unknown layout {layout!r}")


def dense_mask(layout, q_len, kv_len, device):
    """A layout as a cached boolean ``(1, 1 | H, q_len, kv_len)`` mask."""
    def build():
        q = torch.arange(q_len, device=device)[:, None]
        k = torch.arange(kv_len, device=device)[None, :]
        heads = layout[2] if layout[0] == "pattern" and layout[2] else 1
        h = torch.arange(heads, device=device)[:, None, None]
        mask = torch.as_tensor(layout_mask_mod(layout)(0, h, q, k))
        return torch.broadcast_to(mask, (heads, q_len, kv_len)).unsqueeze(0)  # (1, 1 | H, Lq, Lk)

    return cached(("dense", layout, q_len, kv_len, str(device)), build)


def pattern_bool_mask(spec, seq_len: int, num_heads: int, device) -> torch.Tensor:
    """The pattern of `spec` (an `HSASpec`) as a cached ``(1, 1 | H, T, T)`` boolean mask (H only with head_split)."""
    return dense_mask(("pattern", spec, num_heads if spec.head_split else 0), seq_len, seq_len, torch.device(device))
