"""Which weights MST trains: frozen weights are left dense (never silently pruned), PEFT models are refused."""

import logging

import pytest
import torch

from mst_hf import MSTConfig, MSTController

from .helpers import tiny_gpt2, tiny_llama


def _cfg():
    return MSTConfig(initial_sparsity=0.9, ultra_sparsity=0.9, final_sparsity=0.9, warmup_ratio=0.0,
                     restoration_ratio=0.0, hsa_pattern="dense")


def test_frozen_tied_embedding_is_left_dense(caplog):
    model = tiny_gpt2()
    model.get_input_embeddings().weight.requires_grad_(False)  # the tied LM head with it
    before = model.get_input_embeddings().weight.detach().clone()
    with caplog.at_level(logging.WARNING):
        ctl = MSTController(model, _cfg())
    assert "transformer.wte.weight" not in ctl.targets and len(ctl.targets) > 0
    assert torch.equal(model.get_input_embeddings().weight, before)  # not one value pruned
    assert "frozen" in caplog.text and "transformer.wte.weight" in caplog.text


def test_all_targets_frozen_is_refused_with_the_fix():
    model = tiny_llama()
    model.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"requires_grad=False.*requires_grad_\(True\)"):
        MSTController(model, _cfg())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_peft_injected_base_model_is_refused():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    base = model.get_base_model()
    weight = base.model.layers[0].self_attn.q_proj.base_layer.weight.detach().clone()
    with pytest.raises(NotImplementedError, match="merge_lora_sparse"):
        MSTController(base, _cfg())
    assert torch.equal(base.model.layers[0].self_attn.q_proj.base_layer.weight, weight)


def test_target_modules_that_match_only_the_lm_head_are_refused():
    """Llama names on a GPT-2 would train it dense but for its tied embedding and report that as its sparsity."""
    cfg = MSTConfig(**{**_cfg().mst_dict(), "target_modules": ["q_proj", "v_proj"]})
    with pytest.raises(ValueError, match=r"only the LM head.*\['q_proj', 'v_proj'\].*\['c_attn', 'c_proj', 'c_fc'\]"):
        MSTController(tiny_gpt2(), cfg)
    head_only = MSTConfig(**{**cfg.mst_dict(), "target_modules": ["lm_head"]})  # the head named: on purpose
    assert list(MSTController(tiny_gpt2(), head_only).targets) == ["transformer.wte.weight"]


def test_a_head_cap_on_an_excluded_head_is_warned_about(caplog):
    cfg = MSTConfig(**{**_cfg().mst_dict(), "lm_head_max_sparsity": 0.8, "exclude_modules": ["lm_head"]})
    with caplog.at_level(logging.WARNING):
        ctl = MSTController(tiny_llama(), cfg)
    assert "lm_head.weight" not in ctl.targets
    assert "lm_head_max_sparsity=0.8 caps the LM head's sparsity, but the head of this LlamaForCausalLM is not a " \
           "target (exclude_modules=['lm_head']" in caplog.text
