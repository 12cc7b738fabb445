"""Block-sparse linear kernels (mst_hf.kernels) against the dense masked reference.

Without CUDA the real Triton kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1 before triton
is imported), so CPU shapes are small (64-256 features, blocks of 16 and 32). The interpreter has no bfloat16
matmul, and torch.compile cannot trace interpreted kernels (wrap_triton hands them back unwrapped), so bfloat16,
realistic shapes and torch.compile run on the GPU (marked gpu)."""

import os
import warnings

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

pytest.importorskip("triton")

from mst_hf.kernels import (  # noqa: E402
    BlockLayout,
    block_mask_from_weight,
    block_sparse_layout,
    block_sparse_linear,
    build_index,
    choose_kernel,
    disable_block_sparse,
    enable_block_sparse,
    expand_block_mask,
    reference_grads,
    reference_linear,
    set_kernels,
)
from mst_hf.kernels.triton import launch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1", reason="needs CUDA or TRITON_INTERPRET=1"
)
TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


@pytest.fixture(autouse=True)
def _triton_kernels_on_cpu(monkeypatch):
    """These tests are about the Triton kernels: on CPU, run them in the interpreter rather than the plain-torch
    CPU implementation that CPU tensors get by default (tested in test_cpu_ops.py)."""
    from mst_hf.kernels import ops

    monkeypatch.setattr(ops, "CPU_KERNELS", "triton")


def random_block_mask(rows, cols, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(rows, cols, generator=g) < density


def make_case(n_in, n_out, block, conv1d, dtype, density=0.5, lead=(2, 9), bias=True, seed=0, empty_row=None):
    """A weight zero outside a random block mask (given in the weight's storage orientation), x and bias."""
    torch.manual_seed(seed)
    blocks = random_block_mask(n_out // block, n_in // block, density, seed)  # (out/b, in/b)
    if empty_row is not None:
        blocks[empty_row] = False
    w = torch.randn(n_out, n_in) / n_in**0.5
    mask = blocks
    if conv1d:
        w, mask = w.t().contiguous(), blocks.t()
    w = (w * expand_block_mask(mask, block)).to(DEVICE, dtype).requires_grad_(True)
    b = (torch.randn(n_out) * 0.1).to(DEVICE, dtype).requires_grad_(True) if bias else None
    x = torch.randn(*lead, n_in).to(DEVICE, dtype).requires_grad_(True)
    return x, w, b, mask


def check(x, w, b, mask, block, conv1d, dtype):
    layout = BlockLayout(mask.t() if conv1d else mask, block)
    y = block_sparse_linear(x, w, b, layout, conv1d)
    want = reference_linear(x.double(), w.double(), None if b is None else b.double(), mask.to(DEVICE), block, conv1d)
    tol = TOL[dtype]
    assert y.dtype == dtype and y.shape == want.shape
    torch.testing.assert_close(y.double(), want, atol=tol, rtol=tol, msg="forward")
    g = torch.randn_like(y)
    inputs = (x, w) if b is None else (x, w, b)
    got = torch.autograd.grad(y, inputs, g)
    ref = reference_grads(x, w, b, mask.to(DEVICE), block, g, conv1d)
    for name, gg, rr in zip(("dX", "dW", "db"), got, ref):
        torch.testing.assert_close(gg.double(), rr, atol=tol * 4, rtol=tol * 4, msg=name)


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_matches_reference(conv1d, dtype):
    x, w, b, mask = make_case(96, 128, 32, conv1d, dtype, empty_row=1)
    check(x, w, b, mask, 32, conv1d, dtype)


def test_custom_op_path_matches_eager_function(monkeypatch):
    """Eager calls use a plain autograd.Function; the custom ops (what torch.compile traces) give the same."""
    from mst_hf.kernels import ops

    x, w, b, mask = make_case(64, 96, 32, True, torch.float32, lead=(7,))
    layout = BlockLayout(mask.t(), 32)
    results = []
    for path in ("function", "op"):
        monkeypatch.setattr(ops, "EAGER_PATH", path)
        y = block_sparse_linear(x, w, b, layout, conv1d=True)
        results.append((y, *torch.autograd.grad(y.square().sum(), (x, w, b))))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("lead", [(5,), (1, 3, 7), ()], ids=["2d", "4d", "1d"])
def test_leading_shapes_block16_no_bias(lead):
    x, w, b, mask = make_case(64, 48, 16, False, torch.float32, lead=lead, bias=False, seed=1)
    check(x, w, b, mask, 16, False, torch.float32)


def test_empty_block_row_gives_bias_only_and_zero_grads():
    """A block-row with no active block: its outputs are the bias alone, its dW rows zero, and dX gets nothing."""
    x, w, b, mask = make_case(64, 64, 32, False, torch.float32, density=1.0)
    mask[0] = False
    with torch.no_grad():
        w.mul_(expand_block_mask(mask, 32).to(DEVICE))
    layout = BlockLayout(mask, 32)
    y = block_sparse_linear(x, w, b, layout)
    torch.testing.assert_close(y[..., :32], b[:32].detach().expand_as(y[..., :32]))
    gy = torch.zeros_like(y)
    gy[..., :32] = 1.0  # gradient only through the empty block-row
    dx, dw = torch.autograd.grad(y, (x, w), gy)
    assert dx.abs().max().item() == 0.0 and dw.abs().max().item() == 0.0


def test_all_blocks_inactive():
    x, w, b, mask = make_case(64, 64, 32, True, torch.float32, density=0.0)
    y = block_sparse_linear(x, w, b, BlockLayout(mask.t(), 32), conv1d=True)
    torch.testing.assert_close(y, b.detach().expand_as(y))
    dw = torch.autograd.grad(y.sum(), w)[0]
    assert dw.abs().max().item() == 0.0


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_dw_token_split_matches_unsplit(conv1d):
    """The split-token dW (float32 partials, then a reduction) equals the one-chunk dW and the reference."""
    block = 16
    x, w, _, mask = make_case(64, 32, block, conv1d, torch.float32, lead=(100,), bias=False, density=0.6)
    layout = BlockLayout(mask.t() if conv1d else mask, block)
    index = layout.index(DEVICE)
    g = torch.randn(100, 32, device=DEVICE)
    with launch.direct_launches():
        one = launch.grad_weight(g, x.detach(), w.detach(), index, block, conv1d, split=1)
        three = launch.grad_weight(g, x.detach(), w.detach(), index, block, conv1d, split=3)
    want = reference_grads(x, w, None, mask.to(DEVICE), block, g, conv1d)[1]
    torch.testing.assert_close(three.double(), want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(one, three, atol=1e-5, rtol=1e-5)


def test_dw_splits_rule():
    assert launch.dw_splits(nnz=10, tokens=16384, bm=64, sms=132) == 27  # two waves of 132 programs
    assert launch.dw_splits(nnz=1000, tokens=16384, bm=64, sms=132) == 1
    assert launch.dw_splits(nnz=1, tokens=1000, bm=64, sms=132) == 1  # chunks of fewer than 8 steps do not pay


def test_index_by_hand():
    mask = torch.tensor([[1, 0, 1], [0, 0, 0], [0, 1, 1]], dtype=torch.bool)
    idx = build_index(mask).tolist()
    row_ptr, col_idx = [0, 2, 2, 4], [0, 2, 1, 2]
    col_ptr, row_idx = [0, 1, 2, 4], [0, 2, 0, 2]
    blk_row = [0, 0, 2, 2]
    assert idx == row_ptr + col_idx + col_ptr + row_idx + blk_row


def test_layout_index_cached_per_version():
    layout = BlockLayout(torch.eye(2, dtype=torch.bool), 32)
    first = layout.index("cpu")
    assert layout.index("cpu") is first
    layout.update(torch.ones(2, 2, dtype=torch.bool))
    second = layout.index("cpu")
    assert second is not first and layout.version == 2 and layout.nnz == 4


def test_block_mask_from_element_mask_both_layouts():
    elem = torch.zeros(64, 32, dtype=torch.bool)  # Linear (out=64, in=32)
    elem[40, 3] = True
    assert block_mask_from_weight(elem, 16).nonzero().tolist() == [[2, 0]]
    assert block_mask_from_weight(elem.t(), 16, conv1d=True).nonzero().tolist() == [[2, 0]]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(block=24), "block_size"),
        (dict(block=True), "block_size"),
        (dict(n_in=80), "n_in=80"),
        (dict(n_out=40), "n_out=40"),
    ],
)
def test_refusals(kwargs, match):
    block, n_in, n_out = kwargs.get("block", 32), kwargs.get("n_in", 64), kwargs.get("n_out", 64)
    with pytest.raises(ValueError, match=match):
        enable_block_sparse(nn.Linear(n_in, n_out), torch.ones(n_out, n_in, dtype=torch.bool), block)


def test_refusals_of_inputs():
    x, w, b, mask = make_case(64, 64, 32, False, torch.float32)
    layout = BlockLayout(mask, 32)
    with pytest.raises(ValueError, match="n_in=64"):
        block_sparse_linear(x[..., :32], w, b, layout)
    with pytest.raises(ValueError, match="Conv1D"):
        block_sparse_linear(x, w[:, :32], b, layout, conv1d=True)
    with pytest.raises(TypeError, match="float16"):
        block_sparse_linear(x, w.half(), b, layout)
    with pytest.raises(ValueError, match="block mask of shape"):
        enable_block_sparse(nn.Linear(64, 64), torch.ones(3, 3), 32)
    with pytest.raises(TypeError, match="Embedding"):
        enable_block_sparse(nn.Embedding(4, 64), torch.ones(1, 2), 32)


@pytest.mark.parametrize("cls", [nn.Linear, Conv1D], ids=["linear", "conv1d"])
def test_enable_disable_keeps_state_dict_and_matches_dense(cls):
    torch.manual_seed(0)
    module = (nn.Linear(64, 96) if cls is nn.Linear else Conv1D(96, 64)).to(DEVICE)
    elem = expand_block_mask(random_block_mask(*module.weight.shape, 0.5)[: module.weight.shape[0] // 32,
                                                                          : module.weight.shape[1] // 32], 32)
    with torch.no_grad():
        module.weight.mul_(elem.to(DEVICE))
    keys = list(module.state_dict())
    x = torch.randn(3, 64, device=DEVICE)
    dense = module(x)
    layout = enable_block_sparse(module, elem, 32)
    assert block_sparse_layout(module) is layout and list(module.state_dict()) == keys
    torch.testing.assert_close(module(x), dense, atol=1e-4, rtol=1e-4)
    enable_block_sparse(module, torch.zeros_like(elem), 32)  # topology update: same layout, new version
    assert layout.version == 2 and layout.nnz == 0
    torch.testing.assert_close(module(x), module.bias.detach().expand(3, 96))
    disable_block_sparse(module)
    assert block_sparse_layout(module) is None and "forward" not in module.__dict__
    torch.testing.assert_close(module(x), dense)


def test_autocast_casts_like_linear():
    """Under autocast the kernel computes in the autocast dtype and the float32 weight gets a float32 grad."""
    x, w, b, mask = make_case(64, 64, 32, False, torch.float32, lead=(8,))
    layout = BlockLayout(mask, 32)
    with torch.autocast(DEVICE, dtype=torch.float16):
        ref = torch.nn.functional.linear(x, w, b)
        y = block_sparse_linear(x, w, b, layout)
    assert y.dtype == ref.dtype == torch.float16
    torch.testing.assert_close(y, ref, atol=2e-2, rtol=2e-2)
    (gw,) = torch.autograd.grad(y.float().sum(), (w,))
    assert gw.dtype == torch.float32


def test_choose_kernel_table(tmp_path):
    table = {
        "devices": {
            "NVIDIA H200": {
                "tokens": 16384,
                "break_even": [{"n_in": 2048, "n_out": 2048, "block_size": 128, "break_even_density": 0.4}],
            }
        }
    }
    path = tmp_path / "t.json"
    path.write_text(__import__("json").dumps(table))
    args = dict(n_in=2048, n_out=2048, tokens=16384, block_size=128, path=str(path))
    assert choose_kernel(density=0.1, device_name="NVIDIA  h200", **args) == "block"
    assert choose_kernel(density=0.5, device_name="NVIDIA H200", **args) == "dense"
    assert choose_kernel(density=0.1, device_name="NVIDIA A100", **args) == "dense"  # no table for this GPU
    assert choose_kernel(density=0.1, device_name="NVIDIA H200", **{**args, "tokens": 1024}) == "dense"
    assert choose_kernel(density=0.1, device_name="NVIDIA H200", **{**args, "block_size": 64}) == "dense"
    assert choose_kernel(density=0.1, device_name="NVIDIA H200", **{**args, "n_in": 768 // 4}) == "dense"


def test_set_kernels_follows_table_and_dense_flag(tmp_path, monkeypatch):
    from mst_hf.kernels import dispatch

    monkeypatch.setattr(dispatch, "block_kernel_runs", lambda device: True)  # as on a CUDA GPU with triton
    table = {"devices": {"cpu": {"tokens": 64, "break_even": [
        {"n_in": 64, "n_out": 64, "block_size": 32, "break_even_density": 0.6}]}}}
    path = tmp_path / "t.json"
    path.write_text(__import__("json").dumps(table))
    sparse, full = nn.Linear(64, 64), nn.Linear(64, 64)
    half = torch.zeros(64, 64, dtype=torch.bool)
    half[:32] = True  # two of four blocks: density 0.5 < 0.6
    masks = {"sparse": half, "full": torch.ones(64, 64, dtype=torch.bool)}
    modules = {"sparse": sparse, "full": full}
    choices = set_kernels(modules, masks, 32, tokens=64, device_name="cpu", path=str(path))
    assert choices == {"sparse": "block", "full": "dense"}
    assert block_sparse_layout(sparse).nnz == 2 and block_sparse_layout(full) is None
    update_step = set_kernels(modules, masks, 32, tokens=64, dense=True, path=str(path))
    assert update_step == {"sparse": "dense", "full": "dense"}
    assert block_sparse_layout(sparse) is None


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.gpu
@pytest.mark.parametrize("block", [32, 64, 128])
@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_gpu_bf16_realistic(block, conv1d):
    """bf16 at a realistic shape (4096 tokens, 1024 -> 4096 features, 10% density) against the float64 oracle."""
    x, w, b, mask = make_case(1024, 4096, block, conv1d, torch.bfloat16, density=0.1, lead=(2, 2048), seed=3)
    layout = BlockLayout(mask.t() if conv1d else mask, block)
    y = block_sparse_linear(x, w, b, layout, conv1d)
    assert rel_err(y, reference_linear(x.double(), w.double(), b.double(), mask.cuda(), block, conv1d)) < 1e-2
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, w, b), g)
    for name, gg, rr in zip(("dX", "dW", "db"), got, reference_grads(x, w, b, mask.cuda(), block, g, conv1d)):
        assert rel_err(gg, rr) < 1e-2, name


@pytest.mark.gpu
def test_gpu_autocast_bf16_module():
    torch.manual_seed(0)
    module = nn.Linear(512, 1024).cuda()
    blocks = random_block_mask(1024 // 64, 512 // 64, 0.25)
    with torch.no_grad():
        module.weight.mul_(expand_block_mask(blocks, 64).cuda())
    x = torch.randn(4, 256, 512, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        dense = module(x)
        enable_block_sparse(module, blocks, 64)
        y = module(x)
    assert y.dtype == torch.bfloat16 and rel_err(y, dense) < 1e-2
    y.float().sum().backward()
    assert module.weight.grad.dtype == torch.float32
    inactive = ~expand_block_mask(blocks, 64).cuda()
    assert module.weight.grad[inactive].abs().max().item() == 0.0


@pytest.mark.gpu
@pytest.mark.parametrize("cls", [nn.Linear, Conv1D], ids=["linear", "conv1d"])
def test_gpu_torch_compile_inductor(cls):
    """A compiled module on the block kernel (fullgraph, inductor) matches eager, gradients included."""
    torch.manual_seed(0)
    module = (nn.Linear(1024, 2048) if cls is nn.Linear else Conv1D(2048, 1024)).cuda().bfloat16()
    blocks = random_block_mask(module.weight.shape[0] // 128, module.weight.shape[1] // 128, 0.2)
    elem = expand_block_mask(blocks, 128).cuda()
    with torch.no_grad():
        module.weight.mul_(elem)
    enable_block_sparse(module, elem, 128)
    x = torch.randn(2, 512, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    eager = module(x)
    ge = torch.autograd.grad(eager.float().square().sum(), (x, module.weight))
    compiled = torch.compile(module, fullgraph=True)
    y = compiled(x)
    gc = torch.autograd.grad(y.float().square().sum(), (x, module.weight))
    assert rel_err(y, eager) < 1e-3
    for a, b in zip(gc, ge):
        assert rel_err(a, b) < 1e-3


@pytest.mark.gpu
def test_gpu_torch_compile_under_autocast():
    """fp32 master weights, bf16 autocast, compiled with fullgraph: matches eager and gives fp32 weight grads."""
    torch.manual_seed(0)
    module = nn.Linear(1024, 1024).cuda()
    blocks = random_block_mask(8, 8, 0.25)
    with torch.no_grad():
        module.weight.mul_(expand_block_mask(blocks, 128).cuda())
    enable_block_sparse(module, blocks, 128)
    x = torch.randn(4, 256, 1024, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager = module(x)
        y = torch.compile(module, fullgraph=True)(x)
    assert y.dtype == torch.bfloat16 and rel_err(y, eager) < 1e-3
    (gw,) = torch.autograd.grad(y.float().sum(), (module.weight,))
    assert gw.dtype == torch.float32


def test_set_kernels_warns_once_for_a_gpu_without_table_and_honours_env_table(tmp_path, monkeypatch):
    from mst_hf.kernels import dispatch

    table = {"devices": {"Test GPU A": {"tokens": 64, "break_even": [
        {"n_in": 64, "n_out": 64, "block_size": 32, "break_even_density": 0.6}]}}}
    path = tmp_path / "t.json"
    path.write_text(__import__("json").dumps(table))
    half = torch.zeros(64, 64, dtype=torch.bool)
    half[:32] = True
    modules, masks = {"a": nn.Linear(64, 64)}, {"a": half}
    monkeypatch.setattr(dispatch, "block_kernel_runs", lambda device: True)  # as on a CUDA GPU with triton
    dispatch._warn_no_table.cache_clear()
    with pytest.warns(UserWarning, match="no measurements for GPU 'Test GPU B'.*MST_KERNEL_TABLE"):
        assert set_kernels(modules, masks, 32, tokens=64, device_name="Test GPU B", path=str(path)) == {"a": "dense"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call for the same GPU stays quiet
        set_kernels(modules, masks, 32, tokens=64, device_name="Test GPU B", path=str(path))
    monkeypatch.setenv("MST_KERNEL_TABLE", str(path))  # no `path`: the environment names the table
    assert set_kernels(modules, masks, 32, tokens=64, device_name="Test GPU A") == {"a": "block"}
