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
- ``triton``:      block-sparse flash attention in Triton (`mst_hf.attention_triton`): local, strided (residue-class
                   order), local_strided (both, the second continuing the first's softmax) and fixed (block plus
                   gathered summary keys), forward and backward, with few kernel launches.

The flex layouts call an "attend" engine that returns ``(out, lse)``: ``"flex"`` (compiled on CUDA) or ``"math"``
(differentiable float math; lets CPU tests check the layouts and the merge, gradients included).
"""

import math
import time
import warnings

import torch
import torch.nn.functional as F

from .attention_layouts import (  # noqa: F401 (names re-exported for tests, the benchmark and mst_hf.attention)
    BACKENDS,
    FLEX_BLOCK,
    KERNELS,
    PatternSpec,
    _block_mask,
    _block_tables,
    _cached,
    _dense_mask,
    _expand_kv,
    _flex_pattern,
    _layout_mask_mod,
    fixed_attention,
    flex_available,
    head_split_attention,
    local_attention,
    local_strided_attention,
    reference_attention,
    strided_attention,
)
from .attention_triton import TRITON_PATTERNS, triton_attention, triton_available
from .patterns import check_pattern_name


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
    if _triton_fits(spec, head_dim, dropout) and triton_available(device):
        candidates.append("triton")
    if spec.pattern in ("local", "fixed") and not spec.head_split:
        candidates.append("chunk_sdpa")
    if spec.pattern == "strided" and not spec.head_split:
        candidates.append("perm_sdpa")
    if seq_len <= 4096 or not candidates:  # O(T^2) memory; never the fastest at long lengths
        candidates.append("sdpa_bool")
    return candidates


def _triton_fits(spec: PatternSpec, head_dim: int, dropout: float) -> bool:
    # head_dim <= 128: the tiles are sized for it (measured at 64; larger head dims may exceed shared memory)
    return dropout == 0.0 and spec.pattern in TRITON_PATTERNS and not spec.head_split and head_dim <= 128


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
        except Exception as err:  # noqa: BLE001 - out of memory, a Triton resource limit...: not a candidate here
            warnings.warn(f"HSA backend 'auto' dropped kernel {kernel!r} for {spec}: {type(err).__name__}: {err}",
                          stacklevel=2)
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
    if torch.compiler.is_compiling():  # no measuring while tracing; the Triton launcher is not traced either
        candidates = auto_candidates(spec, query.shape[2], query.shape[3], query.device, dropout)
        return next((c for c in candidates if c != "triton"), "sdpa_bool")
    grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    cache_key = (spec, query.shape, query.stride(), key.shape[1], query.dtype, query.device, dropout > 0.0, grad)
    choice = _AUTO_CHOICE.get(cache_key)  # the common case first: this call runs once per layer and step
    if choice is not None:
        return choice
    candidates = auto_candidates(spec, query.shape[2], query.shape[3], query.device, dropout)
    if len(candidates) == 1:
        choice = candidates[0]
    else:
        devices = [query.device] if query.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad() if grad else torch.no_grad():
            q, k, v = (torch.randn_like(x).requires_grad_(grad) for x in (query, key, value))
            times = _measure(candidates, q, k, v, spec, scaling, dropout)
        choice = min(times, key=times.get) if times else "sdpa_bool"
    _AUTO_CHOICE[cache_key] = choice
    return choice


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
    if backend == "triton":
        if not _triton_fits(spec, head_dim, dropout):
            raise NotImplementedError(
                f"backend='triton' computes the patterns {', '.join(TRITON_PATTERNS)} without head_split, dropout "
                f"or head_dim > 128 (got {spec}, head_dim={head_dim}); use backend='auto' or 'flex'."
            )
        if not triton_available(device):
            raise NotImplementedError(
                f"backend='triton' needs a CUDA device and the `triton` package (device {device}); "
                "use backend='auto' or 'sdpa'."
            )
        return "triton"
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
    if kernel == "triton" and _triton_fits(spec, D, dropout):
        return triton_attention(query, _expand_kv(key, H), _expand_kv(value, H), spec, scaling)
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
