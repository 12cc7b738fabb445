"""Hybrid Sparse Attention (HSA) patterns as pure mask functions.

A pattern is a function ``fn(b, h, q_idx, kv_idx) -> bool`` (FlexAttention's ``mask_mod`` signature) that says
whether query position ``q_idx`` may attend key position ``kv_idx``. The arguments are integer tensors that
broadcast against each other (or plain ints), so the same function builds a dense boolean mask, a FlexAttention
``BlockMask`` and transformers' ``mask_function`` overlays. Validation happens in the factories: the returned
functions are traced and must stay branch-free.

Definitions (Child et al. 2019, "Generating Long Sequences with Sparse Transformers"; SPEC section 2), with
``d = q - k``:

- ``local(w)``:         ``0 <= d < w``
- ``strided(s)``:       ``d >= 0 and d % s == 0``
- ``local_strided``:    the union of the two
- ``fixed(c)``:         ``d >= 0 and (q // c == k // c or k % c == c - 1)`` (own block, or a summary position)
- ``dense``:            ``d >= 0`` (causal)

This module imports torch only; it knows nothing of transformers.
"""

from collections.abc import Callable

import torch

PATTERNS = ("dense", "local", "strided", "local_strided", "fixed")

MaskFn = Callable[..., torch.Tensor]


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be a positive int, got {value!r} of type {type(value).__name__}.")
    if value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value}. Use a value >= 1.")
    return value


def check_pattern_name(pattern) -> str:
    """Return `pattern` if it names a known pattern, else raise a ValueError listing the valid names."""
    if pattern not in PATTERNS:
        raise ValueError(f"Unknown HSA pattern {pattern!r}. Valid patterns: {', '.join(PATTERNS)}.")
    return pattern


def generate_dense_causal_mask() -> MaskFn:
    """Causal attention: every key at or before the query."""

    def dense_causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    return dense_causal


def generate_local_mask(window: int) -> MaskFn:
    """Sliding window of `window` keys ending at the query: ``0 <= q - k < window``."""
    _check_positive_int("window", window)

    def local_mask(b, h, q_idx, kv_idx):
        diff = q_idx - kv_idx
        return (diff >= 0) & (diff < window)

    local_mask.__name__ = f"local_{window}"
    return local_mask


def generate_strided_mask(stride: int) -> MaskFn:
    """Every `stride`-th key back from the query: ``q >= k and (q - k) % stride == 0``."""
    _check_positive_int("stride", stride)

    def strided_mask(b, h, q_idx, kv_idx):
        diff = q_idx - kv_idx
        return (diff >= 0) & (diff % stride == 0)

    strided_mask.__name__ = f"strided_{stride}"
    return strided_mask


def generate_local_strided_mask(window: int, stride: int) -> MaskFn:
    """Union of `local(window)` and `strided(stride)` (Sparse Transformer "strided" attention, both heads merged)."""
    _check_positive_int("window", window)
    _check_positive_int("stride", stride)

    def local_strided_mask(b, h, q_idx, kv_idx):
        diff = q_idx - kv_idx
        return (diff >= 0) & ((diff < window) | (diff % stride == 0))

    local_strided_mask.__name__ = f"local_{window}_strided_{stride}"
    return local_strided_mask


def generate_fixed_mask(block: int) -> MaskFn:
    """Sparse Transformer "fixed" attention: causal, and the key is in the query's block of `block` positions
    or is a summary position (the last of a block, ``k % block == block - 1``)."""
    _check_positive_int("block", block)

    def fixed_mask(b, h, q_idx, kv_idx):
        same_block = (q_idx // block) == (kv_idx // block)
        summary = (kv_idx % block) == (block - 1)
        return (q_idx >= kv_idx) & (same_block | summary)

    fixed_mask.__name__ = f"fixed_{block}"
    return fixed_mask


def generate_head_split_mask(window: int, stride: int, num_heads: int) -> MaskFn:
    """Heads ``[0, num_heads // 2)`` attend `local(window)`, the other half `strided(stride)`."""
    _check_positive_int("window", window)
    _check_positive_int("stride", stride)
    _check_positive_int("num_heads", num_heads)
    if num_heads % 2:
        raise ValueError(f"`head_split=True` needs an even number of heads, got num_heads={num_heads}.")
    half = num_heads // 2

    def head_split_mask(b, h, q_idx, kv_idx):
        diff = q_idx - kv_idx
        local = (diff >= 0) & (diff < window)
        strided = (diff >= 0) & (diff % stride == 0)
        is_local_head = h < half
        return (is_local_head & local) | (~is_local_head & strided)

    head_split_mask.__name__ = f"head_split_local_{window}_strided_{stride}"
    return head_split_mask


def pattern_mask_fn(
    pattern: str,
    window: int = 128,
    stride: int = 128,
    block: int = 128,
    head_split: bool = False,
    num_heads: int | None = None,
) -> MaskFn:
    """Resolve a pattern name to its mask function.

    With ``head_split=True`` the pattern must be ``"local_strided"``: instead of the union on every head, half the
    heads (the first ``num_heads // 2``) attend locally and the other half strided; `num_heads` is then required.
    """
    check_pattern_name(pattern)
    if not isinstance(head_split, bool):
        raise TypeError(f"`head_split` must be a bool, got {head_split!r}.")
    if head_split:
        if pattern != "local_strided":
            raise ValueError(
                f"`head_split=True` splits heads between local and strided attention; it needs "
                f"pattern='local_strided', got pattern={pattern!r}."
            )
        if num_heads is None:
            raise ValueError("`head_split=True` needs `num_heads` (the number of query heads).")
        return generate_head_split_mask(window, stride, num_heads)
    if pattern == "dense":
        return generate_dense_causal_mask()
    if pattern == "local":
        return generate_local_mask(window)
    if pattern == "strided":
        return generate_strided_mask(stride)
    if pattern == "local_strided":
        return generate_local_strided_mask(window, stride)
    return generate_fixed_mask(block)


def _attended_per_query(pattern: str, q: torch.Tensor, window: int, stride: int, block: int) -> torch.Tensor:
    """Number of keys ``k <= q`` each query position in `q` (int64) attends, in closed form."""
    if pattern == "dense":
        return q + 1
    local = torch.clamp(q + 1, max=window)  # keys q-w+1 .. q
    strided = q // stride + 1  # keys q, q-s, q-2s, ... >= 0
    if pattern == "local":
        return local
    if pattern == "strided":
        return strided
    if pattern == "local_strided":
        # keys in both sets: q - j*s with j*s <= q and j*s < w
        overlap = torch.clamp(q // stride, max=(window - 1) // stride) + 1
        return local + strided - overlap
    # fixed: the block's keys up to q, plus the summary key of every earlier block
    return q % block + 1 + q // block


def mean_attended_keys(
    pattern: str,
    seq_len: int,
    window: int = 128,
    stride: int = 128,
    block: int = 128,
    head_split: bool = False,
) -> float:
    """Exact mean, over query positions ``q in [0, seq_len)``, of the number of keys ``k <= q`` the pattern admits.

    This is ``k_bar`` in the attention FLOP count (SPEC section 3: forward ``4 * d_model * k_bar`` per token and
    layer). Closed forms per query (summed exactly in int64):
    dense ``q + 1``; local ``min(q + 1, w)``; strided ``q // s + 1``; local_strided
    ``local + strided - (min(q // s, (w - 1) // s) + 1)``; fixed ``q % c + 1 + q // c``.
    With ``head_split=True`` (local_strided only) half the heads are local and half strided: the mean of the two.
    Dense gives ``(seq_len + 1) / 2``.
    """
    check_pattern_name(pattern)
    _check_positive_int("seq_len", seq_len)
    _check_positive_int("window", window)
    _check_positive_int("stride", stride)
    _check_positive_int("block", block)
    q = torch.arange(seq_len, dtype=torch.int64)
    if head_split:
        if pattern != "local_strided":
            raise ValueError(f"`head_split=True` needs pattern='local_strided', got pattern={pattern!r}.")
        total = int(_attended_per_query("local", q, window, stride, block).sum()) + int(
            _attended_per_query("strided", q, window, stride, block).sum()
        )
        return total / (2 * seq_len)
    return int(_attended_per_query(pattern, q, window, stride, block).sum()) / seq_len


def attention_density(
    pattern: str,
    seq_len: int,
    window: int = 128,
    stride: int = 128,
    block: int = 128,
    head_split: bool = False,
) -> float:
    """Attended (query, key) pairs over causal pairs: ``mean_attended_keys / ((seq_len + 1) / 2)``, in (0, 1]."""
    mean = mean_attended_keys(pattern, seq_len, window, stride, block, head_split)
    return mean / ((seq_len + 1) / 2)
