"""The masks a run starts from (`MSTConfig.initial_mask`, `mst_hf.initial_masks`): random for fresh weights (bit for
bit the seeded masks of earlier versions), by magnitude for loaded ones, the saved masks for a model saved with
them."""

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainingArguments

from mst_hf import MSTConfig, MSTController, MSTTrainer, topology

from .helpers import tiny_gpt2, toy_dataset


def _cfg(sparsity=0.5, **kw):
    return MSTConfig(initial_sparsity=sparsity, ultra_sparsity=sparsity, final_sparsity=sparsity, warmup_ratio=0.0,
                     restoration_ratio=0.0, hsa_pattern="dense", **kw)


def _nonzero_share(ctl) -> float:
    params = [t.param for t in ctl.targets.values()]
    return sum(int(torch.count_nonzero(p)) for p in params) / sum(p.numel() for p in params)


def test_fresh_model_gets_the_seeded_random_masks_of_earlier_versions():
    """`from_config` weights: random masks drawn exactly as before `initial_mask` existed (generator of
    (seed, step -1, layer), `topology.random_mask` at the allocated count)."""
    ctl = MSTController(tiny_gpt2(), _cfg(seed=3))
    expected = {}
    for i, (name, density) in enumerate(ctl.target_densities(0.5).items()):
        param = ctl.targets[name].param
        generator = ctl._generator(-1, i, param.device)
        expected[name] = topology.random_mask(tuple(param.shape), topology.active_count(param.numel(), density),
                                              generator, param.device)
    assert all(torch.equal(ctl.masks.masks[n], m) for n, m in expected.items())


def test_dense_pretrained_model_is_pruned_by_magnitude(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    ctl = MSTController(model, _cfg())
    for name, mask in ctl.masks.masks.items():
        magnitude = weights[name].abs()
        assert magnitude[mask].min() >= magnitude[~mask].max(), name  # the pruned weights are the smallest |w|


def test_explicit_rules_override_auto(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path)
    loaded = MSTController(AutoModelForCausalLM.from_pretrained(tmp_path), _cfg(initial_mask="random"))
    fresh = MSTController(tiny_gpt2(), _cfg())
    assert all(torch.equal(loaded.masks.masks[n], m) for n, m in fresh.masks.masks.items())  # seeded: same masks
    model = tiny_gpt2()
    weights = {n: p.detach().abs().clone() for n, p in model.named_parameters()}
    by_magnitude = MSTController(model, _cfg(initial_mask="magnitude"))
    assert all(weights[n][m].min() >= weights[n][~m].max() for n, m in by_magnitude.masks.masks.items())
    with pytest.raises(ValueError, match="`initial_mask` must be one of.*'biggest'"):
        _cfg(initial_mask="biggest")


def test_weights_already_pruned_keep_their_zeros():
    """Weights loaded another way (no `from_pretrained` mark) that already hold the allocated share of zeros keep
    exactly their non-zeros."""
    model = tiny_gpt2()
    keep = MSTController(tiny_gpt2(), _cfg(seed=7)).masks.masks  # other masks (seed 7) at the same allocation
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in keep:
                param[~keep[name]] = 0.0
    ctl = MSTController(model, _cfg())
    assert all(torch.equal(ctl.masks.masks[n], m) for n, m in keep.items())


def test_model_saved_with_masks_starts_from_them_unchanged(tmp_path):
    """The example's continue path: a model saved by MSTTrainer (here at 50% sparsity, a new run asking 80%) is loaded
    with from_pretrained; the new run starts from its saved masks, so the weights, their non-zero share and the
    loss at step 0 are unchanged (the topology update of step 0 then moves the sparsity to the schedule's)."""
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=6, per_device_train_batch_size=8,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    first = MSTTrainer(tiny_gpt2(), args, mst_config=_cfg(update_interval=2), train_dataset=toy_dataset())
    first.train()
    first.save_model(str(tmp_path / "saved"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = {k: torch.stack([r[k] for r in toy_dataset(8, seed=1)]) for k in ("input_ids", "labels")}
    with torch.no_grad():
        loss = model(**batch).loss
    ctl = MSTController(model, _cfg(0.8))
    with torch.no_grad():
        loss_after = model(**batch).loss
    assert all(torch.equal(ctl.masks.masks[n], m) for n, m in first.mst.masks.masks.items())
    assert _nonzero_share(ctl) == pytest.approx(0.5, abs=0.01)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()) and loss_after == loss
