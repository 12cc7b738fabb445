"""Mixture-of-experts models (transformers 5 fused 3-D experts): the FLOP count charges the ``top_k`` experts a
token is routed to and the router, dense; MST sparsifies the attention projections only, says the experts stay
dense, and trains and saves such a model."""

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, MixtralConfig, Qwen3MoeConfig, TrainingArguments

import mst_hf
from mst_hf import MSTConfig, MSTController, MSTTrainer
from mst_hf.flops import dense_token_flops, model_flop_shapes
from mst_hf.targets import find_targets, fused_expert_parameters

from .helpers import VOCAB, toy_dataset

T = 16
SHARED = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=8, max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
              pad_token_id=0)


def qwen3_moe_config():
    return Qwen3MoeConfig(**SHARED, intermediate_size=64, moe_intermediate_size=16, num_experts=4,
                          num_experts_per_tok=2)


def mixtral_config():
    return MixtralConfig(**SHARED, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)


def _build(config, meta=False):
    torch.manual_seed(0)
    if meta:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    return AutoModelForCausalLM.from_config(config)


def _hand_count(config) -> int:
    """Dense per-token training FLOPs from the config numbers: 6 x (weights a token multiplies) + attention."""
    n_experts = getattr(config, "num_experts", None) or config.num_local_experts
    inter = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    hidden, heads, kv, head_dim = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, 8
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv * head_dim  # q, o and k, v
    experts = config.num_experts_per_tok * 3 * hidden * inter  # gate, up and down of each of the top-k experts
    router = n_experts * hidden
    head = VOCAB * hidden
    weights = config.num_hidden_layers * (attention + experts + router) + head
    k_bar_pairs = T * (T + 1) // 2  # causal pairs of one sequence
    return 6 * weights + 12 * config.num_hidden_layers * heads * head_dim * k_bar_pairs // T


CONFIGS = {"qwen3_moe": qwen3_moe_config, "mixtral": mixtral_config}


@pytest.mark.parametrize("make_config", list(CONFIGS.values()), ids=list(CONFIGS))
def test_dense_token_flops_count_the_routed_experts_and_the_router(make_config):
    config = make_config()
    fm = model_flop_shapes(_build(config, meta=True))
    assert dense_token_flops(fm, T) == _hand_count(config)


@pytest.mark.parametrize("make_config", list(CONFIGS.values()), ids=list(CONFIGS))
def test_default_targets_are_the_attention_projections_and_the_head(make_config):
    model = _build(make_config(), meta=True)
    names = list(find_targets(model, MSTConfig()))
    attention = [n for n in names if ".self_attn." in n]
    assert names == attention + ["lm_head.weight"] and len(attention) == 8


def test_fused_expert_parameters_are_found():
    model = _build(qwen3_moe_config(), meta=True)
    assert fused_expert_parameters(model) == [f"model.layers.{i}.mlp.experts.{n}" for i in range(2)
                                              for n in ("gate_up_proj", "down_proj")]


@pytest.mark.parametrize("make_config", list(CONFIGS.values()), ids=list(CONFIGS))
def test_trains_with_dense_experts_warns_and_round_trips_its_masks(make_config, tmp_path, caplog):
    model = _build(make_config())
    experts_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".experts." in n}
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=6, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True, seed=0,
                             disable_tqdm=True)
    cfg = MSTConfig(initial_sparsity=0.5, ultra_sparsity=0.8, final_sparsity=0.5, warmup_ratio=0.2,
                    restoration_ratio=0.25, update_interval=2, hsa_pattern="dense", exclude_modules=["experts"])
    with caplog.at_level(logging.WARNING):
        trainer = MSTTrainer(model, args, mst_config=cfg, train_dataset=toy_dataset(16, seq_len=T))
    assert "fused MoE expert" in caplog.text and "model.layers.0.mlp.experts.gate_up_proj" in caplog.text
    trainer.train()
    masks = trainer.mst.masks
    assert all(".self_attn." in n or n == "lm_head.weight" for n in masks.masks) and masks.sparsity() > 0.4
    for name, p in model.named_parameters():  # experts trained, dense: no weight zeroed, every one moved
        if name in experts_before:
            assert bool((p != 0).all()) and not torch.equal(p.detach(), experts_before[name]), name
    trainer.save_model(str(tmp_path / "saved"))
    fresh = AutoModelForCausalLM.from_pretrained(str(tmp_path / "saved"))
    assert mst_hf.load_masks(fresh, str(tmp_path / "saved"), apply=False).digest() == masks.digest()


@pytest.mark.parametrize("make_config", list(CONFIGS.values()), ids=list(CONFIGS))
def test_experts_not_excluded_are_refused_naming_them_and_the_fix(make_config):
    with pytest.raises(NotImplementedError, match=r"mlp\.experts\.(gate_up|down)_proj.*exclude_modules=\['experts'\]"):
        MSTController(_build(make_config()), MSTConfig(hsa_pattern="dense"))
