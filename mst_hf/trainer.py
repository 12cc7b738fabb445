"""`MSTTrainer`: a `transformers.Trainer` that trains with Mixed Sparsity Training.

Thin wiring only: the masks, the schedule and the attention live in :class:`mst_hf.controller.MSTController`;
this class calls it at the right points of Trainer's own loop (never a copy of the loop):

* ``training_step``: before the forward, hybrid sparse attention on/off for the step; after the backward of the
  last micro-batch of an optimizer step (gradients accumulated and all-reduced), the topology update when due and
  the gradient masking;
* ``on_optimizer_step`` (callback): pruned weights back to exactly zero;
* ``_save`` / ``_load_from_checkpoint``: MST files next to the Trainer's.
"""

import os

from transformers import Trainer, TrainerCallback

from . import schedule
from .checkpoint import MASKS_NAME, load_mst_files, save_mst_files
from .config import MSTConfig
from .controller import MSTController

PHASE_INDEX = {name: i for i, name in enumerate(schedule.PHASES)}


class _MSTCallback(TrainerCallback):
    def __init__(self, controller: MSTController):
        self.controller = controller

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.controller.after_optimizer_step()


class MSTTrainer(Trainer):
    """``MSTTrainer(model, args, mst_config=MSTConfig(...), **trainer_kwargs)``; everything else as `Trainer`."""

    def __init__(self, model=None, args=None, *trainer_args, mst_config: MSTConfig | None = None, **kwargs):
        if mst_config is None:
            mst_config = MSTConfig()
        if not isinstance(mst_config, MSTConfig):
            raise TypeError(f"`mst_config` must be an mst_hf.MSTConfig, got {type(mst_config).__name__}.")
        super().__init__(model, args, *trainer_args, **kwargs)
        if self.is_deepspeed_enabled:
            raise NotImplementedError(
                "MSTTrainer does not support DeepSpeed: ZeRO hides the dense gradients the topology update needs. "
                "Train with plain DDP (`accelerate launch --num_processes N`) instead."
            )
        if self.is_fsdp_enabled:
            raise NotImplementedError(
                "MSTTrainer does not support FSDP: sharded parameters would need sharded masks. "
                "Train with plain DDP (`accelerate launch --num_processes N`) instead."
            )
        self.mst_config = mst_config
        self.mst = MSTController(self.model, mst_config)
        self.add_callback(_MSTCallback(self.mst))

    # ------------------------------------------------------------------ the training step
    def training_step(self, model, inputs, num_items_in_batch=None):
        step, total = self.state.global_step, self.state.max_steps
        self.mst.before_forward(step, total)
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.sync_gradients:
            record = self.mst.after_backward(step, total, self.optimizer)
            if record is not None:
                self.log(
                    {
                        "mst/target_sparsity": record["target_sparsity"],
                        "mst/dropped": float(record["dropped"]),
                        "mst/grown": float(record["grown"]),
                    }
                )
        return loss

    # ------------------------------------------------------------------ logging
    def mst_metrics(self) -> dict[str, float]:
        """The MST values added to every log line (scalars only, so TensorBoard can plot them)."""
        step, total = self.state.global_step, max(self.state.max_steps, 1)
        return {
            "mst/sparsity": self.mst.masks.sparsity() if self.mst.history else self.mst.masks.sparsity(),
            "mst/phase": float(PHASE_INDEX[schedule.phase(min(step, total - 1), total, self.mst_config)]),
            "mst/drop_fraction": schedule.drop_fraction(min(step, total - 1), total, self.mst_config),
            "mst/hsa": float(bool(self.mst.hsa_on)),
        }

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self.state.max_steps:
            logs = {**logs, **self.mst_metrics()}
        super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------------ checkpoints
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict=state_dict)
        if self.args.should_save:
            output_dir = output_dir if output_dir is not None else self.args.output_dir
            step = self.state.global_step
            phase = schedule.phase(min(step, self.state.max_steps - 1), self.state.max_steps, self.mst_config) \
                if self.state.max_steps else None
            save_mst_files(output_dir, self.mst, step=step, phase=phase)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        if os.path.isfile(os.path.join(resume_from_checkpoint, MASKS_NAME)):
            load_mst_files(resume_from_checkpoint, self.mst)
        elif self.mst_config.initial_sparsity > 0 or self.mst.history:
            raise ValueError(
                f"Checkpoint {resume_from_checkpoint!r} has no {MASKS_NAME}: it was not written by MSTTrainer, so "
                "the sparse topology cannot be restored. Resume from a checkpoint saved by MSTTrainer."
            )
