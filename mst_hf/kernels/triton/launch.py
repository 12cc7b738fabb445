"""Launching the block-sparse kernels: tile sizes per block size, the token split of ``dW``, and the three entry
points the custom ops call (``forward``, ``grad_input``, ``grad_weight``).

Weights are addressed through ``W_eff``, the ``(out, in)`` view of either layout: ``nn.Linear`` stores it as is,
``Conv1D`` stores its transpose, so only strides change (:func:`weight_strides`). Launches go through
``torch.library.wrap_triton`` so that ``torch.compile`` can trace them inside ``triton_op`` custom ops; outside a
trace it simply launches. The device code is imported on first use (``triton`` is optional for the package).
"""

import contextlib
import functools

import torch

from ..layout import index_offsets

# Launch parameters per block size, from the sweep in bench/blocksparse_linear.py (docs/kernels.md).
# mm: forward and dX (BM token rows per program, BK-wide steps inside a block); dw: sampled dW (BM tokens per step).
LAUNCH = {
    16: {"mm": dict(bm=64, bk=16, num_warps=4, num_stages=2), "dw": dict(bm=32, num_warps=4, num_stages=2)},
    32: {"mm": dict(bm=128, bk=32, num_warps=4, num_stages=3), "dw": dict(bm=64, num_warps=4, num_stages=3)},
    64: {"mm": dict(bm=128, bk=64, num_warps=4, num_stages=3), "dw": dict(bm=64, num_warps=4, num_stages=3)},
    128: {"mm": dict(bm=128, bk=64, num_warps=8, num_stages=3), "dw": dict(bm=64, num_warps=8, num_stages=3)},
}
MIN_CHUNK_STEPS = 8  # a dW token chunk spans at least this many BM steps (else the split costs more than it gains)


@functools.cache
def _device():
    from . import device

    return device


def _wrap(kernel):
    return torch.library.wrap_triton(kernel)


def direct_launches():
    """A context in which the entry points launch directly instead of through wrap_triton's tracing path, which
    costs about a millisecond of host time per launch in eager mode (``triton_op`` does the same for its eager
    calls). Eager callers of ``forward``/``grad_input``/``grad_weight`` should use it."""
    try:
        from torch._library.triton import set_wrap_triton_enabled
    except ImportError:  # pragma: no cover - older torch: wrap_triton has no eager switch
        return contextlib.nullcontext()
    return set_wrap_triton_enabled(False)


@functools.cache
def sm_count(device_str: str) -> int:
    """Streaming multiprocessors of a CUDA device (4 for the CPU interpreter: enough to exercise the split)."""
    device = torch.device(device_str)
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def dw_splits(nnz: int, tokens: int, bm: int, sms: int) -> int:
    """Token chunks for the sampled dW: enough programs for two waves, each chunk at least MIN_CHUNK_STEPS steps."""
    if nnz == 0:
        return 1
    want = -(-2 * sms // nnz)
    most = max(1, tokens // (bm * MIN_CHUNK_STEPS))
    return max(1, min(want, most))


def weight_strides(weight: torch.Tensor, conv1d: bool) -> tuple[int, int]:
    """Strides ``(s_out, s_in)`` of ``W_eff`` (``(out, in)``) inside the stored weight."""
    s0, s1 = weight.stride()
    return (s1, s0) if conv1d else (s0, s1)


def _grid_shape(weight: torch.Tensor, block: int, conv1d: bool) -> tuple[int, int]:
    """``(n_out, n_in)`` of the weight."""
    n0, n1 = weight.shape
    return (n1, n0) if conv1d else (n0, n1)


def _mm(a, b_strides, weight, bias, index, offs, n_cols, ptr_off, idx_off, block, out_dtype):
    """``Out (M, n_cols)`` = the block-sparse product over one CSR part of the index."""
    M = a.shape[0]
    cfg = LAUNCH[block]["mm"]
    out = torch.empty((M, n_cols), dtype=out_dtype, device=a.device)
    if M == 0:
        return out
    grid = (n_cols // block, triton_cdiv(M, cfg["bm"]))
    _wrap(_device().bsr_matmul)[grid](
        a, weight, bias if bias is not None else a, out, index,
        M, a.stride(0), a.stride(1), b_strides[0], b_strides[1], out.stride(0), out.stride(1),
        offs[ptr_off], offs[idx_off],
        BS=block, BM=cfg["bm"], BK=min(cfg["bk"], block), HAS_BIAS=bias is not None,
        IEEE=a.dtype == torch.float32, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def forward(x, weight, bias, index, block: int, conv1d: bool):
    """``x (M, in) -> (M, out)``: ``x @ W_eff^T + bias`` over the active blocks of each block-row."""
    n_out, n_in = _grid_shape(weight, block, conv1d)
    offs = index_offsets(n_out // block, n_in // block, index.numel())
    s_out, s_in = weight_strides(weight, conv1d)
    return _mm(x, (s_in, s_out), weight, bias, index, offs, n_out, "row_ptr", "col_idx", block, x.dtype)


def grad_input(grad_out, weight, index, block: int, conv1d: bool):
    """``dY (M, out) -> dX (M, in)``: ``dY @ W_eff`` over the active blocks of each block-column."""
    n_out, n_in = _grid_shape(weight, block, conv1d)
    offs = index_offsets(n_out // block, n_in // block, index.numel())
    s_out, s_in = weight_strides(weight, conv1d)
    return _mm(grad_out, (s_out, s_in), weight, None, index, offs, n_in, "col_ptr", "row_idx", block, grad_out.dtype)


def grad_weight(grad_out, x, weight, index, block: int, conv1d: bool, split: int = 0):
    """The sampled ``dW`` in the weight's own layout: ``dY^T X`` on active blocks, zero elsewhere.

    `split`: token chunks (0 = :func:`dw_splits`). More than one chunk writes float32 partials, summed in order.
    """
    n_out, n_in = _grid_shape(weight, block, conv1d)
    offs = index_offsets(n_out // block, n_in // block, index.numel())
    nnz = offs["nnz"]
    dw = torch.zeros_like(weight, memory_format=torch.contiguous_format)
    M = x.shape[0]
    if nnz == 0 or M == 0:
        return dw
    cfg = LAUNCH[block]["dw"]
    splits = split or dw_splits(nnz, M, cfg["bm"], sm_count(str(x.device)))
    chunk = triton_cdiv(triton_cdiv(M, splits), cfg["bm"]) * cfg["bm"]
    splits = triton_cdiv(M, chunk)
    son, sok = weight_strides(dw, conv1d)
    ieee = x.dtype == torch.float32
    dev = _device()
    target = dw if splits == 1 else torch.empty((splits, nnz, block, block), dtype=torch.float32, device=x.device)
    _wrap(dev.sampled_dw)[(nnz, splits)](
        grad_out, x, target, index,
        M, chunk, nnz, grad_out.stride(0), grad_out.stride(1), x.stride(0), x.stride(1), son, sok,
        offs["blk_row"], offs["col_idx"],
        BS=block, BM=cfg["bm"], SPLIT=splits > 1, IEEE=ieee, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    if splits > 1:
        _wrap(dev.reduce_dw)[(nnz,)](
            target, dw, index, nnz, splits, son, sok, offs["blk_row"], offs["col_idx"], BS=block,
            num_warps=4 if block <= 64 else 8,
        )
    return dw
