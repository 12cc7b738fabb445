"""The pieces of the HSA kernels that FlexAttention needs: pattern specs, the masked float reference, the cached
boolean masks and BlockMasks, and the block-sparse flex layouts (local; strided in the residue-class layout; fixed
with the summary keys prepended; local_strided as two attentions over disjoint key sets merged through their
log-sum-exps). `mst_hf.attention_kernels` adds the SDPA kernels and the dispatch on top.

The layouts call an "attend" engine that returns ``(out, lse)``: ``"flex"`` (compiled on CUDA) or ``"math"``
(differentiable float math; lets CPU tests check the layouts and the merge, gradients included).
"""

import inspect
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .patterns import generate_local_mask, pattern_mask_fn

try:
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # torch without FlexAttention: every backend but "flex" still works
    BlockMask = flex_attention = None


KERNELS = ("sdpa_causal", "sdpa_bool", "eager", "perm_sdpa", "chunk_sdpa", "flex", "triton")
BACKENDS = ("auto", "flex", "triton", "sdpa", "eager")
FLEX_BLOCK = 128  # FlexAttention's default BLOCK_SIZE; the layouts align to it
_CACHE_SIZE = 32


@dataclass(frozen=True)
class PatternSpec:
    """An HSA pattern with its parameters; hashable, so it keys the mask caches."""

    pattern: str = "local_strided"
    window: int = 128
    stride: int = 128
    block: int = 128
    head_split: bool = False

    def mask_fn(self, num_heads: int | None = None):
        return pattern_mask_fn(self.pattern, self.window, self.stride, self.block, self.head_split, num_heads)


def _expand_kv(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    if x.shape[1] == num_heads:
        return x
    return x.repeat_interleave(num_heads // x.shape[1], dim=1)  # (B, H, T, D)


def _math_attention(query, key, value, mask, scaling=None):
    """Masked softmax attention, differentiable, in the inputs' dtype. Returns ``(out, lse)``; a row with no admitted
    key gives out 0 and lse -inf (as FlexAttention does)."""
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    key, value = _expand_kv(key, query.shape[1]), _expand_kv(value, query.shape[1])
    scores = (query @ key.transpose(-1, -2)) * scale  # (B, H, Lq, Lk)
    has_key = mask.any(-1, keepdim=True)
    scores = scores.masked_fill(~mask, float("-inf"))
    scores = torch.where(has_key, scores, torch.zeros_like(scores))  # finite dummy row, zeroed below
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    out = torch.exp(scores - lse) @ value
    out = torch.where(has_key, out, torch.zeros_like(out))
    lse = torch.where(has_key, lse, torch.full_like(lse, float("-inf")))
    return out, lse.squeeze(-1)


def reference_attention(query, key, value, mask, scaling=None) -> torch.Tensor:
    """The oracle: softmax attention in float32 under an explicit boolean `mask` (True = attend), broadcastable to
    ``(B, H, Lq, Lk)``. Grouped-query key/value heads are repeated. Returns ``(B, H, Lq, D)`` float32."""
    out, _ = _math_attention(query.float(), key.float(), value.float(), mask, scaling)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Masks: dense boolean masks and FlexAttention BlockMasks, cached by (layout key, lengths, device)
# ---------------------------------------------------------------------------------------------------------------
_MASKS: OrderedDict = OrderedDict()


def _cached(key, build):
    if key in _MASKS:
        _MASKS.move_to_end(key)
        return _MASKS[key]
    value = build()
    _MASKS[key] = value
    if len(_MASKS) > _CACHE_SIZE:
        _MASKS.popitem(last=False)
    return value


def _layout_mask_mod(layout: tuple):
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


def _dense_mask(layout, q_len, kv_len, device):
    def build():
        q = torch.arange(q_len, device=device)[:, None]
        k = torch.arange(kv_len, device=device)[None, :]
        heads = layout[2] if layout[0] == "pattern" and layout[2] else 1
        h = torch.arange(heads, device=device)[:, None, None]
        mask = torch.as_tensor(_layout_mask_mod(layout)(0, h, q, k))
        return torch.broadcast_to(mask, (heads, q_len, kv_len)).unsqueeze(0)  # (1, 1 | H, Lq, Lk)

    return _cached(("dense", layout, q_len, kv_len, str(device)), build)


def _block_tables(mask_mod, q_len, kv_len, device, block=FLEX_BLOCK):
    """(any, all) per (q block, kv block), evaluating the mask in chunks of at most 2**26 elements."""
    nq, nk = -(-q_len // block), -(-kv_len // block)
    kv = torch.arange(nk * block, device=device)[None, :]
    rows = max(1, (1 << 26) // (block * block * nk))
    any_blocks, all_blocks = [], []
    for start in range(0, nq, rows):
        stop = min(nq, start + rows)
        q = torch.arange(start * block, stop * block, device=device)[:, None]
        m = torch.as_tensor(mask_mod(0, 0, q, kv)) & (q < q_len) & (kv < kv_len)
        m = m.view(stop - start, block, nk, block)
        any_blocks.append(m.any(3).any(1))
        all_blocks.append(m.all(3).all(1))
    return torch.cat(any_blocks), torch.cat(all_blocks)  # (nq, nk) each


def _kv_table(selected):
    num = selected.sum(-1).to(torch.int32)[None, None]  # (1, 1, nq)
    idx = torch.sort((~selected).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)[None, None]
    return num, idx  # selected kv blocks first, in increasing order


def _block_mask(layout, q_len, kv_len, device):
    def build():
        mask_mod = _layout_mask_mod(layout)
        any_blocks, all_blocks = _block_tables(mask_mod, q_len, kv_len, device)
        partial_num, partial_idx = _kv_table(any_blocks & ~all_blocks)
        full_num, full_idx = _kv_table(all_blocks)
        kwargs = {}
        if "seq_lengths" in inspect.signature(BlockMask.from_kv_blocks).parameters:
            kwargs["seq_lengths"] = (q_len, kv_len)
        return BlockMask.from_kv_blocks(
            partial_num, partial_idx, full_num, full_idx, BLOCK_SIZE=FLEX_BLOCK, mask_mod=mask_mod, **kwargs
        )

    return _cached(("block", layout, q_len, kv_len, str(device)), build)


# ---------------------------------------------------------------------------------------------------------------
# Flex layouts. Each `_*_layout` function is pure (tensors and masks in, tensors out) and, on CUDA, compiled once
# as a whole: the permutation copies, the summary concatenation and the LSE merge are fused by Inductor around the
# flex kernels, and each function keeps its own dynamo cache (one entry per shape and mask).
# ---------------------------------------------------------------------------------------------------------------
def flex_available() -> bool:
    return flex_attention is not None


def _lse_request() -> dict:
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:  # torch < 2.9
        return {"return_lse": True}
    return {"return_aux": AuxRequest(lse=True)}


_LSE_REQUEST = _lse_request() if flex_available() else {}
_COMPILED: dict = {}


def _attend(q, k, v, mask, scale, engine):
    """``(out, lse)`` of `q` over `k`, `v`; `mask` is a BlockMask (engine "flex") or a boolean tensor ("math")."""
    if engine == "math":
        return _math_attention(q, k, v, mask, scale)
    gqa = q.shape[1] != k.shape[1]
    out, aux = flex_attention(q, k, v, block_mask=mask, scale=scale, enable_gqa=gqa, **_LSE_REQUEST)
    return out, (aux if isinstance(aux, torch.Tensor) else aux.lse)


def _to_classes(x, stride):
    """(B, H, T, D) -> (B, H, s * n, D): residue class r (positions r, r + s, ...) at rows [r * n, (r + 1) * n).
    T is padded to n * s with zeros at the end: padded keys come after every real query of their class."""
    B, H, T, D = x.shape
    n = -(-T // stride)
    x = F.pad(x, (0, 0, 0, n * stride - T))
    return x.view(B, H, n, stride, D).transpose(2, 3).reshape(B, H, stride * n, D)


def _from_classes(y, stride, seq_len):
    """Inverse of `_to_classes` for ``(B, H, s * n, D)`` or ``(B, H, s * n)``."""
    B, H, L = y.shape[:3]
    n = L // stride
    if y.dim() == 3:
        return y.view(B, H, stride, n).transpose(2, 3).reshape(B, H, L)[:, :, :seq_len]
    return y.view(B, H, stride, n, -1).transpose(2, 3).reshape(B, H, L, -1)[:, :, :seq_len]


def _merge(out_a, lse_a, out_b, lse_b):
    """Attention over the union of two disjoint key sets from the parts: weights ``exp(lse_part - lse_union)``."""
    lse = torch.logaddexp(lse_a, lse_b)
    w_a = torch.exp(lse_a - lse).unsqueeze(-1)
    w_b = torch.exp(lse_b - lse).unsqueeze(-1)
    return (out_a.float() * w_a + out_b.float() * w_b).to(out_a.dtype), lse


def _local_layout(q, k, v, mask, scale, engine):
    return _attend(q, k, v, mask, scale, engine)


def _strided_layout(q, k, v, mask, scale, stride, engine):
    seq_len = q.shape[2]
    out, lse = _attend(_to_classes(q, stride), _to_classes(k, stride), _to_classes(v, stride), mask, scale, engine)
    return _from_classes(out, stride, seq_len), _from_classes(lse, stride, seq_len)


def _local_strided_layout(q, k, v, local_mask, class_mask, scale, stride, engine):
    out_l, lse_l = _attend(q, k, v, local_mask, scale, engine)
    out_s, lse_s = _strided_layout(q, k, v, class_mask, scale, stride, engine)
    return _merge(out_l, lse_l, out_s, lse_s)


def _head_split_layout(q, k, v, local_mask, class_mask, scale, stride, engine):
    half, kv_half = q.shape[1] // 2, k.shape[1] // 2
    out_l, _ = _attend(q[:, :half], k[:, :kv_half], v[:, :kv_half], local_mask, scale, engine)
    out_s, _ = _strided_layout(q[:, half:], k[:, kv_half:], v[:, kv_half:], class_mask, scale, stride, engine)
    return torch.cat([out_l, out_s], dim=1), None


def _with_summaries(x, block, n_pad):
    """``[keys at c-1, 2c-1, ... zero-padded to n_pad] + [all keys]`` along the sequence."""
    summaries = x[:, :, block - 1 :: block]
    return torch.cat([F.pad(summaries, (0, 0, 0, n_pad - summaries.shape[2])), x], dim=2)


def _fixed_layout(q, k, v, mask, scale, block, n_pad, engine):
    return _attend(q, _with_summaries(k, block, n_pad), _with_summaries(v, block, n_pad), mask, scale, engine)


def _run_layout(fn, engine, device, *args):
    if engine == "flex" and device.type == "cuda":
        if fn not in _COMPILED:
            _COMPILED[fn] = torch.compile(fn, dynamic=False)
        fn = _COMPILED[fn]
    return fn(*args, engine)


def _layout_mask(layout, q_len, kv_len, device, engine):
    return (_dense_mask if engine == "math" else _block_mask)(layout, q_len, kv_len, device)


def local_attention(query, key, value, window, scale, engine="flex"):
    T = query.shape[2]
    mask = _layout_mask(("local", window), T, T, query.device, engine)
    return _run_layout(_local_layout, engine, query.device, query, key, value, mask, scale)


def strided_attention(query, key, value, stride, scale, engine="flex"):
    """Strided attention in the residue-class layout (causal inside each class of ``ceil(T / s)`` positions)."""
    L = -(-query.shape[2] // stride) * stride
    mask = _layout_mask(("class_causal", L // stride, 0), L, L, query.device, engine)
    return _run_layout(_strided_layout, engine, query.device, query, key, value, mask, scale, stride)


def local_strided_attention(query, key, value, window, stride, scale, engine="flex"):
    """local(w) on all its keys, strided on the keys local does not hold (``q - k >= ceil(w / s) * s``), merged."""
    T, L = query.shape[2], -(-query.shape[2] // stride) * stride
    local = _layout_mask(("local", window), T, T, query.device, engine)
    strided_rest = _layout_mask(("class_causal", L // stride, -(-window // stride)), L, L, query.device, engine)
    args = (query, key, value, local, strided_rest, scale, stride)
    return _run_layout(_local_strided_layout, engine, query.device, *args)


def head_split_attention(query, key, value, window, stride, scale, engine="flex"):
    """First half of the heads local(w), second half strided(s)."""
    if key.shape[1] % 2:
        key, value = _expand_kv(key, query.shape[1]), _expand_kv(value, query.shape[1])
    T, L = query.shape[2], -(-query.shape[2] // stride) * stride
    local = _layout_mask(("local", window), T, T, query.device, engine)
    strided = _layout_mask(("class_causal", L // stride, 0), L, L, query.device, engine)
    return _run_layout(_head_split_layout, engine, query.device, query, key, value, local, strided, scale, stride)


def fixed_attention(query, key, value, block, scale, engine="flex"):
    """Keys become ``[summary keys (positions c-1, 2c-1, ...) padded to a multiple of 128] + [all keys]``: a query
    sees the summaries of earlier blocks and its own block, two or three 128-blocks instead of the whole prefix."""
    T = query.shape[2]
    n_pad = -(-(T // block) // FLEX_BLOCK) * FLEX_BLOCK
    mask = _layout_mask(("fixed_concat", block, n_pad), T, n_pad + T, query.device, engine)
    return _run_layout(_fixed_layout, engine, query.device, query, key, value, mask, scale, block, n_pad)


def _flex_pattern(query, key, value, spec, scale, engine):
    if engine == "flex" and query.device.type == "cpu" and torch.is_grad_enabled():
        if any(x.requires_grad for x in (query, key, value)):
            raise NotImplementedError(
                "FlexAttention has no backward on CPU: use backend='sdpa' (or 'auto') on CPU, or run on CUDA."
            )
    if spec.head_split:
        return head_split_attention(query, key, value, spec.window, spec.stride, scale, engine)[0]
    if spec.pattern == "local":
        return local_attention(query, key, value, spec.window, scale, engine)[0]
    if spec.pattern == "strided":
        return strided_attention(query, key, value, spec.stride, scale, engine)[0]
    if spec.pattern == "local_strided":
        return local_strided_attention(query, key, value, spec.window, spec.stride, scale, engine)[0]
    if spec.pattern == "fixed":
        return fixed_attention(query, key, value, spec.block, scale, engine)[0]
    T = query.shape[2]  # dense through flex: only for comparisons
    mask = _layout_mask(("pattern", spec, 0), T, T, query.device, engine)
    return _run_layout(_local_layout, engine, query.device, query, key, value, mask, scale)[0]
