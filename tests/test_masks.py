"""MaskState and the controller hooks in a hand-written loop: zeros stay zeros, moments are masked."""

import pytest
import torch

from mst_hf import MaskState, MSTConfig, MSTController
from mst_hf.masks import pack_mask, unpack_mask

from .helpers import tiny_gpt2, toy_dataset


def _batch(n=8):
    rows = torch.stack([d["input_ids"] for d in toy_dataset(n)])
    return {"input_ids": rows, "labels": rows}


def test_pack_round_trip_odd_length():
    mask = torch.rand(7, 13, generator=torch.Generator().manual_seed(0)) > 0.5
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (7 * 13 + 7) // 8
    assert torch.equal(unpack_mask(packed, (7, 13)), mask)


def test_load_refuses_wrong_shape_and_names():
    p = torch.nn.Parameter(torch.ones(4, 4))
    state = MaskState({"w": p})
    good = state.state_dict()
    bad_shape = dict(good)
    bad_shape["w.__shape__"] = torch.tensor([2, 8])
    with pytest.raises(ValueError, match="shape"):
        state.load_state_dict(bad_shape)
    with pytest.raises(ValueError, match="does not match the model"):
        state.load_state_dict({"other": good["w"], "other.__shape__": good["w.__shape__"]})


def test_pruned_weights_stay_exactly_zero_through_adamw_with_weight_decay():
    model = tiny_gpt2()
    cfg = MSTConfig(initial_sparsity=0.7, ultra_sparsity=0.7, final_sparsity=0.7, warmup_ratio=0.0,
                    restoration_ratio=0.0, update_interval=3, hsa_pattern="dense")
    ctl = MSTController(model, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.5)
    batch, total = _batch(), 10
    for step in range(total):
        model(**batch).loss.backward()
        ctl.after_backward(step, total, opt)
        for name, t in ctl.targets.items():  # gradients of pruned weights are zero before the step
            assert not t.param.grad[~ctl.masks.masks[name]].any()
        opt.step()
        opt.zero_grad()
        ctl.after_optimizer_step()
        for name, t in ctl.targets.items():
            pruned = t.param.detach()[~ctl.masks.masks[name]]
            assert pruned.numel() > 0 and bool((pruned == 0).all())
            assert not torch.signbit(pruned).any()  # +0.0, not -0.0


def test_topology_update_zeroes_adam_moments_of_changed_positions():
    model = tiny_gpt2()
    cfg = MSTConfig(initial_sparsity=0.5, ultra_sparsity=0.5, final_sparsity=0.5, warmup_ratio=0.0,
                    restoration_ratio=0.0, update_interval=2, drop_fraction=0.5, drop_fraction_schedule="constant",
                    hsa_pattern="dense")
    ctl = MSTController(model, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = _batch()
    for step in range(2):  # step 0 is an update; step 1 fills the moments of the active weights
        model(**batch).loss.backward()
        ctl.after_backward(step, 10, opt)
        opt.step()
        opt.zero_grad()
        ctl.after_optimizer_step()
    before = {n: m.clone() for n, m in ctl.masks.masks.items()}
    model(**batch).loss.backward()
    record = ctl.after_backward(2, 10, opt)
    assert record is not None and record["net_added"] > 0
    for name, t in ctl.targets.items():
        changed = before[name] ^ ctl.masks.masks[name]
        state = opt.state[t.param]
        assert changed.any()
        assert not state["exp_avg"][changed].any() and not state["exp_avg_sq"][changed].any()
        kept = before[name] & ctl.masks.masks[name]
        assert state["exp_avg_sq"][kept].any()  # untouched elsewhere
        added = ctl.masks.masks[name] & ~before[name]
        assert not t.param.detach()[added].any()  # grown weights start at zero


def test_controller_refuses_model_without_targets():
    model = tiny_gpt2()
    with pytest.raises(ValueError, match="no weight matrix to sparsify.*target_modules"):
        MSTController(model, MSTConfig(target_modules=["no_such_module"], sparsify_lm_head=False))


def test_initial_masks_are_seeded_and_reach_initial_sparsity():
    cfg = MSTConfig(initial_sparsity=0.6, hsa_pattern="dense")
    a, b, c = MSTController(tiny_gpt2(), cfg), MSTController(tiny_gpt2(), cfg), MSTController(
        tiny_gpt2(), MSTConfig(initial_sparsity=0.6, seed=1, hsa_pattern="dense"))
    assert a.masks.digest() == b.masks.digest() != c.masks.digest()
    assert a.masks.sparsity() == pytest.approx(0.6, abs=1e-3)


def test_non_finite_values_at_pruned_positions_become_zero_and_active_ones_stay():
    param = torch.nn.Parameter(torch.ones(2, 3))
    mask = torch.tensor([[True, False, True], [False, True, False]])
    state = MaskState({"w": param}, {"w": mask})
    param.grad = torch.tensor([[1.0, float("nan"), float("inf")], [float("-inf"), float("nan"), 2.0]])
    state.apply_to_grads()
    assert torch.equal(param.grad[~mask], torch.zeros(3))
    assert param.grad[0, 0] == 1.0 and param.grad[0, 2] == float("inf") and torch.isnan(param.grad[1, 1])
    param.data[0, 1] = float("nan")
    state.apply_to_weights()
    assert torch.equal(param.data[~mask], torch.zeros(3)) and not torch.signbit(param.data[~mask]).any()
    assert not state.grads_finite()
