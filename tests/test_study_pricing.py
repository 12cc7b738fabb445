"""The study prices its runs with the library's count: its "tiles" convention charges the tiles the Triton kernel
visits (``triton_tile_pairs``), the same count the planner charges, for every pattern the kernel computes."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from mst_hf import MSTConfig, model_flop_shapes
from mst_hf.attention import HSASpec
from mst_hf.conventions import convention_flop_models, triton_tile_pairs
from mst_hf.plan import plan_run
from study.pricing import ConventionMeters

PATTERNS = ("local", "strided", "local_strided", "fixed")
LENGTHS = (256, 512, 1024)
SEQUENCES = 2


def flop_model(pattern: str, seq_len: int, **fields):
    cfg = MSTConfig(hsa_pattern=pattern, hsa_window=128, hsa_stride=128, hsa_block=128, **fields)
    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=seq_len, vocab_size=64))
    return model_flop_shapes(model, cfg), cfg


@pytest.mark.parametrize("seq_len", LENGTHS)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_study_charges_the_tiles_the_triton_kernel_visits(pattern, seq_len):
    fm, cfg = flop_model(pattern, seq_len)
    meters = ConventionMeters(fm)
    meters.step(SEQUENCES, seq_len, hsa_on=True)
    tiles = triton_tile_pairs(HSASpec.from_config(cfg), seq_len)  # entries per head and sequence, every layer sparse
    expected = SEQUENCES * (6 * fm.n_params * seq_len + 12 * fm.attn_dim * fm.n_layers * tiles)
    assert meters.totals()["attention_tiles"] == expected


@pytest.mark.parametrize("seq_len", LENGTHS)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_study_tiles_equal_the_planners_tiles(pattern, seq_len):
    fm, cfg = flop_model(pattern, seq_len, initial_sparsity=0.0, ultra_sparsity=0.0, final_sparsity=0.0,
                         warmup_ratio=0.0, restoration_ratio=0.0)  # every step in the ultra phase: HSA on
    steps = 3
    meters = ConventionMeters(fm)
    for _ in range(steps):
        meters.step(SEQUENCES, seq_len, hsa_on=True)
    planned = plan_run(convention_flop_models(fm)["attention_tiles"], cfg, steps, SEQUENCES * seq_len, seq_len)
    assert meters.totals()["attention_tiles"] == planned.mst_total_flops


def test_local_strided_at_1024_is_charged_61_tiles_not_87():
    # the study's own count before it used the library's charged every 64x64 tile of the token grid holding an
    # attended pair: 87 tiles (356,352 entries) where the kernel, strided part in class-major order, visits 61
    fm, cfg = flop_model("local_strided", 1024)
    meters = ConventionMeters(fm)
    meters.step(1, 1024, hsa_on=True)
    weights = 6 * fm.n_params * 1024
    attention = meters.totals()["attention_tiles"] - weights
    assert attention == 12 * fm.attn_dim * fm.n_layers * 61 * 64 * 64
