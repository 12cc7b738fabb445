"""The example's dense baseline (`mst_hf.reporting.train_dense_baseline`) follows the MST run's learning rate."""

import pytest
from transformers import TrainerCallback, TrainingArguments

from mst_hf import MSTConfig, schedule
from mst_hf.reporting import train_dense_baseline

from .helpers import tiny_gpt2, toy_dataset

STEPS, PEAK, WARMUP = 20, 1e-2, 2


class _LrLog(TrainerCallback):
    def __init__(self):
        self.lrs = []

    def on_step_begin(self, args, state, control, lr_scheduler=None, **kwargs):
        self.lrs.append(lr_scheduler.get_last_lr()[0])


def _baseline(tmp_path, lr_config):
    log = _LrLog()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=4,
                             learning_rate=PEAK, warmup_steps=WARMUP, lr_scheduler_type="cosine", report_to=[],
                             save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
    entry = train_dense_baseline(tiny_gpt2, args, lr_config=lr_config, train_dataset=toy_dataset(),
                                 eval_dataset=toy_dataset(8), callbacks=[log])
    return entry, log.lrs


def test_dense_baseline_follows_the_mst_learning_rate_schedule(tmp_path):
    cfg = MSTConfig(lr_schedule="wsd", hsa_pattern="dense")
    entry, lrs = _baseline(tmp_path, cfg)
    expected = [PEAK * schedule.lr_multiplier(s, STEPS, cfg, WARMUP) for s in range(STEPS)]
    assert lrs == pytest.approx(expected, rel=1e-9)
    assert entry["lr_schedule"].startswith("wsd")


def test_dense_baseline_keeps_the_trainer_schedule_without_an_mst_one(tmp_path):
    entry, lrs = _baseline(tmp_path, MSTConfig(hsa_pattern="dense"))  # lr_schedule=None: the Trainer's cosine
    wsd = [PEAK * schedule.lr_multiplier(s, STEPS, MSTConfig(lr_schedule="wsd"), WARMUP) for s in range(STEPS)]
    assert entry["lr_schedule"] == "cosine" and lrs[-1] < 0.1 * PEAK and lrs != pytest.approx(wsd)


def test_run_record_names_the_machine_and_the_versions():
    import platform

    import torch
    import transformers

    from mst_hf.reporting import describe_hardware, package_versions

    expected = {"torch": torch.__version__, "transformers": transformers.__version__,
                "python": platform.python_version()}
    assert package_versions() == expected
    assert f"torch {torch.__version__}" in describe_hardware()
