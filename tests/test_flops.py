"""FLOP accounting: closed forms with nothing sparse, the weight and update terms, exact attention counts of every
HSA pattern against a brute-force count over the explicit mask, and the runtime meter's state."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from mst_hf import MSTConfig, MSTController  # noqa: E402
from mst_hf.attention import HSASpec  # noqa: E402
from mst_hf.flops import (  # noqa: E402
    FlopMeter,
    FlopModel,
    attention_token_flops,
    dense_token_flops,
    model_flop_shapes,
    step_flops,
    token_flops,
    weight_token_flops,
)
from mst_hf.topology import active_count  # noqa: E402

from .helpers import VOCAB, tiny_gpt2, tiny_llama  # noqa: E402


def gpt2_closed_form(L=2, d=32):
    """N of GPT-2: per layer c_attn d x 3d, attn c_proj d x d, c_fc d x 4d, mlp c_proj 4d x d; tied head d x V once."""
    return L, d, L * (d * 3 * d + d * d + 2 * d * 4 * d) + d * VOCAB


def llama_closed_form(L=2, d=32, heads=4, kv_heads=2, head_dim=16, inter=64):
    """N of a GQA Llama: q d x H hd, k/v d x KV hd, o H hd x d, gate/up d x I, down I x d; untied head d x V."""
    per_layer = d * heads * head_dim + 2 * d * kv_heads * head_dim + heads * head_dim * d + 3 * d * inter
    return L, heads * head_dim, L * per_layer + d * VOCAB


CASES = {
    "gpt2": (lambda: tiny_gpt2(), gpt2_closed_form()),
    "llama-gqa": (lambda: tiny_llama(head_dim=16), llama_closed_form()),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    build, (L, d_attn, n) = CASES[request.param]
    return model_flop_shapes(build()), L, d_attn, n


@pytest.mark.parametrize("seq_len", [1, 16, 64])
def test_dense_equals_causal_closed_form(case, seq_len):
    fm, L, d_attn, n = case
    expected = 6 * n + 12 * L * d_attn * (seq_len + 1) / 2  # our baseline: k_bar = (T + 1) / 2
    assert token_flops(fm, None, fm.k_bar(seq_len, hsa_on=False)) == expected == dense_token_flops(fm, seq_len)


@pytest.mark.parametrize("seq_len", [1, 16, 64])
def test_noncausal_form_is_nanogpt(case, seq_len):
    fm, L, d_attn, n = case
    expected = 6 * n + 12 * L * d_attn * seq_len  # nanoGPT's 6N + 12 L d T: k_bar = T
    assert dense_token_flops(fm, seq_len, causal=False) == expected == token_flops(fm, None, float(seq_len))


def test_untargeted_matmuls_still_count():
    fm = model_flop_shapes(tiny_gpt2(), MSTConfig(target_modules=["c_fc"], sparsify_lm_head=False))
    assert (fm.n_params, len(fm.targets)) == (gpt2_closed_form()[2], 2)


def test_tied_head_counted_once():
    fm = model_flop_shapes(tiny_gpt2())
    heads = [m for m in fm.matmuls if m.name == "transformer.wte.weight"]
    assert [(m.module_name, m.n_in, m.n_out, m.is_target) for m in heads] == [("lm_head", 32, VOCAB, True)]


def test_halving_density_halves_weight_term(case):
    fm = case[0]
    half = {m.name: 0.5 for m in fm.targets}
    assert 2 * weight_token_flops(fm, half) == weight_token_flops(fm)


def test_update_step_adds_dense_gradient_of_inactive_part(case):
    fm = case[0]
    quarter = {m.name: 0.25 for m in fm.targets}
    inactive = sum(m.numel - active_count(m.numel, 0.25) for m in fm.targets)
    extra = weight_token_flops(fm, quarter, update_step=True) - weight_token_flops(fm, quarter)
    assert extra == 2 * inactive


def test_unknown_density_name_is_refused():
    fm = model_flop_shapes(tiny_gpt2())
    with pytest.raises(ValueError, match="not matmul weights"):
        weight_token_flops(fm, {"transformer.h.0.attn.nope.weight": 0.5})


# --------------------------------------------------------------------------- attention patterns, brute force


def brute_force_pairs(pattern, seq_len, window, stride, block):
    """Attended (query, key) pairs of the explicit boolean mask, built here from the SPEC definitions."""
    q = np.arange(seq_len)[:, None]
    k = np.arange(seq_len)[None, :]
    causal = q >= k
    local = causal & (q - k < window)
    strided = causal & ((q - k) % stride == 0)
    masks = {
        "dense": causal,
        "local": local,
        "strided": strided,
        "local_strided": local | strided,
        "fixed": causal & ((q // block == k // block) | (k % block == block - 1)),
    }
    return int(masks[pattern].sum())


def one_layer(pattern, window, stride, block, head_split=False):
    return FlopModel(matmuls=(), n_layers=1, attn_dim=8, hsa_layers=(0,),
                     hsa=HSASpec(pattern, window, stride, block, head_split=head_split))


@pytest.mark.parametrize("pattern", ["dense", "local", "strided", "local_strided", "fixed"])
@pytest.mark.parametrize("seq_len", [1, 7, 64, 129, 300])
@pytest.mark.parametrize("window, stride, block", [(16, 8, 12), (5, 7, 64)])
def test_pattern_pairs_equal_brute_force(pattern, seq_len, window, stride, block):
    fm = one_layer(pattern, window, stride, block)
    assert fm.attended_pairs_x2(seq_len, hsa_on=True) == 2 * brute_force_pairs(pattern, seq_len, window, stride, block)


@pytest.mark.parametrize("seq_len", [1, 33, 200])
def test_head_split_is_mean_of_local_and_strided(seq_len):
    fm = one_layer("local_strided", 16, 8, 12, head_split=True)
    expected = brute_force_pairs("local", seq_len, 16, 8, 12) + brute_force_pairs("strided", seq_len, 16, 8, 12)
    assert fm.attended_pairs_x2(seq_len, hsa_on=True) == expected


def test_attention_flops_per_token_use_k_bar():
    fm = one_layer("local", 16, 8, 12)
    k_bar = fm.k_bar(100, hsa_on=True)[0]
    expected = 12 * 8 * brute_force_pairs("local", 100, 16, 8, 12) / 100  # 12 d_attn k_bar, k_bar = pairs / T
    assert attention_token_flops(fm, [k_bar]) == pytest.approx(expected)


@pytest.mark.parametrize(
    "hsa_layers, expected", [("all", (0, 1, 2, 3)), ("alternate", (0, 2)), ([3, 1], (1, 3))]
)
def test_hsa_layer_selection(hsa_layers, expected):
    fm = model_flop_shapes(tiny_gpt2(n_layer=4), MSTConfig(hsa_layers=hsa_layers))
    assert fm.hsa_layers == expected


def test_hsa_layer_out_of_range_is_refused():
    with pytest.raises(ValueError, match="hsa_layers"):
        model_flop_shapes(tiny_gpt2(), MSTConfig(hsa_layers=[0, 5]))


def test_only_hsa_layers_are_sparse():
    fm = model_flop_shapes(tiny_gpt2(n_layer=4), MSTConfig(hsa_pattern="local", hsa_window=4, hsa_layers="alternate"))
    sparse, dense = brute_force_pairs("local", 32, 4, 1, 1), brute_force_pairs("dense", 32, 4, 1, 1)
    assert fm.attended_pairs_x2(32, hsa_on=True) == 2 * (2 * sparse + 2 * dense)


# --------------------------------------------------------------------------- the runtime meter


def test_meter_step_equals_step_flops():
    fm = model_flop_shapes(tiny_gpt2(), MSTConfig(hsa_pattern="local", hsa_window=4))
    meter = FlopMeter(fm)
    densities = {m.name: 0.3 for m in fm.targets}
    for _ in range(2):  # two micro-batches of 3 sequences, two ranks
        meter.add_inputs({"input_ids": torch.zeros(3, 16, dtype=torch.long)}, world_size=2)
    counted = meter.end_step(densities, hsa_on=True, update_step=True)
    assert counted == step_flops(fm, densities, 4 * 3 * 16, 16, hsa_on=True, update_step=True)


def test_meter_reads_masks_before_the_update():
    cfg = MSTConfig(initial_sparsity=0.5)
    ctl = MSTController(tiny_gpt2(), cfg)
    densities = {n: ctl.masks.density(n) for n in ctl.masks.masks}
    expected = step_flops(ctl.flops.flop_model, densities, 32, 16, update_step=True)
    ctl.flops.add_batch(2, 16)
    counted = ctl.flops.end_step(ctl.masks, update_step=True)
    name = next(iter(ctl.masks.masks))
    ctl.masks.set_mask(name, torch.ones_like(ctl.masks.masks[name]))  # the update changes the masks ...
    ctl.flops.add_batch(2, 16)
    after = ctl.flops.end_step(ctl.masks)  # ... and the next step counts the new ones
    dense_layer = {**densities, name: 1.0}
    assert (counted, after) == (expected, step_flops(ctl.flops.flop_model, dense_layer, 32, 16))



def test_meter_charges_a_matrix_its_model_counts_dense_at_full_size_whatever_its_mask():
    from mst_hf.conventions import convention_flop_models

    ctl = MSTController(tiny_gpt2(), MSTConfig(initial_sparsity=0.5))
    head = next(m for m in ctl.flops.flop_model.matmuls if m.is_lm_head)
    assert ctl.masks.density(head.name) < 1.0  # the run's head is sparse ...
    meter = FlopMeter(convention_flop_models(ctl.flops.flop_model)["dense_lm_head"])
    meter.add_batch(2, 16)
    counted = meter.end_step(ctl.masks)
    densities = {n: ctl.masks.density(n) for n in ctl.masks.masks if n != head.name}
    assert counted == step_flops(ctl.flops.flop_model, densities, 32, 16)  # ... and this model charges it dense

def test_controller_state_dict_keeps_totals():
    cfg = MSTConfig(initial_sparsity=0.5, hsa_pattern="local", hsa_window=4)

    def run(ctl, steps):
        for step in steps:
            ctl.flops.add_batch(2, 16)
            ctl.flops.end_step(ctl.masks, hsa_on=step % 2 == 0, update_step=step % 3 == 0)

    ctl = MSTController(tiny_gpt2(), cfg)
    run(ctl, range(4))
    resumed = MSTController(tiny_gpt2(), cfg)
    resumed.load_state_dict(json.loads(json.dumps(ctl.state_dict())))  # as written to mst_state.json
    run(ctl, range(4, 6))
    run(resumed, range(4, 6))
    assert resumed.flops.state_dict() == ctl.flops.state_dict()


def test_dense_flop_shares_split_the_dense_count():
    from transformers import GPT2Config

    from mst_hf.flops import attention_token_flops, dense_flop_shares, dense_token_flops
    from mst_hf.plan import build_meta_model

    fm = model_flop_shapes(build_meta_model(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=1000)))
    shares = dense_flop_shares(fm, 256)
    assert shares["dense_token_flops"] == dense_token_flops(fm, 256)
    assert shares["attention"] == attention_token_flops(fm, 257 / 2) / shares["dense_token_flops"]
    assert shares["head"] == 6 * 64 * 1000 / shares["dense_token_flops"]
    assert abs(shares["head"] + shares["blocks"] + shares["attention"] - 1) < 1e-12
