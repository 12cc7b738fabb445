"""Device code of the Triton HSA kernel: the forward, the two backward kernels and the one-pass backward for
self-contained tiles. `launch` (beside it) plans the parts and launches these; see its docstring for the method.
Imported only when the triton kernel first runs (`launch` imports it lazily), so importing `mst_hf` never imports
triton. Conventions: scores in log2 units (``qk_scale = scale * log2(e)``); ``LSE`` and ``DELTA`` are
``(B, H, T)`` float32 indexed by token; the inputs Q, K, V share the stride triple ``sb, sh, st`` and the tensors the
kernels write or that match the output (OUT, DO, DQ, DK, DV) share ``ob, oh, ot`` (last dim contiguous in both): fused
or transposed model tensors are read in place.
Encodings: MASK 0 local, 1 causal inside blocks of C, 2 strided (class-major indices); MAP 0 natural, 1 class-major.
"""

import triton
import triton.language as tl

# runtime scalars the kernels do not specialize on (fewer launch-time checks, no recompiles across lengths)
_SCALARS = ("H", "T", "N", "NS", "W", "S", "C", "L", "G", "EXCL")


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


@triton.jit
def _at(tok, base, st, offs_d):
    """Offsets of the rows of tokens `tok` of one (batch, head) at `base`, rows `st` apart."""
    return base + tok[:, None] * st + offs_d[None, :]


@triton.jit
def _rows(idx, MAP: tl.constexpr, L, S, N, T, base, st, offs_d):
    """Tokens of indices `idx`, which are real (index < N, token < T), and their row offsets."""
    tok = _token(idx, MAP, L, S)
    ok = (idx < N) & (tok < T)
    return tok, ok, base + tok[:, None] * st + offs_d[None, :]


@triton.jit
def _summary_rows(offs_j, C, NS, base, st, offs_d):
    """Summary keys ``j`` (token ``j * C + C - 1``), which are real (j < NS), and their row offsets."""
    tok = offs_j * C + C - 1
    return tok, offs_j < NS, base + tok[:, None] * st + offs_d[None, :]


@triton.jit
def _program(H, sb, sh, ob, oh, BD: tl.constexpr, D: tl.constexpr):
    """(batch, head) offsets of this program in the inputs and in the outputs, its stats offset, the head-dim
    offsets and which are real."""
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    offs_d = tl.arange(0, BD)
    return b * sb + h * sh, b * ob + h * oh, bh.to(tl.int64), offs_d, offs_d[None, :] < D


@triton.jit
def _delta(OUT, DELTA, row, rmask, do, stat, q_ok, ACCUM: tl.constexpr):
    """rowsum(dO * O): computed and stored by the first part (ACCUM false), read by the later ones."""
    if ACCUM:
        delta = tl.load(DELTA + stat, mask=q_ok, other=0.0)
    else:
        o = tl.load(OUT + row, mask=rmask, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(DELTA + stat, delta, mask=q_ok)
    return delta


@triton.jit(do_not_specialize=_SCALARS)
def _fwd_kernel(
    Q, K, V, OUT, LSE, sb, sh, st, ob, oh, ot, qk_scale, sm_scale, H, T, N, NS, W, S, C, L, G, EXCL,
    MASK: tl.constexpr, MAP: tl.constexpr, HAS_SUM: tl.constexpr, CONTINUE: tl.constexpr, IEEE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr, D: tl.constexpr,
):
    m0 = tl.program_id(0) * BM
    base, obase, bh, offs_d, d_ok = _program(H, sb, sh, ob, oh, BD, D)
    offs_m = m0 + tl.arange(0, BM)
    qt, q_ok, row = _rows(offs_m, MAP, L, S, N, T, base, st, offs_d)
    orow = _at(qt, obase, ot, offs_d)
    q = tl.load(Q + row, mask=q_ok[:, None] & d_ok, other=0.0)
    lse_ptr = LSE + bh * T + qt
    if CONTINUE:  # resume the previous part: max = its lse, sum = 1, accumulator = its output
        m_i = tl.load(lse_ptr, mask=q_ok, other=float("-inf"))
        l_i = tl.where(m_i == float("-inf"), 0.0, 1.0)
        acc = tl.load(OUT + orow, mask=q_ok[:, None] & d_ok, other=0.0).to(tl.float32)
    else:
        m_i = tl.full([BM], float("-inf"), tl.float32)
        l_i = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM, BD], tl.float32)
    lo, hi = _key_range(m0, BM, BN, MASK, N, W, G)
    for n0 in range(lo, hi, BN):
        offs_n = n0 + tl.arange(0, BN)
        kt, k_ok, col = _rows(offs_n, MAP, L, S, N, T, base, st, offs_d)
        k = tl.load(K + col, mask=k_ok[:, None] & d_ok, other=0.0)
        v = tl.load(V + col, mask=k_ok[:, None] & d_ok, other=0.0)
        ok = _allowed(offs_m, offs_n, qt, kt, MASK, W, L, C, EXCL) & k_ok[None, :]
        m_i, l_i, acc = _softmax_step(q, k, v, ok, m_i, l_i, acc, qk_scale, IEEE)
    if HAS_SUM:  # fixed: summary keys of the earlier blocks, j < block(q)
        for j0 in range(0, tl.minimum((m0 + BM - 1) // C, NS), BS):
            offs_j = j0 + tl.arange(0, BS)
            _, j_ok, col = _summary_rows(offs_j, C, NS, base, st, offs_d)
            k = tl.load(K + col, mask=j_ok[:, None] & d_ok, other=0.0)
            v = tl.load(V + col, mask=j_ok[:, None] & d_ok, other=0.0)
            ok = (offs_j[None, :] < (qt // C)[:, None]) & j_ok[None, :]
            m_i, l_i, acc = _softmax_step(q, k, v, ok, m_i, l_i, acc, qk_scale, IEEE)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
    tl.store(OUT + orow, (acc / l_safe[:, None]).to(OUT.dtype.element_ty), mask=q_ok[:, None] & d_ok)
    tl.store(lse_ptr, lse, mask=q_ok)


@triton.jit(do_not_specialize=_SCALARS)
def _bwd_dq_kernel(
    Q, K, V, OUT, DO, LSE, DELTA, DQ, sb, sh, st, ob, oh, ot, qk_scale, sm_scale, H, T, N, NS, W, S, C, L, G, EXCL,
    MASK: tl.constexpr, MAP: tl.constexpr, HAS_SUM: tl.constexpr, ACCUM: tl.constexpr, IEEE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr, D: tl.constexpr,
):
    """dQ of one query tile; the first part (ACCUM false) also writes DELTA = rowsum(dO * O) for its rows."""
    m0 = tl.program_id(0) * BM
    base, obase, bh, offs_d, d_ok = _program(H, sb, sh, ob, oh, BD, D)
    offs_m = m0 + tl.arange(0, BM)
    qt, q_ok, row = _rows(offs_m, MAP, L, S, N, T, base, st, offs_d)
    orow = _at(qt, obase, ot, offs_d)
    q = tl.load(Q + row, mask=q_ok[:, None] & d_ok, other=0.0)
    do = tl.load(DO + orow, mask=q_ok[:, None] & d_ok, other=0.0)
    lse = tl.load(LSE + bh * T + qt, mask=q_ok, other=0.0)
    delta = _delta(OUT, DELTA, orow, q_ok[:, None] & d_ok, do, bh * T + qt, q_ok, ACCUM)
    dq = tl.zeros([BM, BD], tl.float32)
    lo, hi = _key_range(m0, BM, BN, MASK, N, W, G)
    for n0 in range(lo, hi, BN):
        offs_n = n0 + tl.arange(0, BN)
        kt, k_ok, col = _rows(offs_n, MAP, L, S, N, T, base, st, offs_d)
        k = tl.load(K + col, mask=k_ok[:, None] & d_ok, other=0.0)
        v = tl.load(V + col, mask=k_ok[:, None] & d_ok, other=0.0)
        ok = _allowed(offs_m, offs_n, qt, kt, MASK, W, L, C, EXCL) & q_ok[:, None] & k_ok[None, :]
        p, ds = _grad_p(q, k, v, do, lse, delta, ok, qk_scale, IEEE)
        dq += _mm(ds.to(k.dtype), k, IEEE)
    if HAS_SUM:
        for j0 in range(0, tl.minimum((m0 + BM - 1) // C, NS), BS):
            offs_j = j0 + tl.arange(0, BS)
            _, j_ok, col = _summary_rows(offs_j, C, NS, base, st, offs_d)
            k = tl.load(K + col, mask=j_ok[:, None] & d_ok, other=0.0)
            v = tl.load(V + col, mask=j_ok[:, None] & d_ok, other=0.0)
            ok = (offs_j[None, :] < (qt // C)[:, None]) & j_ok[None, :] & q_ok[:, None]
            p, ds = _grad_p(q, k, v, do, lse, delta, ok, qk_scale, IEEE)
            dq += _mm(ds.to(k.dtype), k, IEEE)
    dq = dq * sm_scale
    if ACCUM:
        dq += tl.load(DQ + orow, mask=q_ok[:, None] & d_ok, other=0.0).to(tl.float32)
    tl.store(DQ + orow, dq.to(DQ.dtype.element_ty), mask=q_ok[:, None] & d_ok)


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
    Q, K, V, DO, LSE, DELTA, DK, DV, sb, sh, st, ob, oh, ot, qk_scale, sm_scale, H, T, N, NS, W, S, C, L, G, EXCL,
    MASK: tl.constexpr, MAP: tl.constexpr, HAS_SUM: tl.constexpr, ACCUM: tl.constexpr, IEEE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr, D: tl.constexpr,
):
    """dK, dV of one key tile. With summary keys (fixed), the programs after the key tiles each take a tile of
    summary keys against every later query, and the key-tile programs leave the summary rows to them."""
    pid = tl.program_id(0)
    base, obase, bh, _, _ = _program(H, sb, sh, ob, oh, BD, D)
    n_tiles = tl.cdiv(N, BN)
    stat = bh * T  # offset of this (batch, head) in LSE and DELTA
    if pid < n_tiles:
        _dkdv_tile(Q, K, V, DO, LSE + stat, DELTA + stat, DK, DV, base, st, obase, ot, pid * BN, T, N, NS,
                   qk_scale, sm_scale, W, S, C, L, G, EXCL, MASK, MAP, HAS_SUM, ACCUM, IEEE, BM, BN, BD, D)
    else:
        _dkdv_summary(Q, K, V, DO, LSE + stat, DELTA + stat, DK, DV, base, st, obase, ot, (pid - n_tiles) * BS, T,
                      NS, qk_scale, sm_scale, C, ACCUM, IEEE, BM, BS, BD, D)


@triton.jit
def _dkdv_step(Q, DO, LSE, DELTA, row, orow, qt, q_ok, d_ok, k, v, ok, dk, dv, qk_scale, IEEE: tl.constexpr):
    """Add one query tile's contribution to the dK, dV accumulators of a key tile."""
    q = tl.load(Q + row, mask=q_ok[:, None] & d_ok, other=0.0)
    do = tl.load(DO + orow, mask=q_ok[:, None] & d_ok, other=0.0)
    lse = tl.load(LSE + qt, mask=q_ok, other=0.0)
    delta = tl.load(DELTA + qt, mask=q_ok, other=0.0)
    p, ds = _grad_p(q, k, v, do, lse, delta, ok, qk_scale, IEEE)
    dv += _mm(tl.trans(p.to(do.dtype)), do, IEEE)
    dk += _mm(tl.trans(ds.to(q.dtype)), q, IEEE)
    return dk, dv


@triton.jit
def _dkdv_tile(
    Q, K, V, DO, LSE, DELTA, DK, DV, base, st, obase, ot, n0, T, N, NS, qk_scale, sm_scale, W, S, C, L, G, EXCL,
    MASK: tl.constexpr, MAP: tl.constexpr, HAS_SUM: tl.constexpr, ACCUM: tl.constexpr, IEEE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, D: tl.constexpr,
):
    offs_d = tl.arange(0, BD)
    d_ok = offs_d[None, :] < D
    offs_n = n0 + tl.arange(0, BN)
    kt, k_ok, col = _rows(offs_n, MAP, L, S, N, T, base, st, offs_d)
    k = tl.load(K + col, mask=k_ok[:, None] & d_ok, other=0.0)
    v = tl.load(V + col, mask=k_ok[:, None] & d_ok, other=0.0)
    dk = tl.zeros([BN, BD], tl.float32)
    dv = tl.zeros([BN, BD], tl.float32)
    lo, hi = _query_range(n0, BM, BN, MASK, N, W, G)
    for m0 in range(lo, hi, BM):
        offs_m = m0 + tl.arange(0, BM)
        qt, q_ok, row = _rows(offs_m, MAP, L, S, N, T, base, st, offs_d)
        ok = _allowed(offs_m, offs_n, qt, kt, MASK, W, L, C, EXCL) & q_ok[:, None] & k_ok[None, :]
        dk, dv = _dkdv_step(Q, DO, LSE, DELTA, row, _at(qt, obase, ot, offs_d), qt, q_ok, d_ok, k, v, ok, dk, dv,
                            qk_scale, IEEE)
    store_ok = k_ok
    if HAS_SUM:  # summary rows belong to _dkdv_summary
        store_ok = store_ok & ((kt % C) != C - 1)
    _store_dkdv(DK, DV, _at(kt, obase, ot, offs_d), dk, dv, store_ok[:, None] & d_ok, sm_scale, ACCUM)


@triton.jit
def _dkdv_summary(
    Q, K, V, DO, LSE, DELTA, DK, DV, base, st, obase, ot, j0, T, NS, qk_scale, sm_scale, C,
    ACCUM: tl.constexpr, IEEE: tl.constexpr, BM: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr,
    D: tl.constexpr,
):
    offs_d = tl.arange(0, BD)
    d_ok = offs_d[None, :] < D
    kt, k_ok, col = _summary_rows(j0 + tl.arange(0, BS), C, NS, base, st, offs_d)
    k = tl.load(K + col, mask=k_ok[:, None] & d_ok, other=0.0)
    v = tl.load(V + col, mask=k_ok[:, None] & d_ok, other=0.0)
    dk = tl.zeros([BS, BD], tl.float32)
    dv = tl.zeros([BS, BD], tl.float32)
    for m0 in range(((j0 * C + C - 1) // BM) * BM, T, BM):  # every query at or after the first summary
        qt, q_ok, row = _rows(m0 + tl.arange(0, BM), 0, 1, 1, T, T, base, st, offs_d)  # natural order
        ok = (qt[:, None] >= kt[None, :]) & q_ok[:, None] & k_ok[None, :]
        dk, dv = _dkdv_step(Q, DO, LSE, DELTA, row, _at(qt, obase, ot, offs_d), qt, q_ok, d_ok, k, v, ok, dk, dv,
                            qk_scale, IEEE)
    _store_dkdv(DK, DV, _at(kt, obase, ot, offs_d), dk, dv, k_ok[:, None] & d_ok, sm_scale, ACCUM)


@triton.jit(do_not_specialize=_SCALARS)
def _bwd_self_kernel(
    Q, K, V, OUT, DO, LSE, DELTA, DQ, DK, DV, sb, sh, st, ob, oh, ot, qk_scale, sm_scale, H, T, N, NS, W, S, C, L, G,
    EXCL,
    MASK: tl.constexpr, MAP: tl.constexpr, HAS_SUM: tl.constexpr, ACCUM: tl.constexpr, IEEE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr, D: tl.constexpr,
):
    """dQ, dK and dV of a part whose tiles are self-contained (queries of a tile attend only to keys of the same
    tile: causal groups that divide the tile), in one pass: one load of each tile, no second kernel."""
    base, obase, bh, offs_d, d_ok = _program(H, sb, sh, ob, oh, BD, D)
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    qt, q_ok, row = _rows(offs_m, MAP, L, S, N, T, base, st, offs_d)
    orow = _at(qt, obase, ot, offs_d)
    rmask = q_ok[:, None] & d_ok
    q = tl.load(Q + row, mask=rmask, other=0.0)
    k = tl.load(K + row, mask=rmask, other=0.0)
    v = tl.load(V + row, mask=rmask, other=0.0)
    do = tl.load(DO + orow, mask=rmask, other=0.0)
    lse = tl.load(LSE + bh * T + qt, mask=q_ok, other=0.0)
    delta = _delta(OUT, DELTA, orow, rmask, do, bh * T + qt, q_ok, ACCUM)
    ok = _allowed(offs_m, offs_m, qt, qt, MASK, W, L, C, EXCL) & q_ok[:, None] & q_ok[None, :]
    p, ds = _grad_p(q, k, v, do, lse, delta, ok, qk_scale, IEEE)
    dq = _mm(ds.to(k.dtype), k, IEEE) * sm_scale
    dk = _mm(tl.trans(ds.to(q.dtype)), q, IEEE) * sm_scale
    dv = _mm(tl.trans(p.to(do.dtype)), do, IEEE)
    if ACCUM:
        dq += tl.load(DQ + orow, mask=rmask, other=0.0).to(tl.float32)
        dk += tl.load(DK + orow, mask=rmask, other=0.0).to(tl.float32)
        dv += tl.load(DV + orow, mask=rmask, other=0.0).to(tl.float32)
    tl.store(DQ + orow, dq.to(DQ.dtype.element_ty), mask=rmask)
    tl.store(DK + orow, dk.to(DK.dtype.element_ty), mask=rmask)
    tl.store(DV + orow, dv.to(DV.dtype.element_ty), mask=rmask)
