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

Memory layouts: the inputs q, k, v share one stride triple and are read where they lie (GPT-2's slices of the fused
qkv projection, Llama's transposed projections; only inputs whose strides differ are copied, grouped-query keys and
values once, straight into the query's layout). Everything written (the output, dQ, dK, dV) and the output gradient
share a second triple: the model's ``(B, T, H, D)`` memory, so ``out.transpose(1, 2)`` is already contiguous and the
caller's ``.contiguous()`` copies nothing. The kernels run on CUDA; with
``TRITON_INTERPRET=1`` set before import they also run on CPU tensors (slow; the CPU tests use that). No dropout
and no head split here: those use the other kernels.
"""

import functools
import importlib.util
import os
from dataclasses import dataclass

import torch

LOCAL, BLOCK_CAUSAL, STRIDED = 0, 1, 2  # mask kinds (the kernels' MASK constant)
NATURAL, CLASS_MAJOR = 0, 1  # index -> token maps (the kernels' MAP constant)
LOG2E = 1.4426950408889634
TRITON_PATTERNS = ("local", "strided", "local_strided", "fixed")
# launch parameters, chosen by the sweep in bench/triton_tune.py on an H200 (docs/attention_benchmark.md)
LAUNCH = {"num_warps": 4, "num_stages": 2, "bm": 64, "bn": 64, "cls_tile": 64}


_TRITON_FOUND: dict = {}  # filled by `triton_installed`; a plain dict, which dynamo reads as a constant


def triton_installed() -> bool:
    """Whether the `triton` package can be imported (checked once, without importing it)."""
    if "found" not in _TRITON_FOUND:
        _TRITON_FOUND["found"] = importlib.util.find_spec("triton") is not None
    return _TRITON_FOUND["found"]


def triton_available(device) -> bool:
    """Whether the Triton kernel can run on `device`: CUDA with triton installed, or the Triton interpreter."""
    if not triton_installed():
        return False
    return torch.device(device).type == "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _kernels():
    """The device code module, imported on first use (importing triton reads TRITON_INTERPRET once)."""
    from . import kernels

    return kernels


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
    """The parts that compute `spec` (an `HSASpec`) at this length (`launch`: LAUNCH items, for the cache)."""
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


def _part_tiles(part) -> int:
    """(query, key) entries of the tiles one part visits in its forward (the key ranges of the kernels'
    ``_key_range``, plus the summary-key loop of ``fixed``); each tile counts ``BM x BN`` entries."""
    total = 0
    for m0 in range(0, part.n, part.bm):
        lo = max(m0 - part.w + 1, 0) if part.mask == LOCAL else (m0 // part.group) * part.group
        lo = (lo // part.bn) * part.bn
        hi = min(m0 + part.bm, part.n)
        total += len(range(lo, hi, part.bn)) * part.bm * part.bn
        if part.n_sum:
            summaries = min((m0 + part.bm - 1) // part.c, part.n_sum)
            total += len(range(0, summaries, part.bs)) * part.bm * part.bs
    return total


@functools.cache
def triton_tile_pairs(spec, seq_len: int) -> int | None:
    """(query, key) entries this kernel computes for one sequence and head under ``spec`` (an ``HSASpec``): every
    entry of every tile it visits, masked or not, from the same :func:`plan_parts` the launches use. ``None`` when
    it does not compute that pattern (``dense``, or a head split). The one count of what the kernel really visits:
    the FLOP conventions (:mod:`mst_hf.conventions`) and everything that prices attention at tiles read it here."""
    if spec.pattern not in TRITON_PATTERNS or spec.head_split:
        return None
    return sum(_part_tiles(part) for part in plan_parts(spec, seq_len, tuple(LAUNCH.items())))


@functools.lru_cache(maxsize=512)
def _meta(part, dtype, head_dim):
    """Compile-time constants and launch options of `part` (cached: launches are host-bound at short lengths)."""
    return dict(
        MASK=part.mask, MAP=part.map, HAS_SUM=part.n_sum > 0, IEEE=dtype == torch.float32, BM=part.bm, BN=part.bn,
        BS=part.bs, BD=max(16, _kernels().triton.next_power_of_2(head_dim)), D=head_dim,
        num_warps=part.num_warps, num_stages=part.num_stages,
    )


def _like(x, ref):
    """`x` in `ref`'s memory layout (a copy only when the layouts differ; `ref` must be dense)."""
    return x if x.stride() == ref.stride() else torch.empty_like(ref).copy_(x)


def _model_layout(x):
    """An empty ``(B, H, T, D)`` tensor like `x` whose memory is ``(B, T, H, D)`` (what transformers passes and takes
    back: the attention output is transposed to that shape)."""
    B, H, T, D = x.shape
    return torch.empty((B, T, H, D), dtype=x.dtype, device=x.device).transpose(1, 2)


def _heads_like(x, ref):
    """`x` ``(B, Hkv, T, D)`` with each head repeated to `ref`'s ``H`` heads (grouped-query attention), in one copy
    laid out like `ref` (contiguous, or the model's ``(B, T, H, D)`` memory); the gradient sums over each group."""
    B, Hkv, T, D = x.shape
    rep = ref.shape[1] // Hkv
    if ref.is_contiguous():
        return x[:, :, None].expand(B, Hkv, rep, T, D).reshape(B, Hkv * rep, T, D)
    x = x.transpose(1, 2)[:, :, :, None].expand(B, T, Hkv, rep, D)  # (B, T, Hkv, rep, D) view
    return x.reshape(B, T, Hkv * rep, D).transpose(1, 2)


def _inputs(q, k, v):
    """q, k, v with one shared stride triple and a contiguous last dim, copying only what does not fit."""
    H = q.shape[1]
    if q.stride(-1) == 1 and k.shape[1] == v.shape[1] == H and k.stride() == v.stride() == q.stride():
        return q, k, v  # the common case: no copy
    if q.stride(-1) != 1 or not _dense(q):  # e.g. q alone is a fused slice while k, v are not: the model's layout
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
    k, v = (_like(x if x.shape[1] == H else _heads_like(x, q), q) for x in (k, v))
    return q, k, v


def _forward(q, k, v, parts, scale):
    """Launch the forward of every part on prepared inputs (`_inputs`): ``(out, lse)``."""
    B, H, T, D = q.shape
    out = _model_layout(q)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)  # log2 units
    head = (*q.stride()[:3], *out.stride()[:3], scale * LOG2E, scale, H, T)
    kernels = _kernels()
    for i, part in enumerate(parts):  # a later part reads and rewrites the rows of `out` it owns
        kernels._fwd_kernel[(part.q_tiles, B * H)](
            q, k, v, out, lse, *head, *part.scalars, CONTINUE=i > 0, **_meta(part, q.dtype, D)
        )
    return out, lse


def _backward(q, k, v, out, lse, dout, parts, scale):
    """Launch the backward of every part: ``(dq, dk, dv)``, in `out`'s memory layout."""
    B, H, T, D = q.shape
    dout = _like(dout, out)  # already in the output's layout when it comes through transformers' transpose
    delta = torch.empty_like(lse)  # rowsum(dO * O), written by the first part's backward kernel
    dq, dk, dv = torch.empty_like(out), torch.empty_like(out), torch.empty_like(out)
    head = (*q.stride()[:3], *out.stride()[:3], scale * LOG2E, scale, H, T)
    kernels = _kernels()
    for i, part in enumerate(parts):
        meta = dict(ACCUM=i > 0, **_meta(part, q.dtype, D))
        args = (*head, *part.scalars)
        if part.self_contained:
            kernels._bwd_self_kernel[(part.q_tiles, B * H)](q, k, v, out, dout, lse, delta, dq, dk, dv, *args, **meta)
            continue
        kernels._bwd_dq_kernel[(part.q_tiles, B * H)](q, k, v, out, dout, lse, delta, dq, *args, **meta)
        kernels._bwd_dkdv_kernel[(part.k_programs, B * H)](q, k, v, dout, lse, delta, dk, dv, *args, **meta)
    return dq, dk, dv


class _TritonHSA(torch.autograd.Function):
    """The eager path: the least host time per call."""

    @staticmethod
    def forward(ctx, q, k, v, parts, scale):
        out, lse = _forward(q, k, v, parts, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.parts, ctx.scale = parts, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        return *_backward(*ctx.saved_tensors, dout, ctx.parts, ctx.scale), None, None


# ---------------------------------------------------------------------------------------------------------------
# The same kernels as opaque custom ops, for torch.compile: dynamo and Inductor see one op with a shape rule instead
# of the Triton launcher. Inductor may hand the ops other memory layouts than eager code would: they re-check them.
# ---------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _op_parts(pattern: str, window: int, stride: int, block: int, seq_len: int, launch: tuple) -> tuple:
    from ...patterns import HSASpec  # the settings were validated where they were made; built once per key here

    return plan_parts(HSASpec(pattern, window, stride, block), seq_len, launch)


def _in_model_layout(x):
    B, H, T, D = x.shape
    return x if x.stride() == (T * H * D, D, H * D, 1) else x.transpose(1, 2).contiguous().transpose(1, 2)


@torch.library.custom_op("mst_hf::hsa_triton", mutates_args=())
def _hsa_triton_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: str, window: int, stride: int,
                   block: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = _inputs(q, k, v)
    return _forward(q, k, v, _op_parts(pattern, window, stride, block, q.shape[2], tuple(LAUNCH.items())), scale)


@_hsa_triton_op.register_fake
def _(q, k, v, pattern, window, stride, block, scale):
    return _model_layout(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("mst_hf::hsa_triton_backward", mutates_args=())
def _hsa_triton_backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                            dout: torch.Tensor, pattern: str, window: int, stride: int, block: int,
                            scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = _inputs(q, k, v)
    parts = _op_parts(pattern, window, stride, block, q.shape[2], tuple(LAUNCH.items()))
    return _backward(q, k, v, _in_model_layout(out), lse.contiguous(), dout, parts, scale)


@_hsa_triton_backward_op.register_fake
def _(q, k, v, out, lse, dout, pattern, window, stride, block, scale):
    return _model_layout(q), _model_layout(q), _model_layout(q)


def _op_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:3], *output)
    ctx.args = inputs[3:]


def _op_backward(ctx, dout, dlse):  # lse is an auxiliary output: its gradient is never used
    dq, dk, dv = torch.ops.mst_hf.hsa_triton_backward(*ctx.saved_tensors, dout, *ctx.args)
    return dq, dk, dv, None, None, None, None, None


_hsa_triton_op.register_autograd(_op_backward, setup_context=_op_setup)


def _dense(x) -> bool:
    """Contiguous, or a (B, H, T, D) view of contiguous (B, T, H, D) memory (what transformers passes)."""
    B, H, T, D = x.shape
    return x.is_contiguous() or x.stride() == (T * H * D, D, H * D, 1)


def triton_attention(query, key, value, spec, scale=None) -> torch.Tensor:
    """`spec`'s pattern on a plain causal sequence: ``(B, H, T, D)`` in and out, the output's memory ``(B, T, H, D)``.
    Grouped-query keys and values ``(B, Hkv, T, D)`` are repeated to the query heads."""
    if not triton_installed():
        raise NotImplementedError("The triton kernel needs the `triton` package (it ships with CUDA builds of torch).")
    query, key, value = _inputs(query, key, value)
    scale = query.shape[-1] ** -0.5 if scale is None else float(scale)
    if torch.compiler.is_compiling():
        op = torch.ops.mst_hf.hsa_triton
        return op(query, key, value, spec.pattern, spec.window, spec.stride, spec.block, scale)[0]
    parts = plan_parts(spec, query.shape[2], tuple(LAUNCH.items()))
    return _TritonHSA.apply(query, key, value, parts, scale)
