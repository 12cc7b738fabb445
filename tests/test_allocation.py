"""`mst_hf.allocation`: the one split of a global sparsity over the targeted matrices. Every place that needs
per-layer densities (controller, `layer_sparsities`, planner, head report, time prediction) gets the same numbers,
with the LM-head cap, for a tied and an untied head; the FLOP model and `find_targets` describe the same matrices
with the same record."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from mst_hf import MSTConfig, MSTController, allocation, find_targets, layer_sparsities  # noqa: E402
from mst_hf.allocation import Matmul, counted_sparsity, distinct_targets, layer_densities  # noqa: E402
from mst_hf.conventions import lm_head_sparsity  # noqa: E402
from mst_hf.flops import model_flop_shapes  # noqa: E402
from mst_hf.plan import plan_run  # noqa: E402
from mst_hf.predict import predict_times  # noqa: E402
from mst_hf.targets import TargetWeight  # noqa: E402
from mst_hf.topology import active_count, allocate  # noqa: E402

from .helpers import tiny_gpt2  # noqa: E402

SPARSITY = 0.8
CAP = 0.5  # binding: Erdős–Rényi alone gives the 64 x 32 head about 0.86 at a global 0.8


def config(**kw):
    """A constant-sparsity run (every topology update at SPARSITY) with the head capped at CAP."""
    fields = dict(initial_sparsity=SPARSITY, ultra_sparsity=SPARSITY, final_sparsity=SPARSITY, warmup_ratio=0.0,
                  restoration_ratio=0.0, update_interval=5, hsa_pattern="dense", lm_head_max_sparsity=CAP)
    return MSTConfig(**{**fields, **kw})


@pytest.fixture(params=["tied", "untied"])
def run(request):
    """A tiny GPT-2 (its LM head tied to the token embedding, or not) and its controller at SPARSITY."""
    model = tiny_gpt2(tie_word_embeddings=request.param == "tied")
    cfg = config()
    return model, cfg, MSTController(model, cfg)


def head_name(ctl) -> str:
    return next(n for n, t in ctl.targets.items() if t.is_lm_head)


def test_the_cap_binds_in_these_models(run):
    model, cfg, ctl = run
    uncapped = MSTController(model, config(lm_head_max_sparsity=None)).target_densities(SPARSITY)
    assert 1 - uncapped[head_name(ctl)] > CAP + 0.2 and ctl.target_densities(SPARSITY)[head_name(ctl)] == 1 - CAP


def test_layer_sparsities_is_what_the_controller_allocates(run):
    model, cfg, ctl = run
    assert layer_sparsities(model, cfg, SPARSITY) == {n: 1 - d for n, d in ctl.target_densities(SPARSITY).items()}


def test_the_plan_counts_the_masks_the_controller_sets(run):
    model, cfg, ctl = run  # the controller set its initial masks at SPARSITY
    plan = plan_run(model, cfg, 10, 64, 16)
    assert plan.arrays["sparsity"][0] == pytest.approx(ctl.masks.sparsity(), abs=1e-12)


def test_the_head_report_is_the_head_mask_the_controller_sets(run):
    model, cfg, ctl = run
    report = lm_head_sparsity(model_flop_shapes(model, cfg), cfg, SPARSITY)
    head = head_name(ctl)
    others = [n for n in ctl.targets if n != head]
    other_active = sum(ctl.masks.active(n) for n in others)
    other_total = sum(ctl.targets[n].numel for n in others)
    assert (report["lm_head"], report["other_targets"]) == pytest.approx(
        (1 - ctl.masks.density(head), 1 - other_active / other_total), abs=1e-12)


def _densities_used(monkeypatch, call) -> list[tuple[float, dict]]:
    """``(sparsity, densities)`` of every allocation ``call()`` asks for."""
    seen = []

    def spy(matmuls, mst_config, sparsity):
        seen.append((sparsity, layer_densities(matmuls, mst_config, sparsity)))
        return seen[-1][1]

    monkeypatch.setattr(allocation, "layer_densities", spy)
    call()
    monkeypatch.undo()
    return seen


def test_the_plan_uses_the_controllers_densities(run, monkeypatch):
    model, cfg, ctl = run
    seen = _densities_used(monkeypatch, lambda: plan_run(model, cfg, 10, 64, 16))
    assert seen and all(densities == ctl.target_densities(s) for s, densities in seen)


def test_the_time_prediction_uses_the_controllers_densities(run, monkeypatch):
    model, cfg, ctl = run
    block_cfg = config(sparsity_structure="block", block_size=16, weight_kernels="block")  # kernels on: densities read
    plan = plan_run(model, block_cfg, 10, 64, 16)
    seen = _densities_used(monkeypatch, lambda: predict_times(plan, block_cfg, "no such GPU"))
    assert seen and all(densities == ctl.target_densities(s) for s, densities in seen)


def test_the_flop_model_and_find_targets_share_one_record(run):
    model, cfg, _ = run
    fm_targets = [Matmul(m.name, m.module_name, m.n_in, m.n_out, True, m.is_lm_head, m.tied)
                  for m in distinct_targets(model_flop_shapes(model, cfg).matmuls)]
    found = [Matmul(t.name, t.module_name, t.n_in, t.n_out, t.is_target, t.is_lm_head, t.tied)
             for t in find_targets(model, cfg).values()]
    assert found == fm_targets and all(isinstance(t, Matmul) for t in find_targets(model, cfg).values())


def test_a_tied_head_is_flagged_tied_in_the_flop_model():
    tied = model_flop_shapes(tiny_gpt2(), config())
    untied = model_flop_shapes(tiny_gpt2(tie_word_embeddings=False), config())
    assert [m.tied for m in tied.matmuls if m.is_lm_head] == [True]
    assert [m.tied for m in untied.matmuls if m.is_lm_head] == [False]


# --------------------------------------------------------------------------- the function on records

RECORDS = [Matmul("a", "a", 64, 192, True), Matmul("b", "b", 64, 64, True), Matmul("dense", "d", 64, 64, False),
           Matmul("a", "a2", 64, 192, True), Matmul("head", "h", 64, 128, True, is_lm_head=True)]


def test_untargeted_and_repeated_records_are_left_out():
    densities = layer_densities(RECORDS, config(lm_head_max_sparsity=None), 0.9)
    expected = allocate([(64, 192), (64, 64), (64, 128)], 0.9, "erdos_renyi")
    assert densities == dict(zip(["a", "b", "head"], expected))


def test_the_cap_applies_to_the_head_only():
    densities = layer_densities(RECORDS, config(lm_head_max_sparsity=0.8), 0.9)
    expected = allocate([(64, 192), (64, 64), (64, 128)], 0.9, "erdos_renyi", [None, None, 0.8])
    assert densities == dict(zip(["a", "b", "head"], expected)) and densities["head"] == pytest.approx(0.2)


def test_the_configured_distribution_is_used():
    densities = layer_densities(RECORDS, config(lm_head_max_sparsity=None, sparsity_distribution="uniform"), 0.9)
    assert densities == pytest.approx({"a": 0.1, "b": 0.1, "head": 0.1})


def test_target_weights_are_records_too():
    model = tiny_gpt2()
    targets = find_targets(model, config())
    assert all(isinstance(t, TargetWeight) for t in targets.values())
    assert layer_densities(targets.values(), config(), 0.5) == layer_densities(
        model_flop_shapes(model, config()).matmuls, config(), 0.5)


def test_counted_sparsity_counts_rounded_active_entries():
    densities = {"a": 0.1, "b": 0.1, "head": 0.1}
    active = active_count(64 * 192, 0.1) + active_count(64 * 64, 0.1) + active_count(64 * 128, 0.1)
    assert counted_sparsity(RECORDS, densities) == 1 - active / (64 * 192 + 64 * 64 + 64 * 128)


@pytest.mark.parametrize("bad", [1.0, -0.1, "0.5", True, None])
def test_a_sparsity_outside_zero_one_is_refused(bad):
    with pytest.raises(ValueError, match="`sparsity` must be a number in \\[0, 1\\)"):
        layer_densities(RECORDS, config(), bad)


def test_an_infeasible_cap_is_refused():
    with pytest.raises(ValueError, match="lm_head_max_sparsity"):
        layer_densities(RECORDS, config(lm_head_max_sparsity=0.1), 0.95)
