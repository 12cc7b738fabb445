"""The block-sparse custom ops on CPU tensors (mst_hf.kernels.cpu, plain torch) against the dense masked reference,
eagerly and under torch.compile. No triton needed: CPU tensors never reach the Triton launches."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from mst_hf.kernels import (
    BlockLayout,
    block_sparse_linear,
    enable_block_sparse,
    expand_block_mask,
    ops,
    reference_grads,
    reference_linear,
)
from mst_hf.kernels.triton import launch

OPS = torch.ops.mst_hf
BLOCK = 16


def make_case(conv1d, bias=True, n_in=64, n_out=96, tokens=20, seed=0, blocks=None):
    """x (tokens, n_in), a weight that is NOT zero outside the active tiles (so masking is tested), bias, the block
    mask in the weight's storage orientation, and the layout (matmul orientation)."""
    g = torch.Generator().manual_seed(seed)
    if blocks is None:
        blocks = torch.rand(n_out // BLOCK, n_in // BLOCK, generator=g) < 0.5  # (R, C)
        blocks[1] = False  # a block-row with no tile
        blocks[:, 2] = False  # a block-column with no tile
    w = torch.randn(n_out, n_in, generator=g)
    if conv1d:
        w = w.t().contiguous()
    b = torch.randn(n_out, generator=g) if bias else None
    x = torch.randn(tokens, n_in, generator=g)
    mask = blocks.t() if conv1d else blocks
    return x, w, b, mask, BlockLayout(blocks, BLOCK)


CASES = [(conv1d, bias) for conv1d in (False, True) for bias in (True, False)]
IDS = [f"{'conv1d' if c else 'linear'}-{'bias' if b else 'nobias'}" for c, b in CASES]


@pytest.mark.parametrize("conv1d, bias", CASES, ids=IDS)
def test_forward_op_matches_reference(conv1d, bias):
    x, w, b, mask, layout = make_case(conv1d, bias)
    y = OPS.block_sparse_linear(x, w, b, layout.index("cpu"), BLOCK, conv1d)
    torch.testing.assert_close(y, reference_linear(x, w, b, mask, BLOCK, conv1d), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_grad_input_op_matches_reference(conv1d):
    x, w, b, mask, layout = make_case(conv1d)
    g = torch.randn(x.shape[0], 96)
    dx = OPS.block_sparse_linear_grad_input(g, w, layout.index("cpu"), BLOCK, conv1d)
    torch.testing.assert_close(dx.double(), reference_grads(x, w, b, mask, BLOCK, g, conv1d)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_grad_weight_op_is_the_sampled_gradient(conv1d):
    x, w, b, mask, layout = make_case(conv1d)
    g = torch.randn(x.shape[0], 96)
    dw = OPS.block_sparse_linear_grad_weight(g, x, w, layout.index("cpu"), BLOCK, conv1d, 0)
    want = reference_grads(x, w, b, mask, BLOCK, g, conv1d)[1]  # zero outside the active tiles
    assert dw.shape == w.shape and dw.is_contiguous()
    torch.testing.assert_close(dw.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("conv1d, bias", CASES, ids=IDS)
def test_autograd_through_block_sparse_linear_matches_reference(conv1d, bias):
    """The user entry, both eager paths (the autograd.Function and the custom op), leading dims, db included."""
    x, w, b, mask, layout = make_case(conv1d, bias)
    x = x.reshape(4, 5, -1)
    g = torch.randn(4, 5, 96)
    want = reference_grads(x, w, b, mask, BLOCK, g, conv1d)
    for path in ("function", "op"):
        ops.EAGER_PATH = path
        try:
            inputs = [t.clone().requires_grad_(True) for t in (x, w) + ((b,) if bias else ())]
            y = block_sparse_linear(inputs[0], inputs[1], inputs[2] if bias else None, layout, conv1d)
            got = torch.autograd.grad(y, inputs, g)
        finally:
            ops.EAGER_PATH = "function"
        for name, gg, rr in zip(("dX", "dW", "db"), got, want):
            torch.testing.assert_close(gg.double(), rr, atol=1e-5, rtol=1e-5, msg=f"{path}: {name}")


def test_no_active_tile_gives_bias_and_zero_grads():
    x, w, b, _, layout = make_case(False, blocks=torch.zeros(6, 4, dtype=torch.bool))
    w.requires_grad_(True)
    y = block_sparse_linear(x, w, b, layout)
    (dw,) = torch.autograd.grad(y.sum(), (w,))
    assert torch.equal(y, b.expand_as(y)) and dw.abs().max().item() == 0.0


def test_cpu_tensors_never_reach_the_triton_launches(monkeypatch):
    """The eager autograd.Function (launch.direct_launches) and the custom ops route CPU tensors to the CPU
    implementation, whatever TRITON_INTERPRET says."""

    def refuse(*args, **kwargs):
        raise AssertionError("a Triton launch was called for CPU tensors")

    for name in ("forward", "grad_input", "grad_weight"):
        monkeypatch.setattr(launch, name, refuse)
    x, w, b, mask, layout = make_case(True)
    w.requires_grad_(True)
    y = block_sparse_linear(x, w, b, layout, conv1d=True)
    y.sum().backward()
    torch.testing.assert_close(y, reference_linear(x, w, b, mask, BLOCK, True), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cls", [nn.Linear, Conv1D], ids=["linear", "conv1d"])
def test_compiled_module_matches_eager_and_new_tile_counts_reuse_the_graph(cls):
    """fullgraph (no graph break), gradients equal to eager; topology updates that change the tile count reuse the
    graph: the index length is dynamic. One more graph for the layout with no active tile (torch specializes sizes
    0 and 1), and that is all. (It once recompiled at every update: an nn.Linear's attributes get static shapes.)"""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    module = nn.Linear(64, 96) if cls is nn.Linear else Conv1D(96, 64)
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    x = torch.randn(3, 7, 64, requires_grad=True)
    for step, density in enumerate((0.5, 0.3, 0.75, 0.0, 0.6)):
        blocks = torch.rand(6, 4) < density  # (out/b, in/b)
        elem = expand_block_mask(blocks, BLOCK)  # (out, in)
        with torch.no_grad():
            module.weight.mul_(elem.t() if cls is Conv1D else elem)
        enable_block_sparse(module, elem.t() if cls is Conv1D else elem, BLOCK)
        got = (compiled(x), *torch.autograd.grad(compiled(x).square().sum(), (x, module.weight)))
        want = (module(x), *torch.autograd.grad(module(x).square().sum(), (x, module.weight)))
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5, msg=f"update {step}")
    assert counters["stats"]["unique_graphs"] <= 2 and not counters["graph_break"]
