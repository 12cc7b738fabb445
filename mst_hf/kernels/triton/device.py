"""Device code of the block-sparse linear (imported by ``launch`` on first use; needs triton).

Two kernels and a reduction, all over the compact index of ``mst_hf.kernels.layout`` (one int32 tensor; the
``*_OFF`` arguments say where its parts start):

- ``bsr_matmul``: ``Out[:, n-block] = sum_{k in list(n)} A[:, k-block] @ B[k-block, n-block]`` (+ bias), with the
  list read from a CSR part of the index. The forward is ``A = X``, ``B = W_eff^T`` over the row lists; the input
  gradient is ``A = dY``, ``B = W_eff`` over the column lists. Only the strides of ``B`` differ, so the Linear and
  Conv1D layouts share the kernel. A block-row with no active block writes zeros (plus the bias).
- ``sampled_dw``: for each active block ``(r, c)``, ``dW_eff[r, c] = sum_m dY[m, r-block]^T X[m, c-block]``, the
  token sum split into ``SPLIT`` chunks (grid: active blocks x chunks). With one chunk it stores into ``dW``; with
  several, each writes a float32 partial and ``reduce_dw`` sums them in a fixed order (deterministic, no atomics).

Grid order: the first grid axis is the output block (fastest), so programs running together share one ``A`` row
tile in L2, and the active weight blocks (density x the weight) stay in L2 across row tiles.
Accumulation is float32; float32 inputs use IEEE products (no TF32) so they match the float32 reference.
"""

import triton
import triton.language as tl

# runtime integers that vary with the mask or the token count: not specialised on (no recompiles between layers)
_VARYING = ("M", "PTR_OFF", "IDX_OFF", "CHUNK", "NNZ", "ROW_OFF", "COL_OFF", "SPLITS")


def _jit(fn):
    names = fn.__code__.co_varnames[: fn.__code__.co_argcount]
    return triton.jit(fn, do_not_specialize=[n for n in names if n in _VARYING])


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    if IEEE:
        acc += tl.dot(a, b, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@_jit
def bsr_matmul(
    A, B, Bias, Out, Index,
    M, sam, sak, sbk, sbn, som, son, PTR_OFF, IDX_OFF,
    BS: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BS + tl.arange(0, BS)
    rk = tl.arange(0, BK)
    rm64 = rm.to(tl.int64)  # token offsets can pass 2**31 elements
    m_ok = rm < M
    start = tl.load(Index + PTR_OFF + pid_n)
    end = tl.load(Index + PTR_OFF + pid_n + 1)
    KSUB: tl.constexpr = BS // BK  # BK-wide steps inside one block
    acc = tl.zeros((BM, BS), dtype=tl.float32)
    for t in range(start * KSUB, end * KSUB):
        kb = tl.load(Index + IDX_OFF + t // KSUB)
        k = kb * BS + (t % KSUB) * BK + rk
        a = tl.load(A + rm64[:, None] * sam + k[None, :] * sak, mask=m_ok[:, None], other=0.0)
        b = tl.load(B + k[:, None] * sbk + rn[None, :] * sbn)
        acc = _dot(a, b, acc, IEEE)
    if HAS_BIAS:
        acc += tl.load(Bias + rn).to(tl.float32)[None, :]
    tl.store(Out + rm64[:, None] * som + rn[None, :] * son, acc.to(Out.dtype.element_ty), mask=m_ok[:, None])


@_jit
def sampled_dw(
    DY, X, Out, Index,
    M, CHUNK, NNZ, sdm, sdn, sxm, sxk, son, sok, ROW_OFF, COL_OFF,
    BS: tl.constexpr, BM: tl.constexpr, SPLIT: tl.constexpr, IEEE: tl.constexpr,
):
    e = tl.program_id(0)  # active block, row-major
    s = tl.program_id(1)  # token chunk
    rb = tl.load(Index + ROW_OFF + e)
    cb = tl.load(Index + COL_OFF + e)
    rn = rb * BS + tl.arange(0, BS)  # output features
    rk = cb * BS + tl.arange(0, BS)  # input features
    lo = s * CHUNK
    hi = tl.minimum(lo + CHUNK, M)
    acc = tl.zeros((BS, BS), dtype=tl.float32)
    for m0 in range(lo, hi, BM):
        rm = m0 + tl.arange(0, BM)
        ok = rm < hi
        rm64 = rm.to(tl.int64)
        dy = tl.load(DY + rm64[None, :] * sdm + rn[:, None] * sdn, mask=ok[None, :], other=0.0)  # (BS, BM)
        x = tl.load(X + rm64[:, None] * sxm + rk[None, :] * sxk, mask=ok[:, None], other=0.0)  # (BM, BS)
        acc = _dot(dy, x, acc, IEEE)
    if SPLIT:
        tile = tl.arange(0, BS)[:, None] * BS + tl.arange(0, BS)[None, :]
        tl.store(Out + (s * NNZ + e).to(tl.int64) * (BS * BS) + tile, acc)
    else:
        tl.store(Out + rn[:, None] * son + rk[None, :] * sok, acc.to(Out.dtype.element_ty))


@_jit
def reduce_dw(P, Out, Index, NNZ, SPLITS, son, sok, ROW_OFF, COL_OFF, BS: tl.constexpr):
    e = tl.program_id(0)
    rb = tl.load(Index + ROW_OFF + e)
    cb = tl.load(Index + COL_OFF + e)
    tile = tl.arange(0, BS)[:, None] * BS + tl.arange(0, BS)[None, :]
    acc = tl.zeros((BS, BS), dtype=tl.float32)
    for s in range(0, SPLITS):
        acc += tl.load(P + (s * NNZ + e).to(tl.int64) * (BS * BS) + tile)
    rn = rb * BS + tl.arange(0, BS)
    rk = cb * BS + tl.arange(0, BS)
    tl.store(Out + rn[:, None] * son + rk[None, :] * sok, acc.to(Out.dtype.element_ty))
