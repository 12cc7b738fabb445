"""The model's own sliding windows: which layers have one (read from its config) and how many keys a query attends
within one, with or without the HSA pattern.

A layer with a sliding window ``w`` lets query ``q`` attend key ``k`` when ``0 <= q - k < w`` (transformers'
``sliding_window_overlay``: ``kv_idx > q_idx - sliding_window``), so a query sees ``min(q + 1, w)`` keys, itself
included. MST composes its HSA pattern with that window (`mst_hf.attention.interface`), so a sparse windowed layer
attends the intersection of the two. The FLOP count (:mod:`mst_hf.flops`) charges each layer at its own ``k_bar``.
"""

from collections.abc import Sequence

import torch

from .attention.patterns import HSASpec


def layer_windows(config, n_layers: int) -> tuple[int | None, ...]:
    """Each layer's sliding window as transformers applies it, or ``()`` when no layer has one.

    With ``layer_types`` (Gemma 2/3, Qwen2 with ``use_sliding_window``), the ``"sliding_attention"`` layers use
    ``sliding_window`` and the others attend fully; without it (Mistral, Mixtral, Qwen3-MoE), a ``sliding_window``
    that is set applies to every layer."""
    window = getattr(config, "sliding_window", None)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1 or n_layers == 0:
        return ()
    types = getattr(config, "layer_types", None)
    if types is None:
        return (window,) * n_layers
    if len(types) != n_layers:
        raise ValueError(f"The model config's `layer_types` has {len(types)} entries for {n_layers} layers "
                         "(`num_hidden_layers`); give one type per layer.")
    windows = tuple(window if t == "sliding_attention" else None for t in types)
    return windows if any(w is not None for w in windows) else ()


def _keys_in_window(pattern: str, q: torch.Tensor, spec: HSASpec, w: int) -> torch.Tensor:
    """Keys each query in `q` (int64) attends under `pattern` (spec's sizes) within the window ``q - k < w``,
    in closed form (the same per-query forms as `mst_hf.attention.patterns.mean_attended_keys`, windowed)."""
    s, c = spec.stride, spec.block
    if pattern == "dense":
        return torch.clamp(q + 1, max=w)
    if pattern == "local":
        return torch.clamp(q + 1, max=min(spec.window, w))
    if pattern == "strided":  # keys q - j*s with j*s <= q and j*s < w
        return torch.clamp(q // s, max=(w - 1) // s) + 1
    if pattern == "local_strided":  # local(min(window, w)) + strided-in-w - their overlap
        local_w = min(spec.window, w)
        overlap = torch.clamp(q // s, max=(local_w - 1) // s) + 1
        return torch.clamp(q + 1, max=local_w) + torch.clamp(q // s, max=(w - 1) // s) + 1 - overlap
    # fixed: the keys of the query's block within the window, plus the summary keys (k % c == c - 1) of earlier
    # blocks within the window
    lo = torch.clamp(q - w + 1, min=0)
    own = q - torch.maximum((q // c) * c, lo) + 1
    return own + torch.clamp(q // c - lo // c, min=0)


def mean_keys_in_window(spec: HSASpec | None, seq_len: int, window: int | None) -> float:
    """Exact mean, over queries ``q in [0, seq_len)``, of the keys a layer attends: dense causal (``spec`` None) or
    ``spec``'s pattern, within the sliding ``window`` (``None``: no window). With ``head_split`` half the heads
    are local and half strided: the mean of the two."""
    if window is None or window >= seq_len:
        return (seq_len + 1) / 2 if spec is None else spec.mean_attended_keys(seq_len)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"`sliding_window` must be a positive int, got {window!r}.")
    q = torch.arange(seq_len, dtype=torch.int64)
    if spec is None:
        return int(_keys_in_window("dense", q, HSASpec(), window).sum()) / seq_len
    if spec.head_split:
        total = sum(int(_keys_in_window(p, q, spec, window).sum()) for p in ("local", "strided"))
        return total / (2 * seq_len)
    return int(_keys_in_window(spec.pattern, q, spec, window).sum()) / seq_len


def layer_k_bar(spec: HSASpec, sparse_layers: Sequence[int], windows: Sequence[int | None],
                seq_len: int) -> list[float]:
    """``k_bar`` of every layer (one per entry of ``windows``): ``spec``'s pattern on ``sparse_layers``, dense
    causal elsewhere, each within its window."""
    sparse = set(sparse_layers)
    means: dict = {}
    for i, w in enumerate(windows):
        key = (i in sparse, w)
        if key not in means:
            means[key] = mean_keys_in_window(spec if key[0] else None, seq_len, w)
    return [means[(i in sparse, w)] for i, w in enumerate(windows)]
