"""Sliding-window attention in the FLOP count: each layer is charged at its own window (transformers' mask
function itself defines it here), intersected with the HSA pattern when HSA is on."""

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, MistralConfig
from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function

from mst_hf import MSTConfig
from mst_hf.attention.patterns import pattern_mask_fn
from mst_hf.flops import dense_token_flops, model_flop_shapes, step_flops, weight_token_flops

T, WINDOW = 32, 8
SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
             head_dim=8, max_position_embeddings=64)
HSA = {  # (pattern, window, stride, head_split)
    "off": None,
    "local": ("local", 4, 4, False),
    "strided": ("strided", 4, 3, False),
    "local_strided": ("local_strided", 3, 5, False),
    "fixed": ("fixed", 4, 4, False),
    "head_split": ("local_strided", 3, 5, True),
}


def _gemma3(**kw):
    cfg = Gemma3TextConfig(**SMALL, num_hidden_layers=4, sliding_window=WINDOW, **kw,
                           layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"])
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


def _mistral(sliding_window=WINDOW):
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(MistralConfig(**SMALL, num_hidden_layers=3,
                                                              sliding_window=sliding_window))


def _mst_config(hsa):
    if hsa is None:
        return MSTConfig(hsa_pattern="dense")
    pattern, window, stride, head_split = hsa
    return MSTConfig(hsa_pattern=pattern, hsa_window=window, hsa_stride=stride, hsa_block=window,
                     hsa_head_split=head_split, hsa_layers="alternate")


def _brute_force_pairs(model, hsa) -> list[float]:
    """Attended (query, key) pairs of each layer, from boolean (T, T) masks, summed over heads / num_heads."""
    text = model.config
    q, k = torch.arange(T)[:, None], torch.arange(T)[None, :]
    types = getattr(text, "layer_types", None) or ["sliding_attention" if text.sliding_window else "full"] * 99
    heads = text.num_attention_heads
    pairs = []
    for layer in range(text.num_hidden_layers):
        windowed = types[layer] == "sliding_attention"
        own = sliding_window_causal_mask_function(text.sliding_window) if windowed else causal_mask_function
        total = 0
        for h in range(heads):
            mask = own(0, h, q, k)
            if hsa is not None and layer % 2 == 0:  # hsa_layers="alternate"
                pattern, window, stride, head_split = hsa
                fn = pattern_mask_fn(pattern, window, stride, window, head_split, heads)
                mask = mask & fn(0, torch.tensor(h), q, k)
            total += int(mask.sum())
        pairs.append(total / heads)
    return pairs


@pytest.mark.parametrize("hsa", list(HSA.values()), ids=list(HSA))
@pytest.mark.parametrize("build", [_gemma3, _mistral], ids=["gemma3", "mistral"])
def test_per_layer_k_bar_is_the_brute_force_count(build, hsa):
    model = build()
    fm = model_flop_shapes(model, _mst_config(hsa))
    expected = [p / T for p in _brute_force_pairs(model, hsa)]
    assert fm.k_bar(T, hsa_on=hsa is not None) == pytest.approx(expected, abs=0, rel=1e-15)


@pytest.mark.parametrize("hsa", list(HSA.values()), ids=list(HSA))
@pytest.mark.parametrize("build", [_gemma3, _mistral], ids=["gemma3", "mistral"])
def test_attention_flops_of_a_step_are_the_brute_force_count(build, hsa):
    model = build()
    fm = model_flop_shapes(model, _mst_config(hsa))
    tokens = 3 * T
    attention = step_flops(fm, None, tokens, T, hsa_on=hsa is not None) - tokens * weight_token_flops(fm)
    pairs = sum(_brute_force_pairs(model, hsa))
    assert attention == 3 * 12 * fm.attn_dim * pairs


def test_dense_baseline_charges_each_layer_its_window():
    model = _gemma3()
    fm = model_flop_shapes(model)
    windowed = sum(min(q + 1, WINDOW) for q in range(T))  # sliding layers 0 and 2
    full = T * (T + 1) // 2  # full layers 1 and 3
    assert fm.layer_windows == (WINDOW, None, WINDOW, None)
    assert dense_token_flops(fm, T) == 6 * fm.n_params + 12 * fm.attn_dim * (2 * windowed + 2 * full) / T


def test_a_model_without_a_window_is_charged_full_causal_attention():
    fm = model_flop_shapes(_mistral(sliding_window=None))
    assert fm.layer_windows == () and fm.k_bar(T, hsa_on=False) == [(T + 1) / 2] * 3


def test_a_window_longer_than_the_sequence_changes_nothing():
    assert model_flop_shapes(_mistral(sliding_window=T)).k_bar(T, hsa_on=False) == [(T + 1) / 2] * 3
