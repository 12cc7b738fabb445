"""`MSTTrainer` with ``torch_compile=True`` (inductor, on CPU): the model compiles once per attention state (and per
kernel state with block kernels); topology updates cost no recompilation and switching sparse attention on and off
costs exactly one."""

import pytest
import torch
from transformers import TrainerCallback, TrainingArguments

from mst_hf import MSTConfig, MSTTrainer
from mst_hf.kernels import block_sparse_layout

from .helpers import tiny_gpt2, tiny_llama, toy_dataset

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


@pytest.mark.slow
def test_compiled_block_kernels_recompile_for_kernel_and_attention_state_only(tmp_path):
    """Block masks on the block-sparse ops (CPU: their plain-torch implementation), compiled: one graph per (kernel
    state, attention state) pair, whatever the topology updates do to the tile counts.

    Four graphs: dense kernels (every topology-update step runs dense) or the block ops, times sparse attention off or
    on. Tile counts change at every warm-up and restoration update and are a dynamic size (the index length), so
    they add none. (Before the fix each new tile count recompiled the whole model: the index, an attribute of an
    nn.Linear, got static shapes, and dense update steps replaced the layouts.)
    """
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    steps = 16
    # warm-up [0, 8) at rising sparsity, ultra [8, 12) with sparse attention, restoration [12, 16) at falling sparsity;
    # updates (dense kernels) at even steps, block kernels at odd ones: 1, 3, 5, 7, 13 and 15 all see new tile counts
    cfg = MSTConfig(initial_sparsity=0.0, ultra_sparsity=0.8, final_sparsity=0.3, warmup_ratio=0.5,
                    restoration_ratio=0.25, update_interval=2, hsa_pattern="local", hsa_window=4, hsa_stride=4,
                    hsa_block=4, hsa_phases=["ultra"], sparsity_structure="block", block_size=16,
                    weight_kernels="block")
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4, use_cpu=True,
                             report_to=[], save_strategy="no", disable_tqdm=True, torch_compile=True,
                             logging_steps=100)
    model = tiny_llama(hidden_size=64, intermediate_size=128, num_key_value_heads=4)  # 16 to 32 tiles per layer
    trainer = MSTTrainer(model, args, mst_config=cfg, train_dataset=toy_dataset(steps * 4, 32))
    tiles = []
    trainer.add_callback(_TileCounts(trainer, tiles))
    trainer.train()
    assert len(set(tiles)) >= 5  # the block steps really ran with that many different tile counts
    assert not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] == 4


class _TileCounts(TrainerCallback):
    """Records, at each step's end, the active tiles of every layer on the block kernel (steps on dense skipped)."""

    def __init__(self, trainer, out):
        self.trainer, self.out = trainer, out

    def on_step_end(self, args, state, control, **kwargs):
        kernels = self.trainer.mst.weight_kernels
        layouts = [block_sparse_layout(kernels._module(t)) for t in kernels.targets.values()]
        if kernels.block_layers():
            self.out.append(tuple(layout.nnz for layout in layouts))
