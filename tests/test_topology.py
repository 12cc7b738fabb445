"""Layer allocation (Erdős–Rényi reference values from SPEC) and drop/grow."""

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from mst_hf import MSTConfig, layer_sparsities, topology
from mst_hf.topology import (
    active_count,
    drop_by_magnitude,
    erdos_renyi_densities,
    evolve,
    grow_by_gradient,
    grow_mixed,
    grow_random,
)


@pytest.fixture(scope="module")
def gpt2_124m_meta():
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(GPT2Config(vocab_size=50304))


def test_erdos_renyi_reference_values_gpt2_124m(gpt2_124m_meta):
    """SPEC section 2: c_attn 0.892, attention c_proj 0.838, c_fc / MLP c_proj 0.899, LM head 0.918 at 0.9."""
    s = layer_sparsities(gpt2_124m_meta, MSTConfig(), 0.9)
    assert len(s) == 12 * 4 + 1
    for layer in range(12):
        assert s[f"transformer.h.{layer}.attn.c_attn.weight"] == pytest.approx(0.892, abs=5e-4)
        assert s[f"transformer.h.{layer}.attn.c_proj.weight"] == pytest.approx(0.838, abs=5e-4)
        assert s[f"transformer.h.{layer}.mlp.c_fc.weight"] == pytest.approx(0.899, abs=5e-4)
        assert s[f"transformer.h.{layer}.mlp.c_proj.weight"] == pytest.approx(0.899, abs=5e-4)
    assert s["transformer.wte.weight"] == pytest.approx(0.918, abs=5e-4)  # tied LM head


def test_erdos_renyi_puts_low_sparsity_on_the_lm_head(gpt2_124m_meta):
    s = layer_sparsities(gpt2_124m_meta, MSTConfig(), 0.2)
    assert s["transformer.h.0.attn.c_proj.weight"] == 0.0  # capped dense
    assert s["transformer.wte.weight"] > 1.5 * 0.2  # the LM head, sparsest by far, carries most of it


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.9, 0.99])
def test_allocation_meets_global_sparsity(sparsity):
    shapes = [(64, 64), (64, 256), (256, 64), (64, 1000), (8, 8)]
    numels = [a * b for a, b in shapes]
    dens = erdos_renyi_densities(shapes, sparsity)
    assert all(0 < d <= 1 for d in dens)
    assert sum(d * n for d, n in zip(dens, numels)) == pytest.approx((1 - sparsity) * sum(numels))


def test_layer_sparsities_apply_the_lm_head_cap_like_the_controller(gpt2_124m_meta):
    """The public allocation caps the tied head at `lm_head_max_sparsity` and moves the rest onto the blocks, so
    it reports what MSTController will allocate (it used to ignore the cap)."""
    s = layer_sparsities(gpt2_124m_meta, MSTConfig(lm_head_max_sparsity=0.8), 0.9)
    assert s["transformer.wte.weight"] == pytest.approx(0.8, abs=1e-9)  # uncapped ER puts 0.918 there
    numels = {name: p.numel() for name, p in gpt2_124m_meta.named_parameters()}
    total = sum(numels[n] for n in s)
    assert sum(s[n] * numels[n] for n in s) / total == pytest.approx(0.9, abs=1e-6)  # global target kept
    assert s["transformer.h.0.mlp.c_fc.weight"] > 0.9  # the blocks carry what the head gave back


def test_uniform_allocation(gpt2_124m_meta):
    s = layer_sparsities(gpt2_124m_meta, MSTConfig(sparsity_distribution="uniform"), 0.75)
    assert set(round(v, 12) for v in s.values()) == {0.75}


def test_drop_removes_smallest_active_magnitudes():
    w = torch.tensor([[0.5, -0.1, 0.3], [0.05, -0.9, 0.2]])
    mask = torch.tensor([[True, True, True], [False, True, True]])
    new = drop_by_magnitude(w, mask, 2)  # 0.05 is inactive; the two smallest active are -0.1 and 0.2
    assert new.tolist() == [[True, False, True], [False, True, False]]


def test_gradient_growth_takes_largest_inactive_gradients():
    mask = torch.tensor([True, False, False, False, True])
    grad = torch.tensor([9.0, 0.1, -3.0, 2.0, 8.0])
    assert grow_by_gradient(mask, grad, 2).tolist() == [True, False, True, True, True]


def test_random_growth_is_seeded_and_only_grows_inactive():
    mask = torch.rand(50, 40, generator=torch.Generator().manual_seed(1)) > 0.7
    a = grow_random(mask, None, 300, generator=torch.Generator().manual_seed(3))
    b = grow_random(mask, None, 300, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert int((a & ~mask).sum()) == 300 and torch.equal(a & mask, mask)


def test_mixed_growth_splits_gradient_and_random():
    mask = torch.zeros(1000, dtype=torch.bool)
    grad = torch.arange(1000, dtype=torch.float32)
    new = grow_mixed(mask, grad, 100, generator=torch.Generator().manual_seed(0), gradient_fraction=0.75)
    assert int(new.sum()) == 100
    assert bool(new[925:].all())  # the 75 largest gradients


@pytest.mark.parametrize("method", ["gradient", "random", "mixed"])
@pytest.mark.parametrize("target", [150, 300, 450])
def test_evolve_hits_target_count_and_grows_only_inactive(method, target):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(30, 20, generator=g)
    mask = torch.rand(30, 20, generator=g) > 0.5
    n_active = int(mask.sum())
    new, n_drop, n_grow = evolve(mask, w, torch.randn(30, 20, generator=g), target, 0.3, method,
                                 generator=torch.Generator().manual_seed(1))
    assert int(new.sum()) == target
    assert n_drop - n_grow == n_active - target
    assert n_drop >= int(0.3 * n_active)
    # every grown position was inactive once the drop was done (never an active one "regrown")
    survivors = mask & new
    assert int((mask & ~new).sum()) <= n_drop and int(survivors.sum()) >= n_active - n_drop


def test_active_count_rounds_half_up_and_clips():
    assert active_count(10, 0.25) == 3 and active_count(10, 1.2) == 10 and active_count(10, -0.1) == 0


def test_unknown_grow_method():
    with pytest.raises(ValueError, match="Unknown grow method 'oracle'"):
        evolve(torch.ones(4, dtype=torch.bool), torch.ones(4), torch.ones(4), 2, 0.3, "oracle")


# --------------------------------------------------------------------------- block structure
def test_block_norms_and_expand_match_a_loop():
    t = torch.arange(5 * 7, dtype=torch.float32).view(5, 7) - 10
    norms = topology.block_norms(t, 3)
    expected = torch.tensor([[t[r:r + 3, c:c + 3].norm() for c in range(0, 7, 3)] for r in range(0, 5, 3)])
    assert torch.allclose(norms, expected)
    tiles = torch.tensor([[True, False, True], [False, True, False]])
    full = topology.expand_blocks(tiles, 3, (5, 7))
    assert full.shape == (5, 7) and all(bool(full[r, c]) == bool(tiles[r // 3, c // 3])
                                        for r in range(5) for c in range(7))


def test_evolve_blocks_keeps_tiles_whole_and_exact_counts():
    g = torch.Generator().manual_seed(0)
    shape = (64, 96)
    mask = topology.random_block_mask(shape, 12, 16, g)
    weight, grad = torch.randn(shape, generator=g) * mask, torch.randn(shape, generator=g)
    new, dropped, grown = topology.evolve_blocks(mask, weight, grad, 9, 0.3, "gradient", 16)
    tiles = topology.tile_mask(new, 16)
    assert int(tiles.sum()) == 9 and torch.equal(topology.expand_blocks(tiles, 16, shape), new)
    assert (dropped, grown) == (max(int(0.3 * 12), 3), max(int(0.3 * 12), 3) - 3)
    # the grown tiles are the inactive ones with the largest gradient norm (RigL on tiles)
    old_tiles = topology.tile_mask(mask, 16)
    after_drop = old_tiles & tiles
    added = tiles & ~after_drop
    scores = topology.block_norms(grad, 16).masked_fill(after_drop, float("-inf"))
    assert set(added.flatten().nonzero().flatten().tolist()) <= set(
        scores.flatten().topk(int(added.sum()) + int((old_tiles & ~tiles).sum())).indices.tolist())


def test_block_structure_with_block_one_is_the_element_rule():
    g = torch.Generator().manual_seed(1)
    mask = topology.random_mask((8, 8), 20, g)
    weight, grad = torch.randn(8, 8, generator=g) * mask, torch.randn(8, 8, generator=g)
    by_elements = topology.evolve(mask, weight, grad, 16, 0.25, "gradient")
    by_tiles = topology.evolve_blocks(mask, weight, grad, 16, 0.25, "gradient", 1)
    assert torch.equal(by_elements[0], by_tiles[0]) and by_elements[1:] == by_tiles[1:]
