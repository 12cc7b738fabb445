"""HSA patterns as block-sparse flash attention written in Triton: the ``triton`` kernel.

Each pattern is one or two *parts*. A part is an online-softmax (flash) attention over an index space that maps to
token positions, visiting only the key tiles its mask can reach:

- ``local(w)``:      natural order, keys ``q - w < k <= q`` (about ``w / BN + 1`` key tiles per query tile);
- ``strided(s)``:    class-major order (index ``r * L + i`` is token ``i * s + r``, ``L = ceil(T / s)``), in which
                     the pattern is causal attention inside groups of ``L`` indices;
- ``local_strided``: the local part, then the strided part restricted to ``q - k >= w`` (disjoint key sets);
- ``fixed(c)``:      natural order, causal inside blocks of ``c``, plus a second key loop over the summary keys
                     of earlier blocks (gathered: index ``j`` is token ``j * c + c - 1``).

A later part continues the earlier part's softmax state (running max = its log-sum-exp, sum = 1, accumulator =
its output), so the union is exact. Backward is the flash backward of each part with the final output and
log-sum-exp; the later part adds its dQ, dK, dV to the earlier part's. Every tile applies the exact token mask, so
the tile ranges only need to cover the pattern.

All (B, H, T, D) tensors of one call share one memory layout (inputs that differ are copied), so the kernels take
a single stride triple: fewer launch arguments, less host time per launch. The kernels run on CUDA; with
``TRITON_INTERPRET=1`` set before import they also run on CPU tensors (slow; the CPU tests use that). No dropout
and no head split here: those use the other kernels.
"""

import functools
import os
from dataclasses import dataclass

import torch

try:  # triton ships with CUDA builds of torch; CPU builds do not have it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None

LOCAL, BLOCK_CAUSAL, STRIDED = 0, 1, 2  # mask kinds
NATURAL, CLASS_MAJOR = 0, 1  # index -> token maps
LOG2E = 1.4426950408889634
TRITON_PATTERNS = ("local", "strided", "local_strided", "fixed")
# launch parameters, chosen by the sweep in bench/triton_tune.py on an H200 (docs/attention_benchmark.md)
LAUNCH = {"num_warps": 4, "num_stages": 2, "bm": 64, "bn": 64, "cls_tile": 64}


def triton_available(device) -> bool:
    """Whether the Triton kernel can run on `device`: CUDA with triton installed, or the Triton interpreter."""
    if triton is None:
        return False
    return torch.device(device).type == "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class Part:
    """One flash-attention pass over an index space: mask kind, index map, lengths and pattern parameters."""

    mask: int
    map: int
    n: int  # indices (queries and keys)
    w: int = 1  # local window
    s: int = 1  # stride
    c: int = 1  # fixed block
    cls_len: int = 1  # L: positions per residue class
    group: int = 1  # causal groups in index space (BLOCK_CAUSAL: c; STRIDED: L)
    excl: int = 0  # STRIDED: only keys with q - k >= excl
    n_sum: int = 0  # fixed: summary keys (0: no summary loop)
    bm: int = 64
    bn: int = 64
    bs: int = 16  # summary key tile
    num_warps: int = 4
    num_stages: int = 2

    @functools.cached_property
    def scalars(self) -> tuple:
        """The kernels' runtime scalars after H and T: N, NS, W, S, C, L, G, EXCL."""
        return self.n, self.n_sum, self.w, self.s, self.c, self.cls_len, self.group, self.excl

    @functools.cached_property
    def q_tiles(self) -> int:
        return -(-self.n // self.bm)

    @functools.cached_property
    def k_programs(self) -> int:
        """dK/dV programs: one per key tile, then one per tile of summary keys."""
        return -(-self.n // self.bn) + -(-self.n_sum // self.bs)

    @functools.cached_property
    def self_contained(self) -> bool:
        """Each tile's queries attend only to keys of the same tile (causal groups that divide the tile)."""
        return self.mask != LOCAL and self.n_sum == 0 and self.bm == self.bn and self.bm % self.group == 0


def _pow2_tile(n: int, largest: int) -> int:
    """Power-of-two tile for `n` indices: at least 16 (the tensor-core minimum), at most `largest`."""
    return max(16, min(largest, 1 << (max(1, n) - 1).bit_length()))


@functools.lru_cache(maxsize=256)
def plan_parts(spec, seq_len: int, launch: tuple = ()) -> tuple:
    """The parts that compute `spec` (a `PatternSpec`) at this length (`launch`: LAUNCH items, for the cache)."""
    if spec.pattern not in TRITON_PATTERNS or spec.head_split:
        raise NotImplementedError(
            f"The triton kernel computes the patterns {TRITON_PATTERNS} without head_split (got {spec}); "
            "use backend='auto' or 'sdpa'."
        )
    opts = dict(launch) or LAUNCH
    T, w, s, c = seq_len, spec.window, spec.stride, spec.block
    bm, bn = opts["bm"], opts["bn"]
    L = -(-T // s)
    t = opts["cls_tile"]
    launch = dict(num_warps=opts["num_warps"], num_stages=opts["num_stages"])

    def strided(excl):
        return Part(STRIDED, CLASS_MAJOR, s * L, s=s, cls_len=L, group=L, excl=excl, bm=t, bn=t, **launch)

    local = Part(LOCAL, NATURAL, T, w=w, bm=bm, bn=bn, **launch)
    if spec.pattern == "local":
        return (local,)
    if spec.pattern == "strided":
        return (strided(0),)
    if spec.pattern == "local_strided":
        return (local, strided(w))
    n_sum = T // c
    bs = _pow2_tile(n_sum, bn)
    return (Part(BLOCK_CAUSAL, NATURAL, T, c=c, group=c, n_sum=n_sum, bm=bm, bn=bn, bs=bs, **launch),)


_SCALARS = ("H", "T", "N", "NS", "W", "S", "C", "L", "G", "EXCL")

if triton is not None:

    @triton.jit
    def _token(idx, MAP: tl.constexpr, L, S):
        tok = idx
        if MAP == 1:  # class-major
            tok = (idx % L) * S + idx // L
        return tok

    @triton.jit
    def _allowed(qi, ki, qt, kt, MASK: tl.constexpr, W, L, C, EXCL):
        diff = qt[:, None] - kt[None, :]
        if MASK == 0:
            ok = (diff >= 0) & (diff < W)
        elif MASK == 1:
            ok = (diff >= 0) & ((qt[:, None] // C) == (kt[None, :] // C))
        else:  # class-major indices: same residue class <=> same class index (idx // L)
            ok = (diff >= EXCL) & ((qi[:, None] // L) == (ki[None, :] // L))
        return ok

    @triton.jit
    def _key_range(m0, BM: tl.constexpr, BN: tl.constexpr, MASK: tl.constexpr, N, W, G):
        """Key indices [lo, hi) a query tile starting at m0 can attend to (lo aligned to BN)."""
        if MASK == 0:
            lo = tl.maximum(m0 - W + 1, 0)
        else:
            lo = (m0 // G) * G
        return (lo // BN) * BN, tl.minimum(m0 + BM, N)

    @triton.jit
    def _query_range(n0, BM: tl.constexpr, BN: tl.constexpr, MASK: tl.constexpr, N, W, G):
        """Query indices [lo, hi) that can attend to a key tile starting at n0 (lo aligned to BM)."""
        if MASK == 0:
            hi = tl.minimum(n0 + BN + W - 1, N)
        else:
            hi = tl.minimum(((n0 + BN - 1) // G + 1) * G, N)
        return (n0 // BM) * BM, hi

    @triton.jit
    def _mm(a, b, IEEE: tl.constexpr):
        if IEEE:
            r = tl.dot(a, b, input_precision="ieee")
        else:
            r = tl.dot(a, b)
        return r

    @triton.jit
    def _softmax_step(q, k, v, ok, m_i, l_i, acc, qk_scale, IEEE: tl.constexpr):
        """One key tile of the online softmax (log2 units); rows with nothing allowed yet stay at zero."""
        s = tl.where(ok, _mm(q, tl.trans(k), IEEE) * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, IEEE)
        return m_new, l_i, acc

    @triton.jit
    def _grad_p(q, k, v, do, lse, delta, ok, qk_scale, IEEE: tl.constexpr):
        """Probabilities P and score gradients dS = P * (dP - delta) of one (query tile, key tile) pair."""
        p = tl.where(ok, tl.exp2(_mm(q, tl.trans(k), IEEE) * qk_scale - lse[:, None]), 0.0)
        ds = p * (_mm(do, tl.trans(v), IEEE) - delta[:, None])
        return p, ds

    @triton.jit(do_not_specialize=_SCALARS)
    def _fwd_kernel(
        Q, K, V, OUT, LSE, sb, sh, st, qk_scale, sm_scale, H, T, N, NS, W, S, C, L, G, EXCL,
        MASK: tl.constexpr, MAP: tl.constexpr, HAS_SUM: tl.constexpr, CONTINUE: tl.constexpr, IEEE: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr, D: tl.constexpr,
    ):
        m0 = tl.program_id(0) * BM
        bh = tl.program_id(1)
        base = (bh // H).to(tl.int64) * sb + (bh % H).to(tl.int64) * sh
        offs_m = m0 + tl.arange(0, BM)
        offs_d = tl.arange(0, BD)
        d_ok = offs_d[None, :] < D
        qt = _token(offs_m, MAP, L, S)
        q_ok = (offs_m < N) & (qt < T)
        row = base + qt[:, None] * st + offs_d[None, :]
        q = tl.load(Q + row, mask=q_ok[:, None] & d_ok, other=0.0)
        lse_ptr = LSE + bh.to(tl.int64) * T + qt
        if CONTINUE:  # resume the previous part: max = its lse, sum = 1, accumulator = its output
            m_i = tl.load(lse_ptr, mask=q_ok, other=float("-inf"))
            l_i = tl.where(m_i == float("-inf"), 0.0, 1.0)
            acc = tl.load(OUT + row, mask=q_ok[:, None] & d_ok, other=0.0).to(tl.float32)
        else:
            m_i = tl.full([BM], float("-inf"), tl.float32)
            l_i = tl.zeros([BM], tl.float32)
            acc = tl.zeros([BM, BD], tl.float32)
        lo, hi = _key_range(m0, BM, BN, MASK, N, W, G)
        for n0 in range(lo, hi, BN):
            offs_n = n0 + tl.arange(0, BN)
            kt = _token(offs_n, MAP, L, S)
            k_ok = (offs_n < N) & (kt < T)
            col = base + kt[:, None] * st + offs_d[None, :]
            k = tl.load(K + col, mask=k_ok[:, None] & d_ok, other=0.0)
            v = tl.load(V + col, mask=k_ok[:, None] & d_ok, other=0.0)
            ok = _allowed(offs_m, offs_n, qt, kt, MASK, W, L, C, EXCL) & k_ok[None, :]
            m_i, l_i, acc = _softmax_step(q, k, v, ok, m_i, l_i, acc, qk_scale, IEEE)
        if HAS_SUM:  # fixed: summary keys of the earlier blocks, j < block(q)
            for j0 in range(0, tl.minimum((m0 + BM - 1) // C, NS), BS):
                offs_j = j0 + tl.arange(0, BS)
                col = base + (offs_j * C + C - 1)[:, None] * st + offs_d[None, :]
                k = tl.load(K + col, mask=(offs_j < NS)[:, None] & d_ok, other=0.0)
                v = tl.load(V + col, mask=(offs_j < NS)[:, None] & d_ok, other=0.0)
                ok = (offs_j[None, :] < (qt // C)[:, None]) & (offs_j < NS)[None, :]
                m_i, l_i, acc = _softmax_step(q, k, v, ok, m_i, l_i, acc, qk_scale, IEEE)
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
        tl.store(OUT + row, (acc / l_safe[:, None]).to(OUT.dtype.element_ty), mask=q_ok[:, None] & d_ok)
        tl.store(lse_ptr, lse, mask=q_ok)

    @triton.jit(do_not_specialize=_SCALARS)
    def _bwd_dq_kernel(
        Q, K, V, OUT, DO, LSE, DELTA, DQ, sb, sh, st, qk_scale, sm_scale, H, T, N, NS, W, S, C, L, G, EXCL,
        MASK: tl.constexpr, MAP: tl.constexpr, HAS_SUM: tl.constexpr, ACCUM: tl.constexpr, IEEE: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr, D: tl.constexpr,
    ):
        """dQ of one query tile; the first part (ACCUM false) also writes DELTA = rowsum(dO * O) for its rows."""
        m0 = tl.program_id(0) * BM
        bh = tl.program_id(1)
        base = (bh // H).to(tl.int64) * sb + (bh % H).to(tl.int64) * sh
        offs_m = m0 + tl.arange(0, BM)
        offs_d = tl.arange(0, BD)
        d_ok = offs_d[None, :] < D
        qt = _token(offs_m, MAP, L, S)
        q_ok = (offs_m < N) & (qt < T)
        row = base + qt[:, None] * st + offs_d[None, :]
        q = tl.load(Q + row, mask=q_ok[:, None] & d_ok, other=0.0)
        do = tl.load(DO + row, mask=q_ok[:, None] & d_ok, other=0.0)
        lse = tl.load(LSE + bh.to(tl.int64) * T + qt, mask=q_ok, other=0.0)
        if ACCUM:
            delta = tl.load(DELTA + bh.to(tl.int64) * T + qt, mask=q_ok, other=0.0)
        else:
            o = tl.load(OUT + row, mask=q_ok[:, None] & d_ok, other=0.0)
            delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
            tl.store(DELTA + bh.to(tl.int64) * T + qt, delta, mask=q_ok)
        dq = tl.zeros([BM, BD], tl.float32)
        lo, hi = _key_range(m0, BM, BN, MASK, N, W, G)
        for n0 in range(lo, hi, BN):
            offs_n = n0 + tl.arange(0, BN)
            kt = _token(offs_n, MAP, L, S)
            k_ok = (offs_n < N) & (kt < T)
            col = base + kt[:, None] * st + offs_d[None, :]
            k = tl.load(K + col, mask=k_ok[:, None] & d_ok, other=0.0)
            v = tl.load(V + col, mask=k_ok[:, None] & d_ok, other=0.0)
            ok = _allowed(offs_m, offs_n, qt, kt, MASK, W, L, C, EXCL) & q_ok[:, None] & k_ok[None, :]
            p, ds = _grad_p(q, k, v, do, lse, delta, ok, qk_scale, IEEE)
            dq += _mm(ds.to(k.dtype), k, IEEE)
        if HAS_SUM:
            for j0 in range(0, tl.minimum((m0 + BM - 1) // C, NS), BS):
                offs_j = j0 + tl.arange(0, BS)
                col = base + (offs_j * C + C - 1)[:, None] * st + offs_d[None, :]
                k = tl.load(K + col, mask=(offs_j < NS)[:, None] & d_ok, other=0.0)
                v = tl.load(V + col, mask=(offs_j < NS)[:, None] & d_ok, other=0.0)
                ok = (offs_j[None, :] < (qt // C)[:, None]) & (offs_j < NS)[None, :] & q_ok[:, None]
                p, ds = _grad_p(q, k, v, do, lse, delta, ok, qk_scale, IEEE)
                dq += _mm(ds.to(k.dtype), k, IEEE)
        dq = dq * sm_scale
        if ACCUM:
            dq += tl.load(DQ + row, mask=q_ok[:, None] & d_ok, other=0.0).to(tl.float32)
        tl.store(DQ + row, dq.to(DQ.dtype.element_ty), mask=q_ok[:, None] & d_ok)

    @triton.jit
    def _store_dkdv(DK, DV, col, dk, dv, store_ok, sm_scale, ACCUM: tl.constexpr):
        dk = dk * sm_scale
        if ACCUM:
            dk += tl.load(DK + col, mask=store_ok, other=0.0).to(tl.float32)
            dv += tl.load(DV + col, mask=store_ok, other=0.0).to(tl.float32)
        tl.store(DK + col, dk.to(DK.dtype.element_ty), mask=store_ok)
        tl.store(DV + col, dv.to(DV.dtype.element_ty), mask=store_ok)

    @triton.jit(do_not_specialize=_SCALARS)
    def _bwd_dkdv_kernel(
        Q, K, V, DO, LSE, DELTA, DK, DV, sb, sh, st, qk_scale, sm_scale, H, T, N, NS, W, S, C, L, G, EXCL,
        MASK: tl.constexpr, MAP: tl.constexpr, HAS_SUM: tl.constexpr, ACCUM: tl.constexpr, IEEE: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr, D: tl.constexpr,
    ):
        """dK, dV of one key tile. With summary keys (fixed), the programs after the key tiles each take a tile of
        summary keys against every later query, and the key-tile programs leave the summary rows to them."""
        pid = tl.program_id(0)
        bh = tl.program_id(1)
        base = (bh // H).to(tl.int64) * sb + (bh % H).to(tl.int64) * sh
        n_tiles = tl.cdiv(N, BN)
        stat = bh.to(tl.int64) * T  # offset of this (batch, head) in LSE and DELTA
        if pid < n_tiles:
            _dkdv_tile(Q, K, V, DO, LSE + stat, DELTA + stat, DK, DV, base, st, pid * BN, T, N, NS,
                       qk_scale, sm_scale, W, S, C, L, G, EXCL, MASK, MAP, HAS_SUM, ACCUM, IEEE, BM, BN, BD, D)
        else:
            _dkdv_summary(Q, K, V, DO, LSE + stat, DELTA + stat, DK, DV, base, st, (pid - n_tiles) * BS, T, NS,
                          qk_scale, sm_scale, C, ACCUM, IEEE, BM, BS, BD, D)

    @triton.jit
    def _dkdv_tile(
        Q, K, V, DO, LSE, DELTA, DK, DV, base, st, n0, T, N, NS, qk_scale, sm_scale, W, S, C, L, G, EXCL,
        MASK: tl.constexpr, MAP: tl.constexpr, HAS_SUM: tl.constexpr, ACCUM: tl.constexpr, IEEE: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, D: tl.constexpr,
    ):
        offs_d = tl.arange(0, BD)
        d_ok = offs_d[None, :] < D
        offs_n = n0 + tl.arange(0, BN)
        kt = _token(offs_n, MAP, L, S)
        k_ok = (offs_n < N) & (kt < T)
        col = base + kt[:, None] * st + offs_d[None, :]
        k = tl.load(K + col, mask=k_ok[:, None] & d_ok, other=0.0)
        v = tl.load(V + col, mask=k_ok[:, None] & d_ok, other=0.0)
        dk = tl.zeros([BN, BD], tl.float32)
        dv = tl.zeros([BN, BD], tl.float32)
        lo, hi = _query_range(n0, BM, BN, MASK, N, W, G)
        for m0 in range(lo, hi, BM):
            offs_m = m0 + tl.arange(0, BM)
            qt = _token(offs_m, MAP, L, S)
            q_ok = (offs_m < N) & (qt < T)
            row = base + qt[:, None] * st + offs_d[None, :]
            q = tl.load(Q + row, mask=q_ok[:, None] & d_ok, other=0.0)
            do = tl.load(DO + row, mask=q_ok[:, None] & d_ok, other=0.0)
            lse = tl.load(LSE + qt, mask=q_ok, other=0.0)
            delta = tl.load(DELTA + qt, mask=q_ok, other=0.0)
            ok = _allowed(offs_m, offs_n, qt, kt, MASK, W, L, C, EXCL) & q_ok[:, None] & k_ok[None, :]
            p, ds = _grad_p(q, k, v, do, lse, delta, ok, qk_scale, IEEE)
            dv += _mm(tl.trans(p.to(do.dtype)), do, IEEE)
            dk += _mm(tl.trans(ds.to(q.dtype)), q, IEEE)
        store_ok = k_ok
        if HAS_SUM:  # summary rows belong to _dkdv_summary
            store_ok = store_ok & ((kt % C) != C - 1)
        _store_dkdv(DK, DV, col, dk, dv, store_ok[:, None] & d_ok, sm_scale, ACCUM)

    @triton.jit
    def _dkdv_summary(
        Q, K, V, DO, LSE, DELTA, DK, DV, base, st, j0, T, NS, qk_scale, sm_scale, C,
        ACCUM: tl.constexpr, IEEE: tl.constexpr, BM: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr,
        D: tl.constexpr,
    ):
        offs_d = tl.arange(0, BD)
        d_ok = offs_d[None, :] < D
        offs_j = j0 + tl.arange(0, BS)
        kt = offs_j * C + C - 1
        k_ok = offs_j < NS
        col = base + kt[:, None] * st + offs_d[None, :]
        k = tl.load(K + col, mask=k_ok[:, None] & d_ok, other=0.0)
        v = tl.load(V + col, mask=k_ok[:, None] & d_ok, other=0.0)
        dk = tl.zeros([BS, BD], tl.float32)
        dv = tl.zeros([BS, BD], tl.float32)
        for m0 in range(((j0 * C + C - 1) // BM) * BM, T, BM):  # every query at or after the first summary
            qt = m0 + tl.arange(0, BM)
            q_ok = qt < T
            row = base + qt[:, None] * st + offs_d[None, :]
            q = tl.load(Q + row, mask=q_ok[:, None] & d_ok, other=0.0)
            do = tl.load(DO + row, mask=q_ok[:, None] & d_ok, other=0.0)
            lse = tl.load(LSE + qt, mask=q_ok, other=0.0)
            delta = tl.load(DELTA + qt, mask=q_ok, other=0.0)
            ok = (qt[:, None] >= kt[None, :]) & q_ok[:, None] & k_ok[None, :]
            p, ds = _grad_p(q, k, v, do, lse, delta, ok, qk_scale, IEEE)
            dv += _mm(tl.trans(p.to(do.dtype)), do, IEEE)
            dk += _mm(tl.trans(ds.to(q.dtype)), q, IEEE)
        _store_dkdv(DK, DV, col, dk, dv, k_ok[:, None] & d_ok, sm_scale, ACCUM)


    @triton.jit(do_not_specialize=_SCALARS)
    def _bwd_self_kernel(
        Q, K, V, OUT, DO, LSE, DELTA, DQ, DK, DV, sb, sh, st, qk_scale, sm_scale, H, T, N, NS, W, S, C, L, G, EXCL,
        MASK: tl.constexpr, MAP: tl.constexpr, HAS_SUM: tl.constexpr, ACCUM: tl.constexpr, IEEE: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr, D: tl.constexpr,
    ):
        """dQ, dK and dV of a part whose tiles are self-contained (queries of a tile attend only to keys of the same
        tile: causal groups that divide the tile), in one pass: one load of each tile, no second kernel."""
        m0 = tl.program_id(0) * BM
        bh = tl.program_id(1)
        base = (bh // H).to(tl.int64) * sb + (bh % H).to(tl.int64) * sh
        offs_m = m0 + tl.arange(0, BM)
        offs_d = tl.arange(0, BD)
        d_ok = offs_d[None, :] < D
        qt = _token(offs_m, MAP, L, S)
        q_ok = (offs_m < N) & (qt < T)
        row = base + qt[:, None] * st + offs_d[None, :]
        rmask = q_ok[:, None] & d_ok
        q = tl.load(Q + row, mask=rmask, other=0.0)
        k = tl.load(K + row, mask=rmask, other=0.0)
        v = tl.load(V + row, mask=rmask, other=0.0)
        do = tl.load(DO + row, mask=rmask, other=0.0)
        lse = tl.load(LSE + bh.to(tl.int64) * T + qt, mask=q_ok, other=0.0)
        if ACCUM:
            delta = tl.load(DELTA + bh.to(tl.int64) * T + qt, mask=q_ok, other=0.0)
        else:
            o = tl.load(OUT + row, mask=rmask, other=0.0)
            delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
            tl.store(DELTA + bh.to(tl.int64) * T + qt, delta, mask=q_ok)
        ok = _allowed(offs_m, offs_m, qt, qt, MASK, W, L, C, EXCL) & q_ok[:, None] & q_ok[None, :]
        p, ds = _grad_p(q, k, v, do, lse, delta, ok, qk_scale, IEEE)
        dq = _mm(ds.to(k.dtype), k, IEEE) * sm_scale
        dk = _mm(tl.trans(ds.to(q.dtype)), q, IEEE) * sm_scale
        dv = _mm(tl.trans(p.to(do.dtype)), do, IEEE)
        if ACCUM:
            dq += tl.load(DQ + row, mask=rmask, other=0.0).to(tl.float32)
            dk += tl.load(DK + row, mask=rmask, other=0.0).to(tl.float32)
            dv += tl.load(DV + row, mask=rmask, other=0.0).to(tl.float32)
        tl.store(DQ + row, dq.to(DQ.dtype.element_ty), mask=rmask)
        tl.store(DK + row, dk.to(DK.dtype.element_ty), mask=rmask)
        tl.store(DV + row, dv.to(DV.dtype.element_ty), mask=rmask)


@functools.lru_cache(maxsize=512)
def _meta(part, dtype, head_dim):
    """Compile-time constants and launch options of `part` (cached: launches are host-bound at short lengths)."""
    return dict(
        MASK=part.mask, MAP=part.map, HAS_SUM=part.n_sum > 0, IEEE=dtype == torch.float32, BM=part.bm, BN=part.bn,
        BS=part.bs, BD=max(16, triton.next_power_of_2(head_dim)), D=head_dim,
        num_warps=part.num_warps, num_stages=part.num_stages,
    )


def _like(x, ref):
    """`x` in `ref`'s memory layout (a copy only when the layouts differ; `ref` must be dense)."""
    return x if x.stride() == ref.stride() else torch.empty_like(ref).copy_(x)


class _TritonHSA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, parts, scale):
        B, H, T, D = q.shape
        out = torch.empty_like(q)
        lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)  # log2 units
        head = (*q.stride()[:3], scale * LOG2E, scale, H, T)
        for i, part in enumerate(parts):  # a later part reads and rewrites the rows of `out` it owns
            _fwd_kernel[(part.q_tiles, B * H)](
                q, k, v, out, lse, *head, *part.scalars, CONTINUE=i > 0, **_meta(part, q.dtype, D)
            )
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.parts, ctx.head = parts, head
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dout = _like(dout, q)
        delta = torch.empty_like(lse)  # rowsum(dO * O), written by the first part's backward kernel
        dq, dk, dv = torch.empty_like(q), torch.empty_like(q), torch.empty_like(q)
        BH = q.shape[0] * q.shape[1]
        for i, part in enumerate(ctx.parts):
            meta = dict(ACCUM=i > 0, **_meta(part, q.dtype, q.shape[3]))
            args = (*ctx.head, *part.scalars)
            if part.self_contained:
                _bwd_self_kernel[(part.q_tiles, BH)](q, k, v, out, dout, lse, delta, dq, dk, dv, *args, **meta)
                continue
            _bwd_dq_kernel[(part.q_tiles, BH)](q, k, v, out, dout, lse, delta, dq, *args, **meta)
            _bwd_dkdv_kernel[(part.k_programs, BH)](q, k, v, dout, lse, delta, dk, dv, *args, **meta)
        return dq, dk, dv, None, None


def _dense(x) -> bool:
    """Contiguous, or a (B, H, T, D) view of contiguous (B, T, H, D) memory (what transformers passes)."""
    B, H, T, D = x.shape
    return x.is_contiguous() or x.stride() == (T * H * D, D, H * D, 1)


def triton_attention(query, key, value, spec, scale=None) -> torch.Tensor:
    """`spec`'s pattern on a plain causal sequence: ``(B, H, T, D)`` in and out, the output in the query's memory
    layout. Grouped-query keys and values are repeated to the query heads."""
    if triton is None:
        raise NotImplementedError("The triton kernel needs the `triton` package (it ships with CUDA builds of torch).")
    if key.shape[1] != query.shape[1]:
        rep = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    if not _dense(query):  # e.g. a slice of a fused qkv projection
        query = query.contiguous()
    key, value = _like(key, query), _like(value, query)
    scale = query.shape[-1] ** -0.5 if scale is None else float(scale)
    parts = plan_parts(spec, query.shape[2], tuple(LAUNCH.items()))
    return _TritonHSA.apply(query, key, value, parts, scale)
