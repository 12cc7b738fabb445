"""What the controller logs about hybrid sparse attention: ``mst/hsa`` is 1 only while the pattern is on and
drops pairs at the batch's length, and ``mst/hsa_density`` is the exact density there (1.0 when off)."""

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

import mst_hf.attention.interface as interface
from mst_hf import MSTConfig, MSTController

T = 32


def step_metrics(window, stride, monkeypatch):
    """One ultra step's metrics, and the warnings its forward raised."""
    monkeypatch.setattr(interface, "_WARNED_DENSE", set())  # warn-once state of earlier tests
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=50,
                                                        n_positions=64, attn_pdrop=0.0))
    cfg = MSTConfig(ultra_sparsity=0.5, warmup_ratio=0.0, restoration_ratio=0.0, hsa_pattern="local_strided",
                    hsa_window=window, hsa_stride=stride)
    ctl = MSTController(model, cfg)
    ids = torch.randint(3, 50, (2, T))
    assert ctl.before_forward(0, 4, {"input_ids": ids})  # the whole run is ultra: HSA on
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(input_ids=ids)
    return ctl.metrics(1, 4), [str(w.message) for w in caught if "admits every causal pair" in str(w.message)]


def test_pattern_dense_at_this_length_warns_and_logs_density_one_and_hsa_off(monkeypatch):
    m, warned = step_metrics(128, 128, monkeypatch)  # window and stride beyond the 32 tokens: every causal pair
    assert m["mst/hsa"] == 0.0 and m["mst/hsa_density"] == 1.0
    assert len(warned) == 1 and f"sequence length {T}" in warned[0]


def test_sparse_pattern_logs_its_exact_density(monkeypatch):
    m, warned = step_metrics(4, 3, monkeypatch)
    kept = sum(1 for q in range(T) for k in range(q + 1) if q - k < 4 or (q - k) % 3 == 0)
    assert m["mst/hsa"] == 1.0 and warned == []
    assert m["mst/hsa_density"] == pytest.approx(kept / (T * (T + 1) / 2), rel=1e-12)
