"""What a training step pays per call of the "mst_hsa" attention: no spec built or validated, masks and launch plans
built once per length (also across switching the pattern off and on), no host syncs, and under ``torch.compile`` a
fixed number of graphs however often the pattern is switched."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mst_hf.attention as hsa
import mst_hf.attention.impl.common as common
import mst_hf.attention.patterns as patterns
from mst_hf import MSTConfig, MSTController

from .helpers import SEQ, VOCAB, NoKernels, build

STEPS = 10


class Calls:
    """Counts the calls of a module function (replaced in place by `spy`)."""

    def __init__(self):
        self.n = 0


def spy(monkeypatch, module, name) -> Calls:
    calls, original = Calls(), getattr(module, name)

    def counted(*args, **kwargs):
        calls.n += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def fresh_caches(monkeypatch):
    """Start from cold mask and density caches (other tests fill them with the same keys)."""
    monkeypatch.setattr(common, "_MASKS", type(common._MASKS)())
    patterns.mean_attended_keys.cache_clear()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_training_steps_build_the_spec_masks_and_density_once(kind, monkeypatch):
    fresh_caches(monkeypatch)
    model = build(kind, "sdpa").train()
    # HSA on in warm-up and restoration, off in between: on, off, on again over the 10 steps
    cfg = MSTConfig(ultra_sparsity=0.5, warmup_ratio=0.3, restoration_ratio=0.3, update_interval=100,
                    hsa_pattern="local_strided", hsa_window=4, hsa_stride=3, hsa_phases=["warmup", "restoration"])
    ctl = MSTController(model, cfg)
    specs = spy(monkeypatch, patterns, "_validate")  # every HSASpec construction validates
    masks = spy(monkeypatch, common, "layout_mask_mod")  # runs once per mask the CPU kernel builds
    densities = spy(monkeypatch, patterns, "_attended_per_query")
    ids = torch.randint(3, VOCAB, (2, SEQ))
    switches = []
    for step in range(STEPS):
        switches.append(ctl.before_forward(step, STEPS, {"input_ids": ids}))
        model(input_ids=ids, labels=ids).loss.backward()
    assert switches == [True] * 3 + [False] * 4 + [True] * 3
    assert (specs.n, masks.n, densities.n) == (0, 1, 1)




@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_triton_launch_plan_is_built_once_across_forwards_and_switches(kind, monkeypatch):
    pytest.importorskip("triton")
    import mst_hf.attention.impl.triton.launch as launch

    monkeypatch.setattr(launch, "_kernels", lambda: NoKernels)
    monkeypatch.setattr(hsa.dispatch, "triton_available", lambda device: True)
    launch.plan_parts.cache_clear()
    model = build(kind, "mst_hsa").train()
    hsa.configure_hsa(model, hsa.HSASpec("local_strided", window=4, stride=3, backend="triton"), active=True)
    ids = torch.randint(3, VOCAB, (2, SEQ))
    for step in range(STEPS):
        hsa.set_hsa_active(model, step % 3 != 1)
        model(input_ids=ids, labels=ids).loss.backward()
    assert launch.plan_parts.cache_info().misses == 1


class _Syncs(TorchDispatchMode):
    """Counts host syncs: ``.item()``, ``bool(tensor)``, ``.tolist()`` all dispatch to ``_local_scalar_dense``."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func.overloadpacket.__name__ == "_local_scalar_dense"
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_a_sparse_training_step_reads_no_value_back_to_the_host(kind):
    model = build(kind, "mst_hsa").train()
    hsa.configure_hsa(model, hsa.HSASpec("local_strided", window=4, stride=3), active=True)
    ids = torch.randint(3, VOCAB, (2, SEQ))
    model(input_ids=ids)  # first call: caches filled
    with _Syncs() as syncs:
        model(input_ids=ids, labels=ids).loss.backward()
    assert syncs.n == 0


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_compiled_model_keeps_three_graphs_however_often_hsa_is_switched(kind, monkeypatch):
    """One graph with the pattern off, one for its first call with it on (the mask cache was empty when it was
    traced), one with it on and the mask cached; switching back and forth reuses them, without a graph break."""
    from torch._dynamo.testing import CompileCounter
    from torch._dynamo.utils import counters

    fresh_caches(monkeypatch)
    torch._dynamo.reset()
    counters.clear()
    model = build(kind, "mst_hsa")
    hsa.configure_hsa(model, hsa.HSASpec("local_strided", window=4, stride=5), active=False)
    compiled, graphs = torch.compile(model, backend=(counter := CompileCounter())), []
    ids = torch.randint(3, VOCAB, (2, 16))
    for active in (False, True, True, False, True, False, True, True):
        hsa.set_hsa_active(model, active)
        compiled(input_ids=ids)
        graphs.append(counter.frame_count)
    assert graphs == [1, 2, 3, 3, 3, 3, 3, 3] and not counters["graph_break"]
