"""Attention kernels for HSA patterns on a plain causal sequence, and the masked reference they are tested against.

All functions take ``query (B, H, T, D)`` and ``key``/``value`` ``(B, Hkv, T, D)`` (``H % Hkv == 0``: grouped-query
attention) and return ``(B, H, T, D)``. Kernels (the names `run_kernel`, `auto_candidates` and the benchmark use):

- ``sdpa_causal``: SDPA with ``is_causal=True`` (the dense pattern only).
- ``sdpa_bool``:   SDPA with the pattern as a boolean mask: correct for every pattern and device, no sparsity win.
- ``eager``:       `reference_attention` (float32 math with an explicit mask); the oracle.
- ``perm_sdpa``:   strided. Positions with the same ``q mod s`` form a residue class; the strided pattern is plain
                   causal attention inside each class, so fold the classes into the heads (a view) and run causal SDPA.
- ``chunk_sdpa``:  local and fixed. Chunks of queries, each against a small key set (local: previous + own chunk;
                   fixed: the summary keys + own block) with one shared chunk mask, on SDPA's masked kernel.
- ``flex``:        FlexAttention with a cached ``BlockMask`` and layouts that make the pattern block-sparse:
                   local as is; strided in the residue-class layout (copied so several classes share a block);
                   fixed with the summary keys prepended; local_strided as a local and a strided attention over
                   disjoint key sets, merged through their log-sum-exps.

The flex layouts call an "attend" engine that returns ``(out, lse)``: ``"flex"`` (compiled on CUDA) or ``"math"``
(differentiable float math; lets CPU tests check the layouts and the merge, gradients included).
"""

import inspect
import math
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .patterns import check_pattern_name, generate_local_mask, pattern_mask_fn

try:
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # torch without FlexAttention: every backend but "flex" still works
    BlockMask = flex_attention = None


KERNELS = ("sdpa_causal", "sdpa_bool", "eager", "perm_sdpa", "chunk_sdpa", "flex")
BACKENDS = ("auto", "flex", "sdpa", "eager")
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


# ---------------------------------------------------------------------------------------------------------------
# SDPA layouts: plain SDPA kernels (flash / memory-efficient) on re-viewed tensors; dropout works here
# ---------------------------------------------------------------------------------------------------------------
def strided_perm_sdpa(query, key, value, stride, scale, dropout=0.0):
    """Strided attention as causal SDPA with the residue classes folded into the heads: ``(B, s * H, n, D)``, head
    ``r * H + h``. A view, no copy, for transformers' ``(B, T, H, D)`` memory layout when ``s`` divides T."""
    B, H, T, D = query.shape
    n = -(-T // stride)

    def fold(x):  # (B, h, T, D) -> (B, s * h, n, D)
        x = F.pad(x, (0, 0, 0, n * stride - T)) if n * stride != T else x
        return x.transpose(1, 2).reshape(B, n, stride * x.shape[1], D).transpose(1, 2)

    gqa = {"enable_gqa": True} if key.shape[1] != H else {}
    out = F.scaled_dot_product_attention(
        fold(query), fold(key), fold(value), dropout_p=dropout, is_causal=True, scale=scale, **gqa
    )  # (B, s * H, n, D)
    return out.transpose(1, 2).reshape(B, n * stride, H, D).transpose(1, 2)[:, :, :T]


def _chunks(x, size):
    """(B, H, T, D) -> (B, nc, H, size, D), T zero-padded to nc * size (a view for the (B, T, H, D) layout)."""
    B, H, T, D = x.shape
    nc = -(-T // size)
    x = F.pad(x, (0, 0, 0, nc * size - T)) if nc * size != T else x
    return x.reshape(B, H, nc, size, D).transpose(1, 2)


def _chunk_mask(kind, param, size, extra, nc, batch, device):
    """(batch * nc, 1, size, extra + size) mask: query i of chunk c against [extra keys] + [chunk keys]."""

    def build():
        c = torch.arange(nc, device=device)[:, None, None]
        i = torch.arange(size, device=device)[None, :, None]
        j = torch.arange(extra + size, device=device)[None, None, :]
        q_pos = c * size + i
        if kind == "local":  # extra keys = the previous chunk
            k_pos = (c - 1) * size + j
            mask = (k_pos >= 0) & (q_pos - k_pos >= 0) & (q_pos - k_pos < param)
        else:  # fixed: extra keys = summaries of blocks 0..n_sum-1 (padded), chunk = block
            mask = torch.where(j < extra, (j < c) & (j < param), j - extra <= i)
        return mask.repeat(batch, 1, 1)[:, None]

    return _cached(("chunk", kind, param, size, extra, nc, batch, str(device)), build)


def _chunk_sdpa(query, k_chunks, v_chunks, mask, scale, dropout):
    """SDPA of each query chunk over its own key set: ``(B, nc, Hkv, L, D)`` keys -> ``(B, H, T, D)``."""
    B, H, T, D = query.shape
    q = _chunks(query, mask.shape[-2])
    nc, size = q.shape[1], q.shape[3]
    k, v = (_expand_kv(x.flatten(0, 1), H) for x in (k_chunks, v_chunks))  # (B * nc, H, L, D)
    out = F.scaled_dot_product_attention(q.flatten(0, 1), k, v, attn_mask=mask, dropout_p=dropout, scale=scale)
    return out.view(B, nc, H, size, D).transpose(1, 2).reshape(B, H, nc * size, D)[:, :, :T]


def local_chunk_sdpa(query, key, value, window, scale, dropout=0.0):
    """local(w) as SDPA over chunks of ``C >= w`` queries, each against [previous chunk] + [its chunk] (2C keys)."""
    size = -(-window // 16) * 16
    kc, vc = _chunks(key, size), _chunks(value, size)
    k2, v2 = (torch.cat([F.pad(x[:, :-1], (0, 0, 0, 0, 0, 0, 1, 0)), x], dim=3) for x in (kc, vc))
    mask = _chunk_mask("local", window, size, size, kc.shape[1], query.shape[0], query.device)
    return _chunk_sdpa(query, k2, v2, mask, scale, dropout)


def fixed_chunk_sdpa(query, key, value, block, scale, dropout=0.0):
    """fixed(c) as SDPA over blocks of c queries, each against [summaries of all blocks] + [its block]."""
    n_sum = key.shape[2] // block
    n_pad = max(16, -(-n_sum // 16) * 16)
    kc, vc = _chunks(key, block), _chunks(value, block)
    nc = kc.shape[1]

    def with_summaries(x, chunks):
        s = F.pad(x[:, :, block - 1 :: block], (0, 0, 0, n_pad - n_sum))  # (B, Hkv, n_pad, D)
        return torch.cat([s[:, None].expand(-1, nc, -1, -1, -1), chunks], dim=3)  # (B, nc, Hkv, n_pad + c, D)

    mask = _chunk_mask("fixed", n_sum, block, n_pad, nc, query.shape[0], query.device)
    return _chunk_sdpa(query, with_summaries(key, kc), with_summaries(value, vc), mask, scale, dropout)


def pattern_bool_mask(spec: PatternSpec, seq_len: int, num_heads: int, device) -> torch.Tensor:
    """The pattern as a cached ``(1, 1 | H, T, T)`` boolean mask (H only with head_split)."""
    return _dense_mask(("pattern", spec, num_heads if spec.head_split else 0), seq_len, seq_len, torch.device(device))


# ---------------------------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------------------------
_AUTO_CHOICE: dict = {}


def auto_candidates(spec: PatternSpec, seq_len: int, head_dim: int, device, dropout=0.0) -> list:
    """Correct kernels `auto` chooses among, for this pattern and shape (CUDA: measured once, fastest wins)."""
    if spec.pattern == "dense":
        return ["sdpa_causal"]
    if torch.device(device).type != "cuda":
        return ["sdpa_bool"]
    candidates = []
    # flex: no dropout, head_dim >= 16, lengths in whole 128-blocks (each new length is a new compiled kernel)
    if dropout == 0.0 and flex_available() and head_dim >= 16 and seq_len % FLEX_BLOCK == 0:
        candidates.append("flex")
    if spec.pattern in ("local", "fixed") and not spec.head_split:
        candidates.append("chunk_sdpa")
    if spec.pattern == "strided" and not spec.head_split:
        candidates.append("perm_sdpa")
    if seq_len <= 4096 or not candidates:  # O(T^2) memory; never the fastest at long lengths
        candidates.append("sdpa_bool")
    return candidates


def _measure(candidates, q, k, v, spec, scaling, dropout, rounds=3, reps=2) -> dict:
    """Fastest of `rounds` timings (each `reps` calls) per kernel, the kernels interleaved round by round so that
    none is timed alone on a GPU whose clocks are still ramping up after a compile. Failures drop a kernel."""

    def step(kernel):
        out = run_kernel(kernel, q, k, v, spec, scaling, dropout)
        if out.requires_grad:
            torch.autograd.grad(out, [x for x in (q, k, v) if x.requires_grad], torch.ones_like(out))

    ok = []
    for kernel in candidates:
        try:
            step(kernel)  # compile, build masks
            step(kernel)
            ok.append(kernel)
        except (RuntimeError, NotImplementedError):  # e.g. out of memory: not a candidate here
            continue
    sync = torch.cuda.synchronize if q.device.type == "cuda" else (lambda: None)
    best = {}
    for _ in range(rounds):
        for kernel in ok:
            sync()
            start = time.perf_counter()
            for _ in range(reps):
                step(kernel)
            sync()
            best[kernel] = min(best.get(kernel, float("inf")), time.perf_counter() - start)
    return best


def auto_kernel(query, key, value, spec: PatternSpec, scaling=None, dropout=0.0) -> str:
    """The kernel `auto` runs: the only candidate, or on CUDA the fastest candidate measured once per pattern,
    shape, dtype and memory layout on random inputs of the same shape (forward + backward when grad is on; RNG
    state untouched). Like ``cudnn.benchmark``: every candidate computes the same function."""
    candidates = auto_candidates(spec, query.shape[2], query.shape[3], query.device, dropout)
    if len(candidates) == 1 or torch.compiler.is_compiling():
        return candidates[0]
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (query, key, value))
    cache_key = (spec, tuple(query.shape), tuple(query.stride()), key.shape[1], query.dtype, str(query.device),
                 dropout > 0.0, grad)
    if cache_key not in _AUTO_CHOICE:
        devices = [query.device] if query.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad() if grad else torch.no_grad():
            q, k, v = (torch.randn_like(x).requires_grad_(grad) for x in (query, key, value))
            times = _measure(candidates, q, k, v, spec, scaling, dropout)
        _AUTO_CHOICE[cache_key] = min(times, key=times.get) if times else "sdpa_bool"
    return _AUTO_CHOICE[cache_key]


def choose_kernel(spec: PatternSpec, seq_len: int, head_dim: int, device, backend="auto", dropout=0.0) -> str:
    """The kernel a forced backend runs (``auto`` without measuring: its first candidate)."""
    if backend not in BACKENDS:
        raise ValueError(f"Unknown HSA backend {backend!r}. Valid backends: {', '.join(BACKENDS)}.")
    check_pattern_name(spec.pattern)
    if backend == "eager":
        return "eager"
    if spec.pattern == "dense":
        return "sdpa_causal"
    if backend == "sdpa" or dropout > 0.0:
        return "sdpa_bool"
    if backend == "flex":
        return "flex"
    return auto_candidates(spec, seq_len, head_dim, device, dropout)[0]


def run_kernel(kernel, query, key, value, spec: PatternSpec, scaling=None, dropout=0.0, engine="flex"):
    """Run one named kernel for `spec` on a plain causal sequence; returns ``(B, H, T, D)`` in the query's dtype."""
    B, H, T, D = query.shape
    if kernel == "sdpa_causal":
        gqa = {"enable_gqa": True} if key.shape[1] != H else {}
        return F.scaled_dot_product_attention(
            query, key, value, dropout_p=dropout, is_causal=True, scale=scaling, **gqa
        )
    if kernel == "sdpa_bool":
        mask = pattern_bool_mask(spec, T, H, query.device)
        return F.scaled_dot_product_attention(
            query, _expand_kv(key, H), _expand_kv(value, H), attn_mask=mask, dropout_p=dropout, scale=scaling
        )
    if kernel == "eager":
        mask = pattern_bool_mask(spec, T, H, query.device)
        return reference_attention(query, key, value, mask, scaling).to(query.dtype)
    if kernel == "perm_sdpa" and spec.pattern == "strided" and not spec.head_split:
        return strided_perm_sdpa(query, key, value, spec.stride, scaling, dropout)
    if kernel == "chunk_sdpa" and spec.pattern == "local" and not spec.head_split:
        return local_chunk_sdpa(query, key, value, spec.window, scaling, dropout)
    if kernel == "chunk_sdpa" and spec.pattern == "fixed":
        return fixed_chunk_sdpa(query, key, value, spec.block, scaling, dropout)
    if kernel == "flex":
        if dropout > 0.0:
            raise NotImplementedError(f"FlexAttention has no dropout (got dropout={dropout}); use backend='sdpa'.")
        return _flex_pattern(query, key, value, spec, math.sqrt(1 / D) if scaling is None else scaling, engine)
    if kernel in KERNELS:
        raise ValueError(f"kernel {kernel!r} does not compute {spec}; see auto_candidates().")
    raise ValueError(f"Unknown kernel {kernel!r}. Valid kernels: {', '.join(KERNELS)}.")


def hsa_attention(query, key, value, spec: PatternSpec, scaling=None, backend="auto", dropout=0.0) -> torch.Tensor:
    """HSA pattern attention on a plain causal sequence (no padding, positions 0..T-1), kernel chosen by `backend`."""
    if backend == "auto":
        kernel = auto_kernel(query, key, value, spec, scaling, dropout)
    else:
        kernel = choose_kernel(spec, query.shape[2], query.shape[3], query.device, backend, dropout)
    return run_kernel(kernel, query, key, value, spec, scaling, dropout)


def flex_block_counts(spec: PatternSpec, seq_len: int, device="cpu") -> tuple[int, int]:
    """(128x128 blocks the flex kernel computes, blocks of plain causal attention) at this length, for one head
    (head_split: mean of the two halves)."""
    def count(layout, q_len, kv_len):
        any_blocks, _ = _block_tables(_layout_mask_mod(layout), q_len, kv_len, torch.device(device))
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
