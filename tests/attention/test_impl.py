"""Each implementation (flex layouts, SDPA layouts) against the reference, with gradients; the mask caches.
On CPU the flex layouts run through the differentiable "math" engine; the GPU tests run them on flex."""

import warnings

import pytest
import torch

from mst_hf.attention import HSASpec
from mst_hf.attention.dispatch import run_kernel
from mst_hf.attention.impl.flex import _block_mask, fixed_attention, local_strided_attention, strided_attention
from mst_hf.attention.impl.reference import reference_attention

from .helpers import CASES, hand_mask, model_layout, vector_mask

warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")


def test_flex_on_cpu_refuses_backward():
    q = torch.randn(1, 2, 8, 16, requires_grad=True)
    with pytest.raises(NotImplementedError, match="CPU"):
        run_kernel("flex", q, q, q, HSASpec("local", window=2))


# --- the fast layouts, on CPU through the differentiable "math" engine (GPU tests below run them on flex) -------
@pytest.mark.parametrize("seq_len", [8, 29, 64])
@pytest.mark.parametrize("window,stride,block", [(4, 3, 5), (3, 8, 4), (9, 4, 16)])
def test_layouts_match_reference_with_grads(seq_len, window, stride, block):
    torch.manual_seed(seq_len)
    q = torch.randn(2, 4, seq_len, 16, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, seq_len, 16, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, seq_len, 16, dtype=torch.float64, requires_grad=True)
    runs = {
        "local_strided": lambda: local_strided_attention(q, k, v, window, stride, 0.25, engine="math")[0],
        "strided": lambda: strided_attention(q, k, v, stride, 0.25, engine="math")[0],
        "fixed": lambda: fixed_attention(q, k, v, block, 0.25, engine="math")[0],
    }
    for pattern, run in runs.items():
        mask = hand_mask(pattern, seq_len, window, stride, block, heads=1)
        expected = reference_attention(q, k, v, mask, 0.25).double()
        out = run()
        grad_out = torch.randn_like(out)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5, msg=pattern)
        got = torch.autograd.grad(out, (q, k, v), grad_out)
        want = torch.autograd.grad(expected, (q, k, v), grad_out)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5, msg=pattern)


@pytest.mark.parametrize(
    "kernel,spec",
    [
        ("perm_sdpa", HSASpec("strided", stride=4)),
        ("perm_sdpa", HSASpec("strided", stride=7)),
        ("chunk_sdpa", HSASpec("local", window=5)),
        ("chunk_sdpa", HSASpec("local", window=16)),
        ("chunk_sdpa", HSASpec("fixed", block=6)),
        ("chunk_sdpa", HSASpec("fixed", block=16)),
    ],
)
@pytest.mark.parametrize("seq_len", [27, 64])
def test_sdpa_layouts_match_reference_with_grads(kernel, spec, seq_len):
    q = model_layout(2, 4, seq_len, 16)
    k, v = model_layout(2, 2, seq_len, 16), model_layout(2, 2, seq_len, 16)
    out = run_kernel(kernel, q, k, v, spec)
    mask = vector_mask(spec.pattern, seq_len, spec.window, spec.stride, spec.block, heads=1)
    expected = reference_attention(q, k, v, mask)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    grad_out = torch.randn_like(out)
    for g, w in zip(torch.autograd.grad(out, (q, k, v), grad_out), torch.autograd.grad(expected, (q, k, v), grad_out)):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_block_masks_are_cached_not_rebuilt():
    first = _block_mask(("local", 4), 256, 256, torch.device("cpu"))
    assert _block_mask(("local", 4), 256, 256, torch.device("cpu")) is first
    assert first.mask_mod is _block_mask(("local", 4), 256, 256, torch.device("cpu")).mask_mod


# --- GPU ---------------------------------------------------------------------------------------------------------
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize(
    "kernel,pattern,head_split",
    [("flex", p, h) for p, h in CASES]
    + [("triton", p, False) for p in ("local", "strided", "local_strided", "fixed")]
    + [("perm_sdpa", "strided", False), ("chunk_sdpa", "local", False), ("chunk_sdpa", "fixed", False)],
)
def test_cuda_kernels_match_reference_bf16(kernel, pattern, head_split):
    seq_len = 1000  # not a multiple of the flex block (128), the stride (48) or the fixed block (80)
    torch.manual_seed(0)
    spec = HSASpec(pattern, window=64, stride=48, block=80, head_split=head_split)
    q = model_layout(2, 4, seq_len, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (model_layout(2, 2, seq_len, 64, device="cuda", dtype=torch.bfloat16) for _ in "kv")
    mask = vector_mask(pattern, seq_len, 64, 48, 80, heads=4, head_split=head_split).cuda()
    out = run_kernel(kernel, q, k, v, spec)
    expected = reference_attention(q, k, v, mask)
    assert relative_error(out, expected) < 1e-2
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    want = torch.autograd.grad(expected, (q, k, v), grad_out.float())
    for g, w in zip(got, want):
        assert relative_error(g, w) < 2e-2
