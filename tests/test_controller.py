"""A custom loop written exactly as `MSTController`'s docstring says counts the same FLOPs and gets the same masks as
`MSTTrainer` on the same run (same model, data order, optimizer and schedule)."""

import logging
import math

import pytest
import torch
from transformers import TrainingArguments

from mst_hf import MSTConfig, MSTController, MSTTrainer, topology

from .helpers import tiny_gpt2, toy_dataset

STEPS, BATCH, ACCUM = 12, 4, 2


def _cfg():
    return MSTConfig(initial_sparsity=0.0, ultra_sparsity=0.8, final_sparsity=0.2, warmup_ratio=0.25,
                     restoration_ratio=0.25, update_interval=3, hsa_pattern="local", hsa_window=4, hsa_stride=4,
                     hsa_block=4)


def _trainer_run(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=BATCH,
                             gradient_accumulation_steps=ACCUM, learning_rate=1e-2, lr_scheduler_type="constant",
                             weight_decay=0.0, report_to=[], save_strategy="no", use_cpu=True, seed=0,
                             disable_tqdm=True, dataloader_drop_last=True, logging_steps=100)
    data = toy_dataset(n=STEPS * BATCH * ACCUM)
    trainer = MSTTrainer(tiny_gpt2(), args, mst_config=_cfg(), train_dataset=data)
    trainer.train()
    return trainer.mst


def _custom_loop():
    model = tiny_gpt2()
    data = toy_dataset(n=STEPS * BATCH * ACCUM)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    ctl = MSTController(model, _cfg())
    for step in range(STEPS):
        for micro in range(ACCUM):
            rows = data[(step * ACCUM + micro) * BATCH : (step * ACCUM + micro + 1) * BATCH]
            batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
            ctl.before_forward(step, STEPS, batch)
            (model(**batch).loss / ACCUM).backward()
        ctl.after_backward(step, STEPS, optimizer)
        optimizer.step()
        optimizer.zero_grad()
        ctl.after_optimizer_step()
    return ctl


def test_custom_loop_counts_the_same_flops_as_trainer(tmp_path):
    by_trainer, by_loop = _trainer_run(tmp_path), _custom_loop()
    assert by_loop.flops.total_flops > 0
    assert (by_loop.flops.total_flops, by_loop.flops.dense_total_flops, by_loop.flops.tokens) == (
        by_trainer.flops.total_flops, by_trainer.flops.dense_total_flops, by_trainer.flops.tokens)
    # the count covers every optimizer step and every token of every micro-batch
    assert by_loop.flops.steps == STEPS and by_loop.flops.tokens == STEPS * ACCUM * BATCH * 32
    assert [r["step"] for r in by_loop.history] == [r["step"] for r in by_trainer.history]


def test_custom_loop_without_batches_counts_no_tokens():
    model = tiny_gpt2()
    ctl = MSTController(model, _cfg())
    ctl.before_forward(0, STEPS)  # no batch passed: nothing to count
    model(**{k: torch.stack([r[k] for r in toy_dataset(2)]) for k in ("input_ids", "labels")}).loss.backward()
    ctl.after_backward(0, STEPS)
    assert ctl.flops.tokens == 0 and ctl.flops.total_flops == 0


def test_a_step_closed_without_a_counted_batch_warns_once_and_the_reduction_says_incomplete(caplog):
    """A loop that forgets the batch in before_forward (at any step) gets one warning naming the call, and a FLOP
    reduction of NaN (not 1.0, or the reduction of the steps that were counted)."""
    model = tiny_gpt2()
    ctl = MSTController(model, _cfg())
    batch = {k: torch.stack([r[k] for r in toy_dataset(2)]) for k in ("input_ids", "labels")}
    with caplog.at_level(logging.WARNING, logger="mst_hf.controller"):
        for step in range(4):
            ctl.before_forward(step, STEPS, batch if step == 0 else None)  # counted once, then forgotten
            model(**batch).loss.backward()
            ctl.after_backward(step, STEPS)
    warned = [r.getMessage() for r in caplog.records if "before_forward(step, total_steps, batch)" in r.getMessage()]
    assert len(warned) == 1 and "step 1 " in warned[0]
    assert ctl.flops.tokens == 2 * 32 and ctl.flops.uncounted_steps == 3
    assert math.isnan(ctl.metrics(4, STEPS)["mst/flop_reduction"])


def test_a_model_without_attention_trains_without_sparse_attention_and_logs_it_off(caplog):
    """A Mamba model has no attention layer: the pattern is switched off with a warning (the config the run saves
    says so) and the logs say 0 / dense, not `mst/hsa` 1 with a density, in the phase where HSA would be on."""
    from transformers import AutoModelForCausalLM, MambaConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(MambaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                                                         state_size=4, expand=2))
    cfg = MSTConfig(ultra_sparsity=0.5, warmup_ratio=0.0, restoration_ratio=0.0, hsa_pattern="local_strided",
                    hsa_window=4, hsa_stride=4)
    with caplog.at_level(logging.WARNING, logger="mst_hf.controller"):
        ctl = MSTController(model, cfg)
    ids = torch.randint(0, 64, (2, 16))
    on = ctl.before_forward(0, 4, {"input_ids": ids})
    model(input_ids=ids, labels=ids).loss.backward()
    ctl.after_backward(0, 4)
    metrics = ctl.metrics(1, 4)
    assert "has no attention layer" in caplog.text and ctl.config.hsa_pattern == "dense"
    assert (on, metrics["mst/hsa"], metrics["mst/hsa_density"], metrics["mst/attention_density"]) == (
        False, 0.0, 1.0, 1.0)


def _masked_gpt2():
    cfg = MSTConfig(initial_sparsity=0.5, ultra_sparsity=0.5, final_sparsity=0.5, warmup_ratio=0.0,
                    restoration_ratio=0.0, update_interval=2, hsa_pattern="dense", grow_method="gradient")
    model = tiny_gpt2()
    return model, MSTController(model, cfg)


def test_non_finite_gradient_at_update_step_skips_the_update_and_training_continues():
    model, ctl = _masked_gpt2()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = toy_dataset(n=4 * 6)
    before = {n: m.clone() for n, m in ctl.masks.masks.items()}
    for step in range(6):
        rows = data[step * 4 : (step + 1) * 4]
        batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
        ctl.before_forward(step, 6, batch)
        model(**batch).loss.backward()
        if step == 2:  # an update step: NaN and inf at pruned positions only
            name, target = next(iter(ctl.targets.items()))
            pruned = (~ctl.masks.masks[name]).nonzero()[:2]
            target.param.grad[pruned[0][0], pruned[0][1]] = float("nan")
            target.param.grad[pruned[1][0], pruned[1][1]] = float("inf")
            masks_at_2 = {n: m.clone() for n, m in ctl.masks.masks.items()}
        record = ctl.after_backward(step, 6, optimizer)
        if step == 2:
            assert record is None and ctl.skipped_updates == [2]
            assert all(torch.equal(m, masks_at_2[n]) for n, m in ctl.masks.masks.items())
        optimizer.step()
        optimizer.zero_grad()
        ctl.after_optimizer_step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert [r["step"] for r in ctl.history] == [0, 4]  # the updates before and after the skipped one ran
    assert any(not torch.equal(m, before[n]) for n, m in ctl.masks.masks.items())


def test_config_changed_behind_its_back_is_refused_by_the_controller():
    cfg = MSTConfig(hsa_pattern="dense")
    cfg.__dict__["ultra_sparsity"] = 5.0
    with pytest.raises(ValueError, match="ultra_sparsity"):
        MSTController(tiny_gpt2(), cfg)


def test_plain_module_with_sparse_attention_is_refused_with_the_fix():
    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)

    with pytest.raises(TypeError, match="hsa_pattern='dense'"):
        MSTController(Plain(), MSTConfig(target_modules=["fc"]))
    assert len(MSTController(Plain(), MSTConfig(target_modules=["fc"], hsa_pattern="dense")).targets) == 1


def test_block_structured_masks_stay_whole_tiles_through_training():
    cfg = MSTConfig(initial_sparsity=0.5, ultra_sparsity=0.75, final_sparsity=0.5, warmup_ratio=0.25,
                    restoration_ratio=0.25, update_interval=2, hsa_pattern="dense", sparsity_structure="block",
                    block_size=8)
    model = tiny_gpt2(n_embd=32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ctl = MSTController(model, cfg)
    data = toy_dataset(n=8 * 4)
    for step in range(8):
        rows = data[step * 4 : (step + 1) * 4]
        batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
        ctl.before_forward(step, 8, batch)
        model(**batch).loss.backward()
        ctl.after_backward(step, 8, optimizer)
        optimizer.step()
        optimizer.zero_grad()
        ctl.after_optimizer_step()
        for name, mask in ctl.masks.masks.items():
            tiles = topology.tile_mask(mask, 8)
            assert torch.equal(topology.expand_blocks(tiles, 8, tuple(mask.shape)), mask), (name, step)
            assert not ctl.targets[name].param.detach()[~mask].any()
    assert len(ctl.history) >= 3 and ctl.history[-1]["unit"] == "8x8 tiles"
    assert 0.4 < ctl.masks.sparsity() < 0.8


def _block(block_size, sparsity):
    return MSTConfig(initial_sparsity=sparsity, ultra_sparsity=sparsity, final_sparsity=sparsity, warmup_ratio=0.0,
                     restoration_ratio=0.0, hsa_pattern="dense", sparsity_structure="block", block_size=block_size)


def test_tile_larger_than_a_layer_is_refused_before_any_pruning():
    model = tiny_gpt2(n_embd=64)  # every target has a side of 64: a 128 tile is the whole matrix, on or off
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"`block_size=128` is larger than the target `transformer\.h\.0\.attn\."
                                         r"c_attn` \(64x192\).*block_size"):
        MSTController(model, _block(128, 0.8))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_layer_left_without_an_active_tile_is_refused():
    # 2 x 64 GPT-2 at 0.9 with 64 x 64 tiles: attention c_proj is one tile whose share (about 0.1) rounds to none
    with pytest.raises(ValueError, match=r"no active tile at sparsity 0\.9.*all zero.*smaller `block_size`"):
        MSTController(tiny_gpt2(n_embd=64), _block(64, 0.9))
    assert MSTController(tiny_gpt2(n_embd=64), _block(16, 0.9)).masks.sparsity() == pytest.approx(0.9, abs=0.02)
