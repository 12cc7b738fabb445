"""The block-sparse linear as PyTorch custom ops with autograd: usable eagerly, under ``torch.compile`` and under
autocast.

Three ``torch.library.triton_op`` ops (``mst_hf::block_sparse_linear``, ``..._grad_input``, ``..._grad_weight``)
take 2-D activations, the dense-stored weight, the layout's compact index and the block size; the forward op's
autograd formula (``register_autograd``) calls the other two and sums ``dY`` for the bias. ``triton_op`` lets
``torch.compile`` see the Triton launches instead of treating the op as a black box.

CPU tensors take :mod:`.cpu` instead (plain torch ops over the same index, for correctness and tests, not speed),
chosen inside each op's body by :func:`implementation`. The body is also the op's fake kernel and what
``torch.compile`` decomposes the op into, so a compiled CPU model traces plain aten ops. (A separate
``register_kernel(op, "cpu")`` would serve eager calls only: the fake kernel and the decomposition would still run
the Triton body on CPU tensors, which fails under ``torch.compile``.)

Eager calls take a shorter road to the same launches and formulas: a plain ``torch.autograd.Function`` that
launches directly. The custom-op dispatch costs host time per call (measured on the H200 machine: small layers
became host-bound), which matters in eager loops; under ``torch.compile`` the ops are traced and that cost is gone.

:func:`block_sparse_linear` is the user entry: any leading shape, both weight layouts, and autocast handled as
``nn.Linear`` does (activations, weight and bias cast to the autocast dtype, by differentiable casts outside the
op, so the float32 master weight receives the gradient).
"""

import torch
from torch import Tensor

from . import cpu
from .layout import BlockLayout
from .triton import launch

_NS = "mst_hf"

# CPU tensors run the plain-torch implementation; "triton" runs the Triton kernels there instead, in Triton's
# interpreter (TRITON_INTERPRET=1: eager only), which is how the kernel tests exercise them without a GPU.
CPU_KERNELS = "torch"


def implementation(t: Tensor):
    """The module whose ``forward``/``grad_input``/``grad_weight`` compute on `t`'s device: :mod:`.cpu` for CPU
    tensors (unless ``CPU_KERNELS == "triton"``), the Triton launches otherwise."""
    return cpu if t.device.type == "cpu" and CPU_KERNELS == "torch" else launch


@torch.library.triton_op(f"{_NS}::block_sparse_linear", mutates_args=())
def _linear_op(x: Tensor, weight: Tensor, bias: Tensor | None, index: Tensor, block: int, conv1d: bool) -> Tensor:
    return implementation(x).forward(x, weight, bias, index, block, conv1d)


@torch.library.triton_op(f"{_NS}::block_sparse_linear_grad_input", mutates_args=())
def _grad_input_op(grad_out: Tensor, weight: Tensor, index: Tensor, block: int, conv1d: bool) -> Tensor:
    return implementation(grad_out).grad_input(grad_out, weight, index, block, conv1d)


@torch.library.triton_op(f"{_NS}::block_sparse_linear_grad_weight", mutates_args=())
def _grad_weight_op(
    grad_out: Tensor, x: Tensor, weight: Tensor, index: Tensor, block: int, conv1d: bool, split: int
) -> Tensor:
    return implementation(x).grad_weight(grad_out, x, weight, index, block, conv1d, split)


def _setup_context(ctx, inputs, output):
    x, weight, bias, index, block, conv1d = inputs
    ctx.save_for_backward(x, weight, index)
    ctx.block, ctx.conv1d, ctx.has_bias = block, conv1d, bias is not None


def _grads(ctx, grad_out, grad_input, grad_weight):
    x, weight, index = ctx.saved_tensors
    dx = dw = db = None
    if ctx.needs_input_grad[0]:
        dx = grad_input(grad_out, weight, index, ctx.block, ctx.conv1d)
    if ctx.needs_input_grad[1]:
        dw = grad_weight(grad_out, x, weight, index, ctx.block, ctx.conv1d, 0)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        db = grad_out.sum(0, dtype=torch.float32).to(grad_out.dtype)
    return dx, dw, db, None, None, None


def _backward(ctx, grad_out):
    ops = torch.ops.mst_hf
    return _grads(ctx, grad_out, ops.block_sparse_linear_grad_input, ops.block_sparse_linear_grad_weight)


torch.library.register_autograd(f"{_NS}::block_sparse_linear", _backward, setup_context=_setup_context)

# Eager calls skip the dispatcher: the same launches and formulas in a plain autograd.Function (less host time per
# layer; the custom ops are what torch.compile traces). "op" routes eager calls through the custom ops too.
EAGER_PATH = "function"


class _EagerBlockSparseLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, index, block, conv1d):  # classic form: apply() skips signature binding
        _setup_context(ctx, (x, weight, bias, index, block, conv1d), None)
        with launch.direct_launches():
            return implementation(x).forward(x, weight, bias, index, block, conv1d)

    @staticmethod
    def backward(ctx, grad_out):
        impl = implementation(grad_out)
        with launch.direct_launches():
            return _grads(ctx, grad_out, impl.grad_input, impl.grad_weight)


def _check(x: Tensor, weight: Tensor, bias, layout: BlockLayout, conv1d: bool) -> tuple[int, int]:
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"`layout` must be a mst_hf.kernels.BlockLayout, got {type(layout).__name__}.")
    if weight.ndim != 2:
        raise ValueError(f"`weight` must be 2-D, got shape {tuple(weight.shape)}.")
    n_out, n_in = (weight.shape[1], weight.shape[0]) if conv1d else tuple(weight.shape)
    if layout.shape != (n_out, n_in):
        kind = "Conv1D (in, out)" if conv1d else "nn.Linear (out, in)"
        raise ValueError(
            f"The layout covers a weight of (n_out, n_in)={layout.shape} but the {kind} weight of shape "
            f"{tuple(weight.shape)} is (n_out, n_in)=({n_out}, {n_in}); build the layout from this weight's mask."
        )
    if x.shape[-1] != n_in:
        raise ValueError(f"`x` has {x.shape[-1]} features in its last dimension; the weight expects n_in={n_in}.")
    if bias is not None and tuple(bias.shape) != (n_out,):
        raise ValueError(f"`bias` must have shape ({n_out},), got {tuple(bias.shape)}.")
    return n_out, n_in


def block_sparse_linear(x: Tensor, weight: Tensor, bias: Tensor | None, layout: BlockLayout, conv1d: bool = False):
    """``x @ W^T + bias`` (``nn.Linear``) or ``x @ W + bias`` (``conv1d=True``, GPT-2's ``Conv1D``) computed on the
    active blocks of `layout` only. Exact when `weight` is zero outside them (as MST keeps it); the weight
    gradient is the sampled one (zero outside active blocks). `x` has shape ``(..., n_in)``.
    """
    n_out, n_in = _check(x, weight, bias, layout, conv1d)
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(
                f"`{name}` is {t.dtype} but `x` is {x.dtype}; cast them to one dtype or run under torch.autocast."
            )
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"The block-sparse kernels take float32, float16 or bfloat16 inputs, got {x.dtype}.")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, n_in)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    args = (x2, weight, bias, layout.index(x.device), layout.block_size, conv1d)
    if EAGER_PATH == "function" and not torch.compiler.is_compiling():
        y = _EagerBlockSparseLinear.apply(*args)
    else:
        y = torch.ops.mst_hf.block_sparse_linear(*args)
    return y.reshape(*lead, n_out)
