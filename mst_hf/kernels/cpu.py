"""The block-sparse linear on CPU, in plain torch ops: the entry points ``forward``, ``grad_input`` and
``grad_weight`` of :mod:`.triton.launch`, with the same arguments and the same results (:mod:`.reference`'s).

This is for correctness and tests, not speed: it gathers the active tiles and multiplies them in one batched
matmul, which on a CPU is slower than the dense matmul it replaces. What it gives is the block path without a GPU:
``weight_kernels="block"`` on CPU weights, and ``torch.compile`` of a block-mode model on CPU (inductor sees plain
aten ops where on a GPU it sees the Triton launches), so graph breaks and recompilations can be checked there.

Every step reads the compact index (:mod:`.layout`): the ``nnz`` active tiles ``(blk_row[k], col_idx[k])``. With
``W_eff`` the ``(out, in)`` view of the weight, tile ``k`` is ``W_eff[r_k*b : r_k*b+b, c_k*b : c_k*b+b]`` and::

    Y[:, r]   = sum over tiles k with r_k = r of  X[:, c_k] @ W_k^T     (forward, then + bias)
    dX[:, c]  = sum over tiles k with c_k = c of  dY[:, r_k] @ W_k      (input gradient)
    dW_k      = dY[:, r_k]^T @ X[:, c_k], zero outside the active tiles (sampled weight gradient)

each a batched matmul over the tiles (``(nnz, M, b)`` partials) and an ``index_add`` over block-rows or
block-columns. No Python loop over tiles and no value read back from a tensor: ``nnz`` comes from the index's
length only, so under ``torch.compile`` a change of tile count is a change of one input size (a dimension marked
dynamic by :mod:`.layout`), never a new constant.
"""

import torch

from .layout import index_offsets


def _grid(weight: torch.Tensor, block: int, conv1d: bool) -> tuple[int, int]:
    """``(R, C)``: block-rows (output blocks) and block-columns (input blocks) of the weight."""
    n0, n1 = weight.shape
    n_out, n_in = (n1, n0) if conv1d else (n0, n1)
    return n_out // block, n_in // block


def _active(index: torch.Tensor, R: int, C: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, cols)``: the block-row and block-column of each active tile, row-major: int32 ``(nnz,)`` views of
    the index (no ``.long()``: a dtype cast of a length-``nnz`` tensor makes torch.compile guard on ``nnz >= 2``)."""
    offs = index_offsets(R, C, index.numel())
    nnz = offs["nnz"]
    rows = index.narrow(0, offs["blk_row"], nnz)
    cols = index.narrow(0, offs["col_idx"], nnz)
    return rows, cols


def _tiles(weight: torch.Tensor, rows, cols, block: int, conv1d: bool) -> torch.Tensor:
    """The active tiles of ``W_eff`` (``(out, in)``), ``(nnz, b_out, b_in)``."""
    w_eff = weight.t() if conv1d else weight  # (n_out, n_in), a view
    n_out, n_in = w_eff.shape
    grid = w_eff.reshape(n_out // block, block, n_in // block, block).permute(0, 2, 1, 3)  # (R, C, b, b)
    return grid[rows, cols]  # (nnz, b, b)


def forward(x, weight, bias, index, block: int, conv1d: bool):
    """``x (M, in) -> (M, out)``: ``x @ W_eff^T + bias`` over the active tiles."""
    R, C = _grid(weight, block, conv1d)
    rows, cols = _active(index, R, C)
    M = x.shape[0]
    xt = x.reshape(M, C, block).transpose(0, 1).index_select(0, cols)  # (nnz, M, b_in)
    part = torch.bmm(xt, _tiles(weight, rows, cols, block, conv1d).transpose(1, 2))  # (nnz, M, b_out)
    y = x.new_zeros(R, M, block).index_add(0, rows, part)  # (R, M, b)
    y = y.transpose(0, 1).reshape(M, R * block)
    return y if bias is None else y + bias


def grad_input(grad_out, weight, index, block: int, conv1d: bool):
    """``dY (M, out) -> dX (M, in)``: ``dY @ W_eff`` over the active tiles."""
    R, C = _grid(weight, block, conv1d)
    rows, cols = _active(index, R, C)
    M = grad_out.shape[0]
    gt = grad_out.reshape(M, R, block).transpose(0, 1).index_select(0, rows)  # (nnz, M, b_out)
    part = torch.bmm(gt, _tiles(weight, rows, cols, block, conv1d))  # (nnz, M, b_in)
    dx = grad_out.new_zeros(C, M, block).index_add(0, cols, part)  # (C, M, b)
    return dx.transpose(0, 1).reshape(M, C * block)


def grad_weight(grad_out, x, weight, index, block: int, conv1d: bool, split: int = 0):
    """The sampled ``dW`` in the weight's own layout: ``dY^T X`` on active tiles, zero elsewhere (contiguous).

    `split` (the GPU's token chunks) is accepted for the same signature and ignored.
    """
    R, C = _grid(weight, block, conv1d)
    rows, cols = _active(index, R, C)
    M = x.shape[0]
    gt = grad_out.reshape(M, R, block).permute(1, 2, 0).index_select(0, rows)  # (nnz, b_out, M)
    xt = x.reshape(M, C, block).transpose(0, 1).index_select(0, cols)  # (nnz, M, b_in)
    tiles = torch.bmm(gt, xt).to(weight.dtype)  # (nnz, b_out, b_in)
    grid = weight.new_zeros(R, C, block, block).index_put((rows, cols), tiles)  # each tile once: no accumulation
    dw_eff = grid.permute(0, 2, 1, 3).reshape(R * block, C * block)  # (n_out, n_in)
    return dw_eff.t().contiguous() if conv1d else dw_eff
