"""One default: ``MSTTrainer`` without ``mst_config``, the example's flags without ``--mst_preset`` and
``python -m mst_hf.plan`` without ``--preset`` choose the same `MSTConfig` for the same run."""

import json

import pytest
from transformers import TrainingArguments

from mst_hf import MSTConfig, MSTTrainer
from mst_hf.arguments import mst_arguments_dataclass, to_mst_config
from mst_hf.defaults import run_config, sequence_length
from mst_hf.plan import main as plan_main
from mst_hf.presets import DEFAULT_PRESET

from .helpers import tiny_gpt2, toy_dataset

STEPS, SEQ = 50, 32


def _three_configs(tmp_path, capsys, model, preset=None):
    flags = mst_arguments_dataclass()(**({"mst_preset": preset} if preset else {}))
    example = to_mst_config(flags, max_steps=STEPS, block_size=SEQ, model=model)
    model.config.save_pretrained(tmp_path / "model")
    plan_main(["--model", str(tmp_path / "model"), "--steps", str(STEPS), "--seq-len", str(SEQ), "--json",
               "--tokens-per-step", str(8 * SEQ)] + (["--preset", preset] if preset else []))
    planned = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["mst_config_fields"]
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=STEPS, use_cpu=True, report_to=[],
                             per_device_train_batch_size=8)
    trained = None
    if preset is None:
        trainer = MSTTrainer(model, args, train_dataset=toy_dataset(16, SEQ))
        trained = json.loads(json.dumps(trainer.mst_config.mst_dict()))
    return json.loads(json.dumps(example.mst_dict())), planned, trained


@pytest.mark.parametrize("vocab", [64, 4096], ids=["small-head", "head-dominated"])
def test_trainer_example_and_planner_choose_the_same_default(tmp_path, capsys, vocab):
    model = tiny_gpt2(vocab_size=vocab)
    example, planned, trained = _three_configs(tmp_path, capsys, model)
    assert example == planned == trained
    # and it is the default preset scaled to this run, not the paper's bare MSTConfig()
    assert example["initial_sparsity"] == MSTConfig.from_preset(DEFAULT_PRESET).initial_sparsity != 0.0
    assert example["update_interval"] == STEPS // 25 and example["hsa_window"] == SEQ // 8
    assert example["lm_head_max_sparsity"] == MSTConfig.from_preset(DEFAULT_PRESET).lm_head_max_sparsity


def test_a_named_preset_is_scaled_alike_by_the_example_and_the_planner(tmp_path, capsys):
    example, planned, _ = _three_configs(tmp_path, capsys, tiny_gpt2(), preset="mst-paper")
    assert example == planned
    assert example["update_interval"] == STEPS // 25 and example["initial_sparsity"] == 0.0


def test_given_fields_win_over_run_scaling():
    cfg = run_config("mst-paper", {"update_interval": 7}, max_steps=STEPS, seq_len=SEQ)
    assert cfg.update_interval == 7 and cfg.hsa_stride == SEQ // 8


def test_sequence_length_of_datasets():
    assert sequence_length(toy_dataset(4, 24)) == 24
    assert sequence_length([{"text": "no ids"}]) is None
    assert sequence_length(iter([])) is None
