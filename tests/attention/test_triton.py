"""The Triton HSA kernel (mst_hf.attention.impl.triton) against the masked float32 reference.

Without CUDA these run the real kernels in Triton's interpreter (conftest sets TRITON_INTERPRET=1 before anything
imports triton); they are skipped where triton is not installed. The interpreter has no bfloat16 matmul, so CPU
tests use float32 and float16; the bfloat16 check runs on the GPU (tests/attention/test_impl.py, marked gpu)."""

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("triton")

import mst_hf.attention as hsa  # noqa: E402
import mst_hf.attention.dispatch as kernels  # noqa: E402
import mst_hf.attention.impl.triton as at  # noqa: E402
import mst_hf.attention.impl.triton.launch as launch  # noqa: E402
from mst_hf.attention import HSASpec  # noqa: E402
from mst_hf.attention.dispatch import auto_candidates, choose_kernel  # noqa: E402
from mst_hf.attention.impl.reference import reference_attention  # noqa: E402

from .helpers import (  # noqa: E402
    ORACLE_MASKS,
    SEQ,
    VOCAB,
    NoKernels,
    assert_same_math,
    build,
    hand_mask,
    twin,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not at.triton_available(DEVICE), reason="needs CUDA or TRITON_INTERPRET=1")


def layout(B, H, T, D, dtype=torch.float32):
    """(B, H, T, D) views of (B, T, H, D) memory, the layout transformers passes."""
    return torch.randn(B, T, H, D, dtype=dtype, device=DEVICE).transpose(1, 2).requires_grad_(True)


def loop_mask(spec, T):
    """The SPEC definitions, written as loops (independent of the kernel's tile arithmetic)."""
    mask = torch.zeros(1, 1, T, T, dtype=torch.bool)
    for q in range(T):
        for k in range(q + 1):
            d = q - k
            mask[0, 0, q, k] = {
                "local": d < spec.window,
                "strided": d % spec.stride == 0,
                "local_strided": d < spec.window or d % spec.stride == 0,
                "fixed": q // spec.block == k // spec.block or k % spec.block == spec.block - 1,
            }[spec.pattern]
    return mask.to(DEVICE)


def check_against_reference(spec, T, heads=2, kv_heads=1, head_dim=16, dtype=torch.float32, tol=1e-5):
    torch.manual_seed(0)
    q = layout(1, heads, T, head_dim, dtype)
    k, v = layout(1, kv_heads, T, head_dim, dtype), layout(1, kv_heads, T, head_dim, dtype)
    rep = heads // kv_heads
    out = at.triton_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), spec)
    expected = reference_attention(q, k, v, loop_mask(spec, T))
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)
    grad_out = torch.randn_like(expected)
    got = torch.autograd.grad(out, (q, k, v), grad_out.to(dtype))
    want = torch.autograd.grad(expected, (q, k, v), grad_out)
    for name, g, w in zip("qkv", got, want):
        torch.testing.assert_close(g.float(), w.float(), atol=tol * 10, rtol=tol * 10, msg=f"d{name}")


SPECS = [
    HSASpec("local", window=24),
    HSASpec("strided", stride=7),  # 7 does not divide T: class-major tiles end inside a class
    HSASpec("strided", stride=12),  # L = 8 classes per position: tiles are self-contained (one-pass backward)
    HSASpec("local_strided", window=10, stride=6),
    HSASpec("local_strided", window=5, stride=12),  # window < stride
    HSASpec("fixed", block=12),
    HSASpec("fixed", block=40),  # several query tiles per block, summaries over several key tiles
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.pattern}-w{s.window}-s{s.stride}-c{s.block}")
def test_small_tiles_match_reference_with_grads(spec, monkeypatch):
    # 16-wide tiles on T = 96 make every loop run over several tiles and cross block / class boundaries
    monkeypatch.setitem(at.LAUNCH, "bm", 16)
    monkeypatch.setitem(at.LAUNCH, "bn", 16)
    monkeypatch.setitem(at.LAUNCH, "cls_tile", 16)
    check_against_reference(spec, 96)


@pytest.mark.parametrize("pattern", at.TRITON_PATTERNS)
def test_default_tiles_odd_length_and_head_dim(pattern):
    # T = 75: not a multiple of the tiles; head_dim 24 is padded to 32 inside the kernel
    check_against_reference(HSASpec(pattern, window=9, stride=5, block=10), 75, head_dim=24)


def test_half_precision_inputs():
    check_against_reference(HSASpec("local_strided", window=8, stride=8), 64, dtype=torch.float16, tol=2e-3)


def test_plan_uses_the_one_pass_backward_only_for_self_contained_tiles():
    launch = tuple(sorted(dict(at.LAUNCH, cls_tile=64).items()))
    assert [p.self_contained for p in at.plan_parts(HSASpec("strided", stride=128), 1024, launch)] == [True]
    assert [p.self_contained for p in at.plan_parts(HSASpec("strided", stride=8), 1024, launch)] == [False]
    assert [p.self_contained for p in at.plan_parts(HSASpec("local_strided"), 1024, launch)] == [False, True]
    assert [p.n_sum for p in at.plan_parts(HSASpec("fixed", block=128), 1000, launch)] == [7]


def test_fused_qkv_slices_are_read_in_place_not_misread():
    B, T, H, D = 1, 40, 2, 16
    qkv = torch.randn(B, T, 3 * H * D, device=DEVICE, requires_grad=True)
    q, k, v = (x.view(B, T, H, D).transpose(1, 2) for x in qkv.split(H * D, dim=2))  # strided, not dense
    spec = HSASpec("fixed", block=8)
    out = at.triton_attention(q, k, v, spec)
    expected = reference_attention(q, k, v, loop_mask(spec, T))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    got, want = (torch.autograd.grad(x.sum(), qkv)[0] for x in (out, expected))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)




class _AtenOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def host_tensor_ops(q, k, v, leaves, monkeypatch):
    """Counts of the aten ops one call runs around its kernels, forward and backward, as transformers uses it: the
    output transposed to ``(B, T, H, D)`` and made contiguous."""
    monkeypatch.setattr(launch, "_kernels", lambda: NoKernels)
    with _AtenOps() as mode:
        out = at.triton_attention(q, k, v, HSASpec("local_strided", window=8, stride=4))
        y = out.transpose(1, 2).contiguous()
        torch.autograd.grad(y, leaves, torch.ones_like(y))
    return mode.ops


COPIES = ("copy_", "clone", "contiguous", "_to_copy", "repeat_interleave", "index_select")


def test_model_tensors_are_read_in_place_and_the_output_written_in_model_layout(monkeypatch):
    B, T, H, D = 1, 40, 4, 16
    qkv = torch.randn(B, T, 3 * H * D, requires_grad=True)  # GPT-2: slices of the fused projection
    fused = [x.view(B, T, H, D).transpose(1, 2) for x in qkv.split(H * D, dim=2)]
    separate = [torch.randn(B, T, H, D, requires_grad=True) for _ in range(3)]  # Llama: q, k, v projections
    for inputs, leaves in ((fused, [qkv]), ([x.transpose(1, 2) for x in separate], separate)):
        ops = host_tensor_ops(*inputs, leaves, monkeypatch)
        assert not {op: n for op, n in ops.items() if op in COPIES}, ops


def test_grouped_query_keys_are_repeated_with_one_copy_each(monkeypatch):
    B, T, H, D = 1, 40, 4, 16
    q = torch.randn(B, T, H, D, requires_grad=True)
    k, v = (torch.randn(B, T, 2, D, requires_grad=True) for _ in range(2))
    ops = host_tensor_ops(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), [q, k, v], monkeypatch)
    assert {op: n for op, n in ops.items() if op in COPIES} == {"clone": 2}, ops  # k and v, forward only


def test_forced_triton_backend_matches_oracle_in_a_model(monkeypatch):
    monkeypatch.setenv(hsa.HSA_BACKEND_ENV, "triton")
    model = build("llama", "mst_hsa")
    hsa.configure_hsa(model, pattern="local_strided", window=4, stride=3, active=True)
    ORACLE_MASKS.update({0: hand_mask("local_strided", SEQ), 1: hand_mask("local_strided", SEQ)})
    assert_same_math(model, twin(model, "mst_test_oracle"), torch.randint(3, VOCAB, (2, SEQ)))


def test_custom_op_registration_is_consistent():
    # the op torch.compile sees: fake (shape and layout) rule, autograd and schemas checked against the real kernels
    B, T, H, D = 1, 24, 2, 16
    q, k, v = (torch.randn(B, T, H, D, device=DEVICE).transpose(1, 2).requires_grad_(True) for _ in range(3))
    torch.library.opcheck(torch.ops.mst_hf.hsa_triton.default, (q, k, v, "local_strided", 5, 4, 8, D**-0.5),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.slow
def test_compiled_model_runs_the_triton_kernel_as_one_op(monkeypatch):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setenv(hsa.HSA_BACKEND_ENV, "triton")
    model = build("llama", "mst_hsa").train()  # grouped-query attention: 4 heads, 2 key/value heads
    hsa.configure_hsa(model, HSASpec("local_strided", window=4, stride=3), active=True)
    eager = twin(model, "mst_hsa").train()
    launches = []
    forward = launch._forward
    monkeypatch.setattr(launch, "_forward", lambda *args: launches.append(1) or forward(*args))
    ids, weights = torch.randint(3, VOCAB, (2, SEQ)), torch.randn(2, SEQ, VOCAB)
    loss = (torch.compile(model, backend="aot_eager")(input_ids=ids).logits * weights).sum()
    loss.backward()
    eager_loss = (eager(input_ids=ids).logits * weights).sum()
    eager_loss.backward()
    assert not counters["graph_break"] and len(launches) == 2 * 2  # 2 layers, compiled and eager
    torch.testing.assert_close(loss, eager_loss)
    grads = dict(eager.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, msg=name)


def test_unsupported_requests_are_refused_clearly():
    with pytest.raises(NotImplementedError, match="head_split"):
        choose_kernel(HSASpec("local_strided", head_split=True), 64, 16, DEVICE, backend="triton")
    assert choose_kernel(HSASpec("local"), 64, 128, DEVICE, backend="triton") == "triton"
    with pytest.raises(NotImplementedError, match="head_dim=256"):
        choose_kernel(HSASpec("local"), 64, 256, DEVICE, backend="triton")
    assert choose_kernel(HSASpec("local"), 64, 16, DEVICE, backend="triton", dropout=0.1) == "sdpa_bool"
    with pytest.raises(NotImplementedError, match="dense"):
        at.plan_parts(HSASpec("dense"), 64)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "triton_available", lambda device: False)
        with pytest.raises(NotImplementedError, match="CUDA device"):
            choose_kernel(HSASpec("local"), 64, 16, DEVICE, backend="triton")
    if DEVICE == "cpu":  # the interpreter is a test tool: `auto` never picks it on CPU
        assert "triton" not in auto_candidates(HSASpec("local"), 256, 64, "cpu")
