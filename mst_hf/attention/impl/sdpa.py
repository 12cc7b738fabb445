"""HSA patterns as plain SDPA kernels (flash / memory-efficient) on re-viewed tensors; dropout works here.

- ``perm_sdpa`` (strided): positions with the same ``q mod s`` form a residue class; the strided pattern is plain
  causal attention inside each class, so fold the classes into the heads (a view) and run causal SDPA.
- ``chunk_sdpa`` (local and fixed): chunks of queries, each against a small key set (local: previous + own chunk;
  fixed: the summary keys + own block) with one shared chunk mask, on SDPA's masked kernel.
- ``sdpa_causal`` / ``sdpa_bool``: SDPA with ``is_causal=True`` (dense only) or with the pattern as a boolean mask
  (every pattern; no sparsity win).
"""

import torch
import torch.nn.functional as F

from .common import cached, expand_kv, pattern_bool_mask


def sdpa_causal(query, key, value, scaling=None, dropout=0.0):
    """Dense causal attention (the ``dense`` pattern)."""
    gqa = {"enable_gqa": True} if key.shape[1] != query.shape[1] else {}
    return F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, is_causal=True, scale=scaling, **gqa)


def sdpa_bool(query, key, value, spec, scaling=None, dropout=0.0):
    """`spec`'s pattern as a cached boolean mask on SDPA: correct for every pattern and device."""
    H = query.shape[1]
    mask = pattern_bool_mask(spec, query.shape[2], H, query.device)
    return F.scaled_dot_product_attention(
        query, expand_kv(key, H), expand_kv(value, H), attn_mask=mask, dropout_p=dropout, scale=scaling
    )


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

    return cached(("chunk", kind, param, size, extra, nc, batch, str(device)), build)


def _chunk_sdpa(query, k_chunks, v_chunks, mask, scale, dropout):
    """SDPA of each query chunk over its own key set: ``(B, nc, Hkv, L, D)`` keys -> ``(B, H, T, D)``."""
    B, H, T, D = query.shape
    q = _chunks(query, mask.shape[-2])
    nc, size = q.shape[1], q.shape[3]
    k, v = (expand_kv(x.flatten(0, 1), H) for x in (k_chunks, v_chunks))  # (B * nc, H, L, D)
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
