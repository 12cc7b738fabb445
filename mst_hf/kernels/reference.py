"""The dense masked oracle of the block-sparse linear: what every kernel test compares against.

``nn.Linear`` layout (``W`` of shape ``(out, in)``): ``y = x @ (W * M)^T + bias``, with the block mask ``M`` of
shape ``(out/b, in/b)`` expanded to elements. GPT-2's ``Conv1D`` layout (``W`` of shape ``(in, out)``):
``y = x @ (W * M) + bias`` with ``M`` of shape ``(in/b, out/b)``. Gradients: ``dX = dY (W * M)`` (Linear) and
the *sampled* ``dW``, ``dY^T X`` only on active blocks and zero elsewhere.
"""

import torch


def expand_block_mask(block_mask: torch.Tensor, block_size: int) -> torch.Tensor:
    """The element mask of a block mask: each entry becomes a ``block_size x block_size`` tile."""
    return block_mask.ne(0).repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)


def reference_linear(x, weight, bias, block_mask, block_size: int, conv1d: bool = False) -> torch.Tensor:
    """``x @ (W * M)^T + bias`` (``x @ (W * M) + bias`` for Conv1D), in the inputs' dtype, by dense torch ops.

    `block_mask` is in the weight's storage orientation: ``(out/b, in/b)`` for Linear, ``(in/b, out/b)`` for
    Conv1D. Inputs of any leading shape ``(..., in)``.
    """
    w = weight * expand_block_mask(block_mask, block_size).to(weight.dtype)
    y = x @ w if conv1d else x @ w.t()
    return y if bias is None else y + bias


def reference_grads(x, weight, bias, block_mask, block_size: int, grad_out, conv1d: bool = False):
    """``(dX, dW, db)`` of :func:`reference_linear` for upstream gradient `grad_out`, computed in float64.

    ``dW`` is the sampled gradient: ``dY^T X`` (transposed for Conv1D) on active blocks, zero on inactive ones.
    ``db`` is None without a bias.
    """
    x64 = x.detach().double().requires_grad_(True)
    w64 = weight.detach().double().requires_grad_(True)
    b64 = None if bias is None else bias.detach().double().requires_grad_(True)
    y = reference_linear(x64, w64, b64, block_mask, block_size, conv1d)
    inputs = (x64, w64) if b64 is None else (x64, w64, b64)
    grads = torch.autograd.grad(y, inputs, grad_out.double())
    dx, dw = grads[0], grads[1]  # autograd already zeroes dW outside the mask (the mask multiplies W)
    db = grads[2] if b64 is not None else None
    return dx, dw, db
