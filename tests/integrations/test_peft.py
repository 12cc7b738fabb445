"""LoRA on a sparse MST checkpoint: the frozen base stays sparse, the mask-aware merge keeps the sparsity, and
MSTTrainer refuses PEFT models with directions."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import copy  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments  # noqa: E402

import mst_hf  # noqa: E402
from mst_hf import MSTConfig, MSTController, MSTTrainer  # noqa: E402
from mst_hf.io import save_mst_files  # noqa: E402

from ..helpers import tiny_gpt2, tiny_llama, toy_dataset  # noqa: E402

ADAPTED = ["transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_fc.weight"]



@pytest.fixture
def sparse_checkpoint(tmp_path):
    model = tiny_gpt2()
    controller = MSTController(model, MSTConfig(initial_sparsity=0.7, hsa_pattern="dense"))
    model.save_pretrained(str(tmp_path))
    save_mst_files(str(tmp_path), controller)
    return tmp_path


def lora(base):
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    return get_peft_model(base, config)


def zero_fraction(params, masks):
    total = sum(masks.masks[n].numel() for n in masks.masks)
    return sum(int((params[n].detach() == 0).sum()) for n in masks.masks) / total


def test_lora_training_keeps_base_sparse_and_sparse_merge_keeps_sparsity(sparse_checkpoint, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(str(sparse_checkpoint))
    masks = mst_hf.load_masks(base, str(sparse_checkpoint))
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    base_zeros = zero_fraction(dict(base.named_parameters()), masks)
    peft_model = lora(base)
    args = TrainingArguments(str(tmp_path / "lora"), max_steps=6, per_device_train_batch_size=4, learning_rate=2e-2,
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    Trainer(peft_model, args, train_dataset=toy_dataset(24, seq_len=16)).train()

    base_now = mst_hf.io.attach.named_base_params(peft_model)
    assert all(torch.equal(base_now[n], before[n]) for n in before)  # frozen base, masks untouched
    assert mst_hf.pruned_nonzeros(peft_model, masks) == 0

    plain = copy.deepcopy(peft_model).merge_and_unload()
    assert mst_hf.pruned_nonzeros(plain, masks) > 0  # a plain merge fills pruned positions

    merged = mst_hf.merge_lora_sparse(peft_model, str(sparse_checkpoint))
    merged_params, plain_params = dict(merged.named_parameters()), dict(plain.named_parameters())
    assert mst_hf.pruned_nonzeros(merged, masks) == 0
    assert zero_fraction(merged_params, masks) == base_zeros > 0.6
    for name in ADAPTED:  # the LoRA delta is kept on active positions
        mask = masks.masks[name]
        assert torch.equal(merged_params[name][mask], plain_params[name][mask])
        assert not torch.equal(merged_params[name][mask], before[name][mask])


def test_load_masks_on_a_peft_model_binds_the_base_weights(sparse_checkpoint):
    peft_model = lora(AutoModelForCausalLM.from_pretrained(str(sparse_checkpoint)))
    masks = mst_hf.load_masks(peft_model, str(sparse_checkpoint), apply=False)
    layer = peft_model.get_base_model().transformer.h[0].attn.c_attn
    assert masks.params[ADAPTED[0]] is layer.base_layer.weight


def test_merge_refuses_masks_of_another_model_before_merging(sparse_checkpoint, tmp_path):
    other = tiny_llama()
    save_mst_files(str(tmp_path / "other"), MSTController(other, MSTConfig(initial_sparsity=0.5, hsa_pattern="dense")))
    peft_model = lora(AutoModelForCausalLM.from_pretrained(str(sparse_checkpoint)))
    with pytest.raises(ValueError, match="another model"):
        mst_hf.merge_lora_sparse(peft_model, str(tmp_path / "other"))
    assert any("lora_" in n for n, _ in peft_model.named_parameters())  # nothing was merged


def test_mst_trainer_refuses_a_peft_model(sparse_checkpoint, tmp_path):
    peft_model = lora(AutoModelForCausalLM.from_pretrained(str(sparse_checkpoint)))
    args = TrainingArguments(str(tmp_path), max_steps=1, report_to=[], use_cpu=True)
    with pytest.raises(NotImplementedError, match=r"plain\s+transformers.Trainer.*merge_lora_sparse"):
        MSTTrainer(peft_model, args, mst_config=MSTConfig(hsa_pattern="dense"), train_dataset=toy_dataset(8))


def test_save_sparse_refuses_a_base_model_with_injected_lora_layers(sparse_checkpoint, tmp_path):
    peft_model = lora(AutoModelForCausalLM.from_pretrained(str(sparse_checkpoint)))
    with pytest.raises(TypeError, match="merge_lora_sparse"):  # its state dict holds lora_A/lora_B, not the model
        mst_hf.save_sparse(peft_model.get_base_model(), str(tmp_path / "compact"))
    assert not (tmp_path / "compact").exists()
