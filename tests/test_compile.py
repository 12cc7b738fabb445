"""`MSTTrainer` with ``torch_compile=True`` (inductor, on CPU): the model compiles once per attention state;
topology updates cost no recompilation and switching sparse attention on and off costs exactly one."""

import pytest
import torch
from transformers import TrainingArguments

from mst_hf import MSTConfig, MSTTrainer

from .helpers import tiny_gpt2, toy_dataset

STEPS = 12


@pytest.mark.slow
def test_compiled_trainer_recompiles_once_for_the_attention_switch_only(tmp_path):
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    # warm-up [0, 3): dense attention; ultra [3, 9): sparse; restoration [9, 12): dense again. Updates every 2 steps.
    cfg = MSTConfig(initial_sparsity=0.5, ultra_sparsity=0.8, final_sparsity=0.5, warmup_ratio=0.25,
                    restoration_ratio=0.25, update_interval=2, hsa_pattern="local", hsa_window=4, hsa_stride=4,
                    hsa_block=4)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=4, use_cpu=True,
                             report_to=[], save_strategy="no", disable_tqdm=True, torch_compile=True,
                             logging_steps=100)
    trainer = MSTTrainer(tiny_gpt2(), args, mst_config=cfg, train_dataset=toy_dataset(STEPS * 4, 32))
    trainer.train()
    history = trainer.mst.history
    assert len(history) >= 5 and {r["phase"] for r in history} == {"warmup", "ultra", "restoration"}
    # one graph per attention state (plus the piece after transformers' own logging graph break)
    assert counters["stats"]["unique_graphs"] <= 3
    assert trainer.mst.hsa_on is False  # the run ended on dense attention after using the sparse pattern
