"""Backend choice: the candidates of `auto`, its measurement (once, RNG untouched, failures dropped with a
warning), its behaviour while compiling, and a CUDA end-to-end check."""

import ast
import pathlib

import pytest
import torch

import mst_hf.attention
import mst_hf.attention.dispatch as kernels
from mst_hf.attention import HSASpec
from mst_hf.attention.dispatch import auto_candidates, run_kernel
from mst_hf.attention.impl.reference import reference_attention

from .helpers import model_layout, vector_mask

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_triton_is_not_imported_at_module_level_by_the_package():
    """Only impl/triton/kernels.py (loaded on the kernel's first run) may import triton at its top level."""
    root = pathlib.Path(mst_hf.attention.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        if path.name == "kernels.py" and path.parent.name == "triton":
            continue
        for node in ast.parse(path.read_text()).body:  # module level only: imports inside functions are lazy
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""] + [f"{node.module or ''}.{a.name}" for a in node.names]
            else:
                continue
            if any(m.split(".")[0] == "triton" or m.strip(".").split(".")[-1] == "kernels" for m in modules):
                offenders.append(str(path.relative_to(root)))
    assert offenders == []


def test_triton_available_checks_that_triton_can_be_imported(monkeypatch):
    from mst_hf.attention.impl.triton import launch

    monkeypatch.setattr(launch.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(launch, "_TRITON_FOUND", {})  # not checked yet
    assert not launch.triton_available("cuda")


def test_auto_on_cpu_uses_the_boolean_mask_and_kernels_refuse_other_patterns():
    spec = HSASpec("local", window=4)
    assert auto_candidates(spec, 256, 64, "cpu") == ["sdpa_bool"]
    assert auto_candidates(HSASpec("dense"), 256, 64, "cpu") == ["sdpa_causal"]
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="does not compute"):
        run_kernel("perm_sdpa", q, q, q, spec)


def test_auto_measures_candidates_once_keeps_rng_and_drops_failing_ones(monkeypatch):
    calls = []
    real_run = kernels.run_kernel

    def counting_run(kernel, *args, **kwargs):
        calls.append(kernel)
        if kernel == "perm_sdpa":
            raise RuntimeError("out of memory")
        return real_run(kernel, *args, **kwargs)

    monkeypatch.setattr(kernels, "auto_candidates", lambda *a, **k: ["perm_sdpa", "chunk_sdpa", "sdpa_bool"])
    monkeypatch.setattr(kernels, "run_kernel", counting_run)
    q = model_layout(1, 2, 32, 16)
    spec = HSASpec("local", window=4)
    rng = torch.get_rng_state()
    with pytest.warns(UserWarning, match="dropped kernel 'perm_sdpa'.*out of memory"):
        choice = kernels.auto_kernel(q, q, q, spec)
    assert choice in ("chunk_sdpa", "sdpa_bool")
    assert torch.equal(torch.get_rng_state(), rng)
    measured = len(calls)
    assert kernels.auto_kernel(q, q, q, spec) == choice and len(calls) == measured  # cached: no new runs


def test_auto_inside_torch_compile_takes_triton_where_it_applies_and_measures_nothing(monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr(kernels, "_measure", lambda *a, **k: pytest.fail("measured while tracing"))
    q = model_layout(1, 2, 32, 16)
    spec = HSASpec("local", window=4)
    monkeypatch.setattr(kernels, "auto_candidates", lambda *a, **k: ["flex", "triton", "chunk_sdpa", "sdpa_bool"])
    assert kernels.auto_kernel(q, q, q, spec) == "triton"  # a custom op under torch.compile
    monkeypatch.setattr(kernels, "auto_candidates", lambda *a, **k: ["flex", "chunk_sdpa", "sdpa_bool"])
    assert kernels.auto_kernel(q, q, q, spec) == "flex"


@pytest.mark.gpu
@gpu
def test_cuda_auto_picks_a_candidate_and_stays_correct():
    spec = HSASpec("local", window=128)
    q, k, v = (model_layout(2, 4, 1024, 64, device="cuda", dtype=torch.bfloat16) for _ in "qkv")
    choice = kernels.auto_kernel(q, k, v, spec)
    assert choice in auto_candidates(spec, 1024, 64, "cuda")
    expected = reference_attention(q, k, v, vector_mask("local", 1024, window=128, heads=1).cuda())
    assert relative_error(kernels.hsa_attention(q, k, v, spec), expected) < 1e-2


def _mixed(seq=64, d=16, seed=0):
    """Query and key in float32, value in bfloat16: what Llama's rotary embedding hands attention under autocast."""
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(1, 2, seq, d, generator=g) for _ in range(2))
    v = torch.randn(1, 2, seq, d, generator=g).to(torch.bfloat16)
    return q, k, v


def test_mixed_dtypes_under_autocast_run_in_the_autocast_dtype_as_sdpa_does():
    spec = HSASpec(pattern="local", window=8)
    q, k, v = _mixed()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = kernels.hsa_attention(q, k, v, spec, backend="eager")
    assert out.dtype == torch.bfloat16
    want = reference_attention(q.bfloat16(), k.bfloat16(), v, vector_mask("local", 64, window=8, heads=2), None)
    assert relative_error(out, want) < 1e-2


def test_mixed_dtypes_outside_autocast_are_refused_with_the_dtypes_named():
    with pytest.raises(TypeError, match="torch.float32, torch.float32 and torch.bfloat16"):
        kernels.hsa_attention(*_mixed(), HSASpec(pattern="local", window=8), backend="sdpa")


@gpu
def test_triton_backward_with_llama_dtypes_under_cuda_autocast():
    """The H100 failure of 2026-12-08: float32 query/key with bfloat16 value reached the Triton backward, which cannot
    mix them (CompilationError in the dq kernel)."""
    spec = HSASpec(pattern="local_strided", window=128, stride=128)
    q, k, v = (t.cuda().requires_grad_() for t in _mixed(seq=1024, d=64))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = kernels.hsa_attention(q, k, v, spec, backend="triton")
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and q.grad.dtype == torch.float32 and v.grad.dtype == torch.bfloat16
    assert torch.isfinite(q.grad).all() and torch.isfinite(v.grad).all()
