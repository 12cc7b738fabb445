"""HSA patterns on FlexAttention: cached ``BlockMask``s and layouts that make each pattern block-sparse.

Local runs as is; strided in the residue-class layout (copied so several classes share a block); fixed with the
summary keys prepended; local_strided as a local and a strided attention over disjoint key sets, merged through
their log-sum-exps. The layouts call an "attend" engine that returns ``(out, lse)``: ``"flex"`` (compiled on
CUDA) or ``"math"`` (differentiable float math; lets CPU tests check the layouts and the merge, gradients
included).
"""

import inspect

import torch
import torch.nn.functional as F

from .common import cached, dense_mask, expand_kv, layout_mask_mod, masked_attention

try:
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # torch without FlexAttention: every backend but "flex" still works
    BlockMask = flex_attention = None

FLEX_BLOCK = 128  # FlexAttention's default BLOCK_SIZE; the layouts align to it


# ---------------------------------------------------------------------------------------------------------------
# BlockMasks, cached by (layout key, lengths, device)
# ---------------------------------------------------------------------------------------------------------------


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
        mask_mod = layout_mask_mod(layout)
        any_blocks, all_blocks = _block_tables(mask_mod, q_len, kv_len, device)
        partial_num, partial_idx = _kv_table(any_blocks & ~all_blocks)
        full_num, full_idx = _kv_table(all_blocks)
        kwargs = {}
        if "seq_lengths" in inspect.signature(BlockMask.from_kv_blocks).parameters:
            kwargs["seq_lengths"] = (q_len, kv_len)
        return BlockMask.from_kv_blocks(
            partial_num, partial_idx, full_num, full_idx, BLOCK_SIZE=FLEX_BLOCK, mask_mod=mask_mod, **kwargs
        )

    return cached(("block", layout, q_len, kv_len, str(device)), build)

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
        return masked_attention(q, k, v, mask, scale)
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
    return (dense_mask if engine == "math" else _block_mask)(layout, q_len, kv_len, device)


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
        key, value = expand_kv(key, query.shape[1]), expand_kv(value, query.shape[1])
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


def pattern_attention(query, key, value, spec, scale, engine="flex"):
    """`spec`'s pattern (an `HSASpec`) on a plain causal sequence through its flex layout; ``(B, H, T, D)``."""
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


def flex_block_counts(spec, seq_len: int, device="cpu") -> tuple[int, int]:
    """(128x128 blocks the flex kernel computes, blocks of plain causal attention) at this length, for one head
    (head_split: mean of the two halves)."""
    def count(layout, q_len, kv_len):
        any_blocks, _ = _block_tables(layout_mask_mod(layout), q_len, kv_len, torch.device(device))
        return int(any_blocks.sum())

    n_cls = -(-seq_len // spec.stride)
    strided = count(("class_causal", n_cls, 0), n_cls * spec.stride, n_cls * spec.stride)
    if spec.head_split:
        blocks = (count(("local", spec.window), seq_len, seq_len) + strided) // 2
    elif spec.pattern == "local":
        blocks = count(("local", spec.window), seq_len, seq_len)
    elif spec.pattern == "strided":
        blocks = strided
    elif spec.pattern == "local_strided":
        gap = -(-spec.window // spec.stride)
        strided_rest = count(("class_causal", n_cls, gap), n_cls * spec.stride, n_cls * spec.stride)
        blocks = count(("local", spec.window), seq_len, seq_len) + strided_rest
    elif spec.pattern == "fixed":
        n_pad = -(-(seq_len // spec.block) // FLEX_BLOCK) * FLEX_BLOCK
        blocks = count(("fixed_concat", spec.block, n_pad), seq_len, n_pad + seq_len)
    else:
        blocks = count(("pattern", spec, 0), seq_len, seq_len)
    nb = -(-seq_len // FLEX_BLOCK)
    return blocks, nb * (nb + 1) // 2
