"""MSTTrainer end to end on tiny GPT-2 (Conv1D, tied head) and Llama (nn.Linear, GQA, untied head)."""

import math

import pytest
import torch
import transformers
from transformers import TrainerCallback, TrainingArguments

from mst_hf import MSTConfig, MSTTrainer, schedule
from mst_hf.io import write_model_card
from mst_hf.topology import active_count, allocate

from .helpers import tiny_gpt2, tiny_llama, toy_dataset

STEPS = 40


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=8, learning_rate=1e-2,
                logging_steps=5, report_to=[], save_strategy="no", use_cpu=True, weight_decay=0.1, seed=0,
                lr_scheduler_type="constant", disable_tqdm=True)
    base.update(kw)
    return TrainingArguments(**base)


def _cfg(**kw):
    base = dict(initial_sparsity=0.0, ultra_sparsity=0.8, final_sparsity=0.0, warmup_ratio=0.2,
                restoration_ratio=0.25, update_interval=5, hsa_pattern="dense")
    base.update(kw)
    return MSTConfig(**base)


class _Recorder(TrainerCallback):
    """After every optimizer step: pruned weights are exactly zero; keeps each layer's active count per update."""

    def __init__(self):
        self.trainer = None
        self.counts = {}

    def on_step_end(self, args, state, control, **kwargs):
        ctl = self.trainer.mst
        for name, t in ctl.targets.items():
            if t.param.detach()[~ctl.masks.masks[name]].any():
                raise AssertionError(f"pruned weight of {name} is non-zero after step {state.global_step}")
        if ctl.history and ctl.history[-1]["step"] == state.global_step - 1:
            self.counts[state.global_step - 1] = {n: ctl.masks.active(n) for n in ctl.targets}


def _train(model, tmp_path, cfg=None, **args_kw):
    cfg = cfg or _cfg()
    recorder = _Recorder()
    trainer = MSTTrainer(model, _args(tmp_path, **args_kw), mst_config=cfg, train_dataset=toy_dataset(),
                         eval_dataset=toy_dataset(16, seed=1), callbacks=[recorder])
    recorder.trainer = trainer
    trainer.train()
    return trainer, recorder


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_trainer_follows_schedule_and_learns(build, tmp_path):
    trainer, recorder = _train(build(), tmp_path)
    cfg = trainer.mst_config
    expected_updates = schedule.update_steps(STEPS, cfg)
    assert sorted(recorder.counts) == expected_updates
    shapes = [(t.n_in, t.n_out) for t in trainer.mst.targets.values()]
    for step, counts in recorder.counts.items():
        target = schedule.target_sparsity(step, STEPS, cfg)
        densities = allocate(shapes, target, cfg.sparsity_distribution)
        for (name, t), density in zip(trainer.mst.targets.items(), densities):
            assert abs(counts[name] - active_count(t.numel, density)) <= 1, (step, name)
    ultra = [r["sparsity"] for r in trainer.mst.history if r["phase"] == "ultra"]
    assert ultra and all(s == pytest.approx(0.8, abs=2e-3) for s in ultra)
    assert trainer.mst.history[-1]["sparsity"] == 0.0  # restoration ends dense
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < 0.75 * losses[0]
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"])


def test_logs_carry_mst_values(tmp_path):
    trainer, _ = _train(tiny_gpt2(), tmp_path, max_steps=12)
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all({"mst/sparsity", "mst/phase", "mst/drop_fraction"} <= set(h) for h in train_logs)
    assert all(isinstance(v, float) for h in train_logs for k, v in h.items() if k.startswith("mst/"))


def test_topology_updates_add_no_log_rows_their_values_come_with_the_next_training_row(tmp_path):
    """Updates at steps 0, 2, 5, 9, 10 of 12, logging every 5 steps: the rows stay on the grid (steps 5 and 10, then
    Trainer's final row), and each carries the updates since the previous one (drops and growth summed)."""
    trainer, _ = _train(tiny_gpt2(), tmp_path, max_steps=12)
    logs, history = trainer.state.log_history, trainer.mst.history
    assert [r["step"] for r in history] == [0, 2, 5, 9, 10]
    assert [h["step"] for h in logs] == [5, 10, 12]
    since = [[r for r in history if low <= r["step"] < high] for low, high in ((0, 5), (5, 10), (10, 12))]
    expected = [(rs[-1]["target_sparsity"], float(sum(r["dropped"] for r in rs)), float(sum(r["grown"] for r in rs)))
                for rs in since]
    assert [(h["mst/target_sparsity"], h["mst/dropped"], h["mst/grown"]) for h in logs] == expected


def test_gradient_accumulation_gives_the_same_masks(tmp_path):
    cfg = _cfg(grow_method="gradient")
    one, _ = _train(tiny_gpt2(), tmp_path / "a", cfg=cfg, max_steps=20, per_device_train_batch_size=8)
    four, _ = _train(tiny_gpt2(), tmp_path / "b", cfg=cfg, max_steps=20, per_device_train_batch_size=2,
                     gradient_accumulation_steps=4)
    assert len(one.mst.history) == len(four.mst.history) > 3
    assert one.mst.masks.digest() == four.mst.masks.digest()


def test_random_growth_is_deterministic_for_a_seed(tmp_path):
    cfg = _cfg(grow_method="mixed", final_sparsity=0.5)
    a, _ = _train(tiny_gpt2(), tmp_path / "a", cfg=cfg, max_steps=15)
    b, _ = _train(tiny_gpt2(), tmp_path / "b", cfg=cfg, max_steps=15)
    c, _ = _train(tiny_gpt2(), tmp_path / "c", cfg=_cfg(grow_method="mixed", final_sparsity=0.5, seed=5), max_steps=15)
    assert a.mst.masks.digest() == b.mst.masks.digest() != c.mst.masks.digest()


def test_bf16_training_keeps_zeros(tmp_path):
    trainer, recorder = _train(tiny_llama(), tmp_path, bf16=True, max_steps=10)
    assert len(recorder.counts) >= 2  # the recorder also checked the zeros after every step


@pytest.mark.parametrize("flag", ["is_deepspeed_enabled", "is_fsdp_enabled"])
def test_unsupported_setups_are_refused(flag, tmp_path, monkeypatch):
    original = transformers.Trainer.__init__

    def patched(self, *args, **kwargs):
        original(self, *args, **kwargs)
        setattr(self, flag, True)

    monkeypatch.setattr(transformers.Trainer, "__init__", patched)
    with pytest.raises(NotImplementedError, match="DeepSpeed|FSDP"):
        MSTTrainer(tiny_gpt2(), _args(tmp_path), mst_config=_cfg(), train_dataset=toy_dataset())


def test_warm_regrowth_under_fp16_loss_scaling_is_refused(tmp_path, monkeypatch):
    """Warm Adam moments would be built from loss-scaled fp16 gradients: refused, naming the field and the fix."""
    original = transformers.Trainer.__init__

    def patched(self, *args, **kwargs):  # fp16 cannot be set on a CPU-only machine: flip it after Trainer's checks
        original(self, *args, **kwargs)
        self.args.fp16 = True

    monkeypatch.setattr(transformers.Trainer, "__init__", patched)
    with pytest.raises(ValueError, match="regrow_optimizer_state='warm'.*bf16=True"):
        MSTTrainer(tiny_gpt2(), _args(tmp_path), mst_config=_cfg(regrow_optimizer_state="warm"),
                   train_dataset=toy_dataset())
    MSTTrainer(tiny_gpt2(), _args(tmp_path), mst_config=_cfg(), train_dataset=toy_dataset())  # zeroed moments: fine


def test_model_without_targets_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no weight matrix"):
        MSTTrainer(tiny_gpt2(), _args(tmp_path), mst_config=_cfg(target_modules=["nope"], sparsify_lm_head=False),
                   train_dataset=toy_dataset())


def test_mst_config_type_is_checked(tmp_path):
    with pytest.raises(TypeError, match="mst_config"):
        MSTTrainer(tiny_gpt2(), _args(tmp_path), mst_config={"ultra_sparsity": 0.9}, train_dataset=toy_dataset())


def test_untied_llama_head_is_a_target_and_tied_gpt2_head_counted_once():
    from mst_hf import find_targets

    llama = find_targets(tiny_llama(), MSTConfig())
    assert "lm_head.weight" in llama and llama["lm_head.weight"].is_lm_head and not llama["lm_head.weight"].tied
    gpt2 = find_targets(tiny_gpt2(), MSTConfig())
    heads = [t for t in gpt2.values() if t.is_lm_head]
    assert len(heads) == 1 and heads[0].tied and heads[0].name == "transformer.wte.weight"
    assert not any(t.is_lm_head for t in find_targets(tiny_gpt2(), MSTConfig(sparsify_lm_head=False)).values())


def test_log_lines_describe_the_step_just_taken(tmp_path):
    """Phase, HSA flag and attention density on one log line all belong to the same (last) optimizer step."""
    cfg = _cfg(hsa_pattern="local", hsa_window=4)
    trainer, _ = _train(tiny_gpt2(), tmp_path, cfg=cfg, max_steps=20, logging_steps=1)
    lines = [h for h in trainer.state.log_history if "loss" in h]
    assert len(lines) == 20
    for h in lines:
        in_ultra = h["mst/phase"] == 1.0
        assert h["mst/hsa"] == float(in_ultra) and (h["mst/attention_density"] < 1.0) == in_ultra, h


def test_train_called_twice_runs_a_new_schedule_and_counts_only_its_flops(tmp_path):
    trainer, _ = _train(tiny_gpt2(), tmp_path, max_steps=10)
    first = trainer.mst.flops.total_flops
    first_updates = [r["step"] for r in trainer.mst.history]
    trainer.train()
    assert trainer.mst.flops.steps == 10 and trainer.mst.flops.total_flops > 0
    assert trainer.mst.flops.total_flops == pytest.approx(first, rel=0.2)  # one run's worth, not two
    assert [r["step"] for r in trainer.mst.history] == first_updates  # the same schedule again, once
    assert trainer.mst.flops.tokens == 10 * 8 * 32


def test_model_card_results_table_and_learning_rate_schedule_are_those_of_the_run(tmp_path):
    """Trainer's results table keeps its own columns (the mst/* values, in the MST section, would be split into
    misnamed, colliding columns), and the card names the MST learning-rate schedule that replaced the Trainer's."""
    args = _args(tmp_path, max_steps=10, eval_strategy="steps", eval_steps=5, lr_scheduler_type="cosine")
    trainer = MSTTrainer(tiny_gpt2(), args, mst_config=_cfg(lr_schedule="wsd"), train_dataset=toy_dataset(),
                         eval_dataset=toy_dataset(16, seed=1))
    trainer.train()
    trainer.create_model_card()
    write_model_card(str(tmp_path), {"lr_schedule": "wsd"})  # the MST section written again (as a push does)
    text = (tmp_path / "README.md").read_text(encoding="utf-8")
    header = text.split("### Training results", 1)[1].strip().splitlines()[0]
    assert [c.strip() for c in header.strip("|").split("|")] == ["Training Loss", "Epoch", "Step", "Validation Loss"]
    assert "- lr_scheduler_type: wsd (MSTConfig.lr_schedule, in place of the Trainer's cosine)\n" in text
    assert any("mst/sparsity" in row for row in trainer.state.log_history)  # the logs keep them


def _saved_with_sparse_attention(path):
    """A tiny GPT-2 saved with the local pattern (window 4) on, as a checkpoint of an HSA phase is."""
    from mst_hf import configure_hsa

    model = tiny_gpt2()
    configure_hsa(model, pattern="local", window=4, active=True)
    model.save_pretrained(path)
    return path


def test_evaluation_only_keeps_the_sparse_attention_the_model_was_saved_with(tmp_path):
    from transformers import AutoModelForCausalLM, Trainer

    path = _saved_with_sparse_attention(tmp_path / "model")
    data, args = toy_dataset(16, seed=1), _args(tmp_path / "out")

    def loss(trainer_cls, model, **kw):
        return trainer_cls(model, args, eval_dataset=data, **kw).evaluate()["eval_loss"]

    sparse = loss(Trainer, AutoModelForCausalLM.from_pretrained(path, attn_implementation="mst_hsa"))
    dense = loss(Trainer, AutoModelForCausalLM.from_pretrained(path))
    cfg = _cfg(hsa_pattern="local", hsa_window=8)  # another window: the saved one (4) is kept for evaluation
    assert loss(MSTTrainer, AutoModelForCausalLM.from_pretrained(path), mst_config=cfg) == sparse != dense


def test_a_saved_sparse_attention_state_gives_way_to_the_schedule_when_training(tmp_path):
    """With training data the schedule decides from the start; an evaluation-only trainer given data later hands
    the attention back to the schedule when it trains (the ultra phase of this run is steps 1-2 of 4)."""
    from transformers import AutoModelForCausalLM

    from mst_hf import get_hsa_state

    path = _saved_with_sparse_attention(tmp_path / "model")
    cfg = _cfg(hsa_pattern="local", hsa_window=8)
    training = MSTTrainer(AutoModelForCausalLM.from_pretrained(path), _args(tmp_path / "a", max_steps=4),
                          mst_config=cfg, train_dataset=toy_dataset())
    assert (get_hsa_state(training.model)["active"], get_hsa_state(training.model)["window"]) == (False, 8)
    later = MSTTrainer(AutoModelForCausalLM.from_pretrained(path), _args(tmp_path / "b", max_steps=4, logging_steps=1),
                       mst_config=cfg, eval_dataset=toy_dataset(16, seed=1))
    assert get_hsa_state(later.model)["active"]
    later.train_dataset = toy_dataset()
    later.train()
    on = [h["mst/hsa"] for h in later.state.log_history if "loss" in h]
    assert on == [float(schedule.hsa_active(s, 4, cfg)) for s in range(4)] == [0.0, 1.0, 1.0, 0.0]
    assert (get_hsa_state(later.model)["active"], get_hsa_state(later.model)["window"]) == (False, 8)


def test_load_best_model_at_end_saves_what_the_best_checkpoint_was_trained_with(tmp_path):
    """The best evaluation (the higher loss, by request: step 4) falls in the HSA phase ([0, 4) of 8), the last step
    is dense. The saved folder then describes step 4 (MST files, config.json's attention state, the card), so that
    loading it as the card says reproduces the best checkpoint's logits."""
    import json

    import torch
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM

    cfg = _cfg(ultra_sparsity=0.5, final_sparsity=0.5, warmup_ratio=0.0, restoration_ratio=0.5, update_interval=2,
               hsa_pattern="local", hsa_window=4)
    args = _args(tmp_path, max_steps=8, eval_strategy="steps", eval_steps=4, save_strategy="steps", save_steps=4,
                 load_best_model_at_end=True, metric_for_best_model="loss", greater_is_better=True)
    trainer = MSTTrainer(tiny_gpt2(), args, mst_config=cfg, train_dataset=toy_dataset(),
                         eval_dataset=toy_dataset(16, seed=1))
    trainer.train()
    best = tmp_path / "checkpoint-4"
    assert trainer.state.best_model_checkpoint == str(best)
    trainer.save_model()
    trainer.create_model_card()
    saved = json.loads((tmp_path / "mst_config.json").read_text())
    assert (saved["saved_at_step"], saved["hsa_active"], saved["trained_to_step"]) == (4, True, 8)
    card = ModelCard.load(tmp_path / "README.md").text
    assert "| Sparse attention pattern at save | on:" in card
    assert "| Weights from | the best checkpoint, step 4" in card
    ids = torch.stack([r["input_ids"] for r in toy_dataset(4, seed=2)])

    def logits(path, **kw):
        with torch.no_grad():
            return AutoModelForCausalLM.from_pretrained(path, **kw)(input_ids=ids).logits

    as_trained = logits(best, attn_implementation="mst_hsa")
    assert torch.equal(logits(tmp_path, attn_implementation="mst_hsa"), as_trained)
    assert not torch.allclose(logits(best), as_trained)  # the pattern matters here


def test_a_trainer_built_only_to_evaluate_prunes_nothing(tmp_path):
    model = tiny_gpt2()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = MSTTrainer(model, _args(tmp_path), mst_config=_cfg(initial_sparsity=0.5),
                         eval_dataset=toy_dataset(8))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert trainer.evaluate()["eval_loss"] > 0
