"""What an example run reports beyond Trainer's own metrics: a per-step trace of the schedule, mask digests for
multi-process checks, the dense baseline, and ``summary.{json,md}`` with the schedule plot.

Used by ``examples/run_clm_mst.py``; nothing in the training path imports it. The FLOPs reported are the counted
matmul FLOPs of :mod:`mst_hf.flops` (weights at their mask density, attention at its pattern density), the
convention of the MST paper, not a measured time.
"""

import dataclasses
import json
import math
import os
import time

import numpy as np
from accelerate.utils import extract_model_from_parallel
from transformers import Trainer, TrainerCallback, set_seed
from transformers.utils import logging

from . import schedule
from .plan import plan_run

logger = logging.get_logger(__name__)

TRACE_NAME = "trace.json"
PLOT_NAME = "schedule.png"
SUMMARY_JSON, SUMMARY_MD = "summary.json", "summary.md"


def perplexity(loss: float) -> float:
    """``exp(loss)``, ``inf`` when it overflows."""
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def last_logged(log_history: list[dict], key: str):
    """The newest value of ``key`` in a Trainer ``log_history``, or ``None``."""
    return next((row[key] for row in reversed(log_history) if key in row), None)


# ------------------------------------------------------------------------------------------------ callbacks
class RunTrace(TrainerCallback):
    """Record the run step by step in the layout of ``mst_hf.plan.Plan.trace()``: entry ``t`` describes optimizer
    step ``t`` (the schedule's target sparsity, the sparsity of the masks in force during the step, its attention
    density, and the cumulative counted FLOPs through it). After a resume it starts at the resumed step."""

    KEYS = ("step", "target_sparsity", "sparsity", "attention_density", "mst_cumulative_flops",
            "dense_cumulative_flops")

    def __init__(self, controller):
        self.controller = controller
        self.trace = {key: [] for key in self.KEYS}
        self.in_force = None  # sparsity of the masks the next step runs with

    def on_train_begin(self, args, state, control, **kwargs):
        self.in_force = self.controller.masks.sparsity()  # after a resume has restored the masks

    def on_step_end(self, args, state, control, **kwargs):
        step, flops = state.global_step - 1, self.controller.flops.metrics()
        if self.in_force is None:
            self.in_force = self.controller.masks.sparsity()
        row = (step, schedule.target_sparsity(step, state.max_steps, self.controller.config), self.in_force,
               flops["mst/attention_density"], flops["mst/total_flops"], flops["mst/dense_total_flops"])
        for key, value in zip(self.KEYS, row):
            self.trace[key].append(value)
        self.in_force = self.controller.masks.sparsity()  # after this step's topology update, if any

    def arrays(self, total_steps: int) -> dict:
        """The trace as arrays plus ``phase_bounds``: the input of :func:`mst_hf.plotting.plot_schedule`."""
        return {**{k: np.asarray(v) for k, v in self.trace.items()},
                "phase_bounds": schedule.phase_bounds(total_steps, self.controller.config)}


class MaskDigestCallback(TrainerCallback):
    """After every topology update, append ``{"rank", "step", "digest"}`` (the SHA-256 of all masks) as one JSON
    line to ``PATH.rank<r>``, so that runs on several processes can be checked for identical masks."""

    def __init__(self, controller, path: str, rank: int):
        self.controller, self.path, self.rank = controller, f"{path}.rank{rank}", rank
        self.seen = len(controller.history)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        open(self.path, "w").close()

    def on_step_end(self, args, state, control, **kwargs):
        history = self.controller.history
        if len(history) > self.seen:
            with open(self.path, "a", encoding="utf-8") as f:
                for record in history[self.seen:]:
                    line = {"rank": self.rank, "step": record["step"], "digest": self.controller.masks.digest()}
                    f.write(json.dumps(line) + "\n")
            self.seen = len(history)


# ------------------------------------------------------------------------------------------------ dense baseline
class _PhaseScheduledTrainer(Trainer):
    """A plain `Trainer` whose learning rate follows an MST config's ``lr_schedule`` (dense weights, dense
    attention): the dense baseline of a run whose MST config replaces the Trainer's scheduler."""

    def __init__(self, *args, lr_config=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._lr_config = lr_config

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            from .recipe import phase_lr_scheduler

            self.lr_scheduler = phase_lr_scheduler(self.optimizer if optimizer is None else optimizer,
                                                   num_training_steps, self._lr_config,
                                                   self.args.get_warmup_steps(num_training_steps))
            self._created_lr_scheduler = True
        return self.lr_scheduler


def lr_schedule_name(mst_config, args) -> str:
    """The learning-rate schedule a run followed: the MST config's ``lr_schedule`` when set, else the Trainer's."""
    name = getattr(mst_config, "lr_schedule", None)
    if name is not None:
        return f"{name} (MSTConfig.lr_schedule)"
    return str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))


def train_dense_baseline(model_init, args, dense_total_flops=None, lr_config=None, **trainer_kwargs) -> dict:
    """Train and evaluate the dense baseline with a plain `transformers.Trainer` into ``args.output_dir/dense``:
    the model from ``model_init()``, called after ``set_seed(args.seed)`` (so it starts from the MST run's initial
    weights when that run seeded the same way), the same data and steps (``trainer_kwargs``). Returns its summary
    entry; ``dense_total_flops`` is its counted FLOPs (the MST run's dense count: the same count at full density).
    ``lr_config``: the MST run's config; when its ``lr_schedule`` is set, the baseline follows the same learning
    rate (otherwise it would be compared under a different schedule, which alone moves the loss)."""
    set_seed(args.seed)
    dense_args = dataclasses.replace(args, output_dir=os.path.join(args.output_dir, "dense"))
    if getattr(lr_config, "lr_schedule", None) is not None:
        trainer = _PhaseScheduledTrainer(model=model_init(), args=dense_args, lr_config=lr_config, **trainer_kwargs)
    else:
        trainer = Trainer(model=model_init(), args=dense_args, **trainer_kwargs)
    start = time.time()
    trainer.train()
    seconds = time.time() - start
    trainer.save_model()
    metrics = trainer.evaluate()
    return {
        "perplexity": perplexity(metrics["eval_loss"]),
        "eval_loss": metrics["eval_loss"],
        "token_accuracy": metrics.get("eval_accuracy"),
        "total_flops": dense_total_flops,
        "counted_flop_reduction": 1.0,
        "final_sparsity": 0.0,
        "train_seconds": seconds,
        "lr_schedule": lr_schedule_name(lr_config, dense_args),
    }


# ------------------------------------------------------------------------------------------------ the summary
def mst_summary(trainer, block_size: int, eval_metrics: dict | None = None, train_seconds: float | None = None):
    """The MST run's entry of the summary (``trainer``: an ``MSTTrainer``): evaluation, sparsity, topology updates
    and, after training, the counted and the planned FLOP reduction (the plan from :func:`mst_hf.plan.plan_run` for
    the same model, schedule and batch of ``block_size``-token sequences)."""
    controller, history = trainer.mst, trainer.state.log_history
    entry = {
        "final_sparsity": controller.masks.sparsity(),
        "layer_sparsities": controller.masks.layer_sparsities(),
        "topology_updates": len(controller.history),
        "train_seconds": train_seconds,
        "lr_schedule": lr_schedule_name(controller.config, trainer.args),
    }
    if eval_metrics:
        entry.update(perplexity=perplexity(eval_metrics["eval_loss"]), eval_loss=eval_metrics["eval_loss"],
                     token_accuracy=eval_metrics.get("eval_accuracy"))
    if train_seconds is not None:
        args = trainer.args
        tokens_per_step = (args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps
                           * block_size)
        plan = plan_run(extract_model_from_parallel(trainer.model), controller.config,
                        total_steps=trainer.state.max_steps, tokens_per_step=tokens_per_step, seq_len=block_size)
        entry.update(
            counted_flop_reduction=last_logged(history, "mst/flop_reduction"),
            total_flops=last_logged(history, "mst/total_flops"),
            dense_total_flops=last_logged(history, "mst/dense_total_flops"),
            planned_flop_reduction=plan.flop_reduction,
            tokens_per_step=tokens_per_step,
        )
    return entry


def write_trace(trace: RunTrace, output_dir: str, total_steps: int, title: str | None = None) -> None:
    """``trace.json`` and ``schedule.png`` (drawn by :func:`mst_hf.plotting.plot_schedule`) into ``output_dir``."""
    from .plotting import plot_schedule

    with open(os.path.join(output_dir, TRACE_NAME), "w", encoding="utf-8") as f:
        json.dump(trace.trace, f)
    if trace.trace["step"]:
        plot_schedule(trace.arrays(total_steps), os.path.join(output_dir, PLOT_NAME), title=title)


def _cell(run: dict, key: str, fmt: str) -> str:
    value = run.get(key)
    return fmt.format(value) if value is not None else "-"


def summary_markdown(summary: dict) -> str:
    """``summary.md``: the run and, with a dense baseline, both side by side."""
    runs = [("MST", summary["mst"])] + ([("dense", summary["dense"])] if summary.get("dense") else [])
    rows = [
        ("perplexity after training", "perplexity", "{:.2f}"),
        ("next-token accuracy", "token_accuracy", "{:.4f}"),
        ("training FLOPs (counted)", "total_flops", "{:.4e}"),
        ("FLOP reduction vs dense (counted)", "counted_flop_reduction", "{:.3f}x"),
        ("FLOP reduction vs dense (planned)", "planned_flop_reduction", "{:.3f}x"),
        ("final weight sparsity", "final_sparsity", "{:.4f}"),
        ("topology updates", "topology_updates", "{}"),
        ("learning-rate schedule", "lr_schedule", "{}"),
        ("training time (s)", "train_seconds", "{:.1f}"),
    ]
    untrained = summary.get("untrained_perplexity")
    lines = [
        "# MST run summary",
        "",
        f"{summary['model']}, {summary['parameters'] / 1e6:.2f}M parameters; {summary['data']}: "
        f"{summary['train_blocks']} training and {summary['eval_blocks']} evaluation blocks of "
        f"{summary['block_size']} tokens; {summary['max_steps']} optimizer steps of {summary['tokens_per_step']} "
        "tokens." + (f" Perplexity before training: {untrained:.1f}." if untrained is not None else ""),
    ]
    if summary.get("resumed_from"):
        lines.append("")
        lines.append(f"Resumed from `{summary['resumed_from']}`: the trace and the training time cover the steps "
                     "run after it; the FLOP totals cover the whole run.")
    lines += [
        "",
        "| | " + " | ".join(name for name, _ in runs) + " |",
        "|---|" + "---|" * len(runs),
        *[f"| {label} | " + " | ".join(_cell(run, key, fmt) for _, run in runs) + " |" for label, key, fmt in rows],
        "",
        f"Wall time of the whole script: {summary['wall_seconds']:.1f} s.",
        "",
        "FLOPs are counted matmul FLOPs (weights at their mask density, attention at its pattern density), not time:",
        "the masked weights run on dense kernels here, so the training times do not shrink with sparsity.",
        "",
    ]
    return "\n".join(lines)


def write_summary(output_dir: str, summary: dict) -> str:
    """Write ``summary.json`` and ``summary.md`` into ``output_dir``; return the markdown."""
    with open(os.path.join(output_dir, SUMMARY_JSON), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    markdown = summary_markdown(summary)
    with open(os.path.join(output_dir, SUMMARY_MD), "w", encoding="utf-8") as f:
        f.write(markdown)
    return markdown


# ------------------------------------------------------------------------------------------------ the machine
def describe_hardware() -> str:
    """One line naming where a run ran, for the record next to its numbers: the GPU, its driver, torch and CUDA
    (``"CPU <processor>, torch <version>"`` without CUDA)."""
    import platform
    import subprocess

    import torch

    if torch.cuda.is_available():
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True).stdout.strip()
        except OSError:
            driver = "?"
        name = torch.cuda.get_device_name(0)
        return f"{name} (driver {driver}), torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"CPU {platform.processor() or platform.machine()}, torch {torch.__version__}"


def package_versions() -> dict[str, str]:
    """The versions a run's numbers depend on: torch, transformers and Python."""
    import platform

    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}
