"""`MSTTrainer`: a `transformers.Trainer` that trains with Mixed Sparsity Training.

Thin wiring only: the masks, the schedule and the attention live in :class:`mst_hf.controller.MSTController`;
this class calls it at the right points of Trainer's own loop (never a copy of the loop):

* ``training_step``: ``MSTController.before_forward`` before each micro-batch (attention pattern, token count) and
  ``MSTController.after_backward`` after the backward of the last micro-batch of an optimizer step (gradients
  accumulated and all-reduced: FLOP count, topology update when due, gradient masking);
* ``on_optimizer_step`` (callback): pruned weights back to exactly zero;
* ``_save`` / ``_load_from_checkpoint`` / ``_load_best_model``: MST files next to the Trainer's (see
  :mod:`mst_hf.io.checkpoint`), validated before the Trainer loads any weight;
* ``push_to_hub`` / ``create_model_card`` / ``_push_from_checkpoint``: the MST files, tags and card section go to
  the Hub with the model (see :mod:`mst_hf.io.hub`).
"""

import os
import shutil

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import HubStrategy
from transformers.utils import logging

from . import attention, sharding
from .config import MST_CONFIG_NAME, MSTConfig
from .controller import MSTController
from .defaults import run_config, sequence_length
from .io import hub
from .io.checkpoint import (
    MASKS_NAME,
    STATE_NAME,
    check_mst_checkpoint,
    restore_mst_checkpoint,
    save_mst_files,
    saved_attention,
)
from .optim import ElementwiseAdamW
from .optim_active import TILE_INDEX, ActiveTileAdamW, track_masks
from .presets import DEFAULT_PRESET
from .targets import PEFT_REFUSAL, has_peft_layers, unwrap_model

logger = logging.get_logger(__name__)


def _saved_sparse_attention(model) -> dict | None:
    """The HSA state a model was saved with (``config.mst_hsa``), when its sparse pattern is on; else ``None``."""
    config = getattr(unwrap_model(model), "config", None)
    state = getattr(config, attention.HSA_NAME, None)
    if not isinstance(state, dict) or state.get("active") is not True:
        return None
    return attention.validate_hsa_state(dict(state))


class _MSTCallback(TrainerCallback):
    def __init__(self, controller: MSTController):
        self.controller = controller

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.controller.after_optimizer_step(optimizer)


class MSTTrainer(Trainer):
    """``MSTTrainer(model, args, mst_config=MSTConfig(...), **trainer_kwargs)``; everything else as `Trainer`."""

    def __init__(self, model=None, args=None, *trainer_args, mst_config: MSTConfig | None = None, **kwargs):
        if mst_config is not None and not isinstance(mst_config, MSTConfig):
            raise TypeError(f"`mst_config` must be an mst_hf.MSTConfig, got {type(mst_config).__name__}.")
        if has_peft_layers(model):  # before Trainer touches the model (MSTController checks again)
            raise NotImplementedError(PEFT_REFUSAL)
        super().__init__(model, args, *trainer_args, **kwargs)
        self._refuse_unsupported_parallelism()
        if mst_config is None:  # the default preset, scaled to this run, as the example and the planner choose it
            mst_config = run_config(max_steps=self.args.max_steps, seq_len=sequence_length(self.train_dataset),
                                    model=self.model)
            logger.info("MSTTrainer without `mst_config`: the default preset %r scaled to this run (%s).",
                        DEFAULT_PRESET, mst_config.mst_dict())
        if self.args.fp16 and mst_config.regrow_optimizer_state == "warm":
            # the topology update runs before GradScaler unscales: warm moments would hold loss-scaled gradients
            raise ValueError(
                "regrow_optimizer_state='warm' builds Adam moments from the gradients of the update step, which are "
                "still multiplied by fp16's loss scale when MSTTrainer sees them; got fp16=True. Train with bf16=True "
                "(no loss scaling) or set `regrow_optimizer_state='zero'`."
            )
        saved_attention = _saved_sparse_attention(self.model) if self.train_dataset is None else None
        # a trainer built only to evaluate (no training data) prunes nothing: the model is scored as it was loaded
        self.mst = MSTController(self.model, mst_config, initialize_masks=self.train_dataset is not None)
        self.mst_config = self.mst.config  # the controller's (sparse attention switched off for a model without any)
        self._mst_runs = 0
        self._weights_from = None  # the checkpoint whose weights the model holds (load_best_model_at_end)
        self._update_logs: dict[str, float] = {}  # topology updates since the last training log row
        self._run_attention = None  # (the run's HSA state) while evaluation keeps a saved sparse pattern
        if saved_attention is not None:
            self._keep_saved_attention(saved_attention)
        self.add_callback(_MSTCallback(self.mst))

    def _keep_saved_attention(self, saved: dict) -> None:
        """Evaluation only (no training data): a model saved with the sparse attention pattern on (a checkpoint of
        an HSA phase) keeps it, as it was trained, instead of the run's schedule state (off until a training step).
        :meth:`train` puts the run's state back, so the schedule decides once it trains."""
        model = unwrap_model(self.model)
        dense_run = self.mst.config.hsa_pattern == "dense"  # then the model's state is still the saved one
        self._run_attention = {**saved, "active": False} if dense_run else attention.get_hsa_state(model)
        attention.configure_hsa(model, **saved)
        if getattr(model.config, "_attn_implementation", None) != attention.HSA_NAME:
            model.set_attn_implementation(attention.HSA_NAME)
        logger.info("MSTTrainer without training data: the model keeps the sparse attention it was saved with (%s).",
                    saved)

    def _refuse_unsupported_parallelism(self) -> None:
        """DeepSpeed and FSDP1 are refused; FSDP2 (``fully_shard``, DTensor parameters) is supported."""
        if self.is_deepspeed_enabled:
            raise NotImplementedError(
                "MSTTrainer does not support DeepSpeed: ZeRO hides the dense gradients the topology update needs. "
                "Train with plain DDP (`accelerate launch --num_processes N`) or, to shard weights and optimizer "
                "state, with FSDP2 (`fsdp_version: 2`, see docs/fsdp2.md) instead."
            )
        if not self.is_fsdp_enabled:
            return
        fsdp_version = getattr(getattr(self.accelerator.state, "fsdp_plugin", None), "fsdp_version", 1)
        if fsdp_version != 2:
            raise NotImplementedError(
                f"MSTTrainer supports FSDP2 only, got fsdp_version={fsdp_version!r}: FSDP1 flattens parameters, so "
                "masks cannot follow them. Set `fsdp_version: 2` in the accelerate config (or "
                "`fsdp_config={'version': 2}` in TrainingArguments); see docs/fsdp2.md."
            )

    # ------------------------------------------------------------------ the training step
    def training_step(self, model, inputs, num_items_in_batch=None):
        step, total = self.state.global_step, self.state.max_steps
        self.mst.before_forward(step, total, inputs, world_size=self.accelerator.num_processes)
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.sync_gradients:  # the last micro-batch of the optimizer step
            record = self.mst.after_backward(step, total, self.optimizer)
            if record is not None:  # logged with the next training row (no row of its own: see `log`)
                pending = self._update_logs
                pending["mst/target_sparsity"] = record["target_sparsity"]
                for key in ("dropped", "grown"):
                    pending[f"mst/{key}"] = pending.get(f"mst/{key}", 0.0) + float(record[key])
        return loss

    # ------------------------------------------------------------------ logging
    def mst_metrics(self) -> dict[str, float]:
        """The MST values added to every log line (:meth:`MSTController.metrics`; scalars only, so TensorBoard can
        plot them). All describe the optimizer step that ran last, like the loss they are logged with."""
        return self.mst.metrics(self.state.global_step, self.state.max_steps)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Trainer's log row plus :meth:`mst_metrics`; a training row (``loss``, or the final ``train_loss``) also
        gets the topology updates run since the previous one: ``mst/target_sparsity`` of the last update, and
        ``mst/dropped`` / ``mst/grown`` summed over them (weights, or tiles with block masks)."""
        if self.state.max_steps:
            logs = {**logs, **self.mst_metrics()}
            if "loss" in logs or "train_loss" in logs:
                logs.update(self._update_logs)
                self._update_logs = {}
        super().log(logs, *args, **kwargs)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """``Trainer.train``, with the MST FLOP totals (``mst/total_flops``, ...) added to the returned metrics.

        Called again without ``resume_from_checkpoint``, Trainer starts a new run at step 0 (new optimizer and
        learning-rate schedule): so does MST (the schedule runs again on the current weights and masks, and the
        FLOP totals count the new run only)."""
        if self._mst_runs and not resume_from_checkpoint:
            logger.warning("MSTTrainer.train() called again: a new MST run starts at step 0 from the current weights "
                           "and masks; its FLOP totals do not include the earlier run's. To continue a run instead, "
                           "pass resume_from_checkpoint.")
            self.mst.reset_run()
        if self._run_attention is not None:  # evaluation kept a saved sparse pattern: training follows the schedule
            attention.configure_hsa(unwrap_model(self.model), **self._run_attention)
            self._run_attention, self.mst.hsa_on = None, None
        self._mst_runs += 1
        self._weights_from, self._update_logs = None, {}
        output = super().train(resume_from_checkpoint, *args, **kwargs)
        output.metrics.update(self.mst.flops.metrics())
        return output

    # ------------------------------------------------------------------ optimizer and learning rate
    def create_optimizer(self, model=None):
        """Trainer's optimizer, with the Trainer's AdamW settings (learning rate, betas, epsilon and weight-decay
        groups) given to a replacement where ``mst_config`` needs one: :class:`mst_hf.optim.ElementwiseAdamW` for
        ``regrow_optimizer_state="restart"`` (each regrown weight's bias correction restarts at step 1);
        :class:`mst_hf.optim_active.ActiveTileAdamW` for ``optimizer_state="active"`` (moments of active tiles only),
        which then tracks every target weight at its current tiles."""
        active = self.mst_config.optimizer_state == "active"
        if ((not active and self.mst_config.regrow_optimizer_state != "restart") or self.optimizer is not None
                or self.optimizer_cls_and_kwargs is not None):
            optimizer = super().create_optimizer(model)
        else:
            replacement = ActiveTileAdamW if active else ElementwiseAdamW
            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model if model is None else model)
            if cls is not torch.optim.AdamW:
                optim = getattr(self.args.optim, "value", self.args.optim)
                setting, fallback = (("optimizer_state='active'", "optimizer_state='dense'") if active else
                                     ("regrow_optimizer_state='restart'", "regrow_optimizer_state='zero'"))
                raise ValueError(
                    f"{setting} replaces torch's AdamW by {replacement.__module__}.{replacement.__name__}, but "
                    f"TrainingArguments.optim={optim!r} selects {cls.__name__}. Use optim='adamw_torch' "
                    f"(or 'adamw_torch_fused') or set `{fallback}`."
                )
            settings = {k: kwargs[k] for k in ("lr", "betas", "eps") if k in kwargs}
            self.optimizer_cls_and_kwargs = (replacement, settings)
            try:
                optimizer = super().create_optimizer(model)
            finally:
                self.optimizer_cls_and_kwargs = None
        if active:  # also an optimizer passed in, or one kept from an earlier train(): its tiles follow the masks
            track_masks(optimizer, self.mst.masks, self.mst.block)
        return optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """Trainer's scheduler, unless ``mst_config.lr_schedule`` is set: then a ``LambdaLR`` of
        :func:`mst_hf.schedule.lr_multiplier` over the run's optimizer steps, with the warm-up of
        ``TrainingArguments.warmup_steps`` (a count, or a fraction of the run below 1)."""
        if self.mst_config.lr_schedule is None or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        from .recipe import phase_lr_scheduler

        if self.args.lr_scheduler_type != "linear":
            logger.warning("mst_config.lr_schedule=%r replaces lr_scheduler_type=%r; set lr_schedule=None to use the "
                           "Trainer's scheduler.", self.mst_config.lr_schedule, str(self.args.lr_scheduler_type))
        warmup = self.args.get_warmup_steps(num_training_steps)
        self.lr_scheduler = phase_lr_scheduler(self.optimizer if optimizer is None else optimizer,
                                               num_training_steps, self.mst_config, warmup)
        self._created_lr_scheduler = True
        return self.lr_scheduler

    # ------------------------------------------------------------------ checkpoints
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """Trainer's files, then the MST files (masks, config, state) in the same folder: inside ``save_model``, so
        they are on disk before any Hub upload of the folder starts. Pruned weights are set to ``+0.0`` first (a
        guard: the optimizers that skip the per-step re-masking already keep them there)."""
        if state_dict is None:
            self.mst.follow_params()
            self.mst.masks.apply_to_weights()
        super()._save(output_dir, state_dict=state_dict)
        self._save_mst_files(output_dir)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Trainer's ``save_model``; under FSDP2 with ``SHARDED_STATE_DICT`` Trainer writes no model files (the
        distributed checkpoint holds the weights) and skips :meth:`_save`, so the MST files are written here."""
        super().save_model(output_dir, _internal_call)
        if self.is_fsdp_enabled and "FULL_STATE_DICT" not in str(self.accelerator.state.fsdp_plugin.state_dict_type):
            self._save_mst_files(output_dir)

    def _save_mst_files(self, output_dir: str | None) -> None:
        """Under FSDP2 every rank gathers the sharded masks (Trainer calls this on every rank then) and one writes
        the same files as an unsharded run."""
        self.mst.follow_params()
        sharded = sharding.any_sharded(self.mst.masks.params.values())
        if self.args.should_save or sharded:
            output_dir = output_dir if output_dir is not None else self.args.output_dir
            metrics = hub.collect_metrics(self.state.log_history, self.mst)
            save_mst_files(output_dir, self.mst, self.state.global_step, self.state.max_steps, metrics,
                           write=self.args.should_save, weights_from=self._weights_from)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Validate the checkpoint's MST files (refusing a missing, corrupt or mismatched mask file before anything is
        modified), let Trainer load the weights, then restore masks and MST state. Runs before the optimizer exists
        and before the first step; Trainer restores the optimizer moments afterwards."""
        checkpoint = check_mst_checkpoint(resume_from_checkpoint, self.mst, args=self.args)
        super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        self.mst.follow_params()  # FSDP2: Trainer resumes after sharding the model
        restore_mst_checkpoint(self.mst, checkpoint)

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        """Trainer's, refusing optimizer state saved per active tile (``optimizer_state="active"``) for a run whose
        optimizer keeps dense moments (its first step would fail on the shapes)."""
        super()._load_optimizer_and_scheduler(checkpoint)
        state = getattr(self.optimizer, "state", None) or {}
        if self.mst_config.optimizer_state != "active" and any(TILE_INDEX in s for s in state.values()):
            raise ValueError(
                f"Checkpoint {checkpoint!r} holds optimizer state of active tiles only (saved with "
                "optimizer_state='active'), but this run has `optimizer_state='dense'`: resume with "
                "`optimizer_state='active'` (a dense checkpoint, in turn, resumes under either)."
            )

    def _load_best_model(self) -> None:
        """``load_best_model_at_end``: the best checkpoint's masks and attention state (``config.mst_hsa``: the sparse
        pattern on or off, as its weights were trained) come with its weights, and what is saved afterwards (MST files,
        ``config.json``, model card) describes that checkpoint, not the run's last step. The FLOP totals stay the
        run's (what training cost)."""
        checkpoint = check_mst_checkpoint(self.state.best_model_checkpoint, self.mst)
        saved = saved_attention(checkpoint.path)
        super()._load_best_model()
        self.mst.follow_params()
        self.mst.masks.load_state_dict(checkpoint.masks, apply=True)
        self.mst.flops.invalidate()
        if saved is not None and attention.get_hsa_state(unwrap_model(self.model)) is not None:
            attention.configure_hsa(unwrap_model(self.model), **saved)
            self.mst.hsa_on = saved["active"]  # what the model now runs (a training step re-applies the schedule)
        self._weights_from = checkpoint

    # ------------------------------------------------------------------ the Hub
    def push_to_hub(self, *args, **kwargs):
        """``Trainer.push_to_hub`` with the tags ``mst`` and ``sparse``; the MST files are written by ``save_model``
        and the card section by :meth:`create_model_card`."""
        model = self.accelerator.unwrap_model(self.model)
        if hasattr(model, "add_model_tags"):
            model.add_model_tags(list(hub.MST_TAGS))
        return super().push_to_hub(*args, **kwargs)

    def create_model_card(self, language=None, license=None, tags=None, **kwargs) -> None:
        """Trainer's card plus the MST section (schedule, final sparsity, counted FLOP reduction, perplexity)."""
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        tags += [t for t in hub.MST_TAGS if t not in tags]
        history = self.state.log_history  # Trainer's results table names columns after the words of each metric:
        self.state.log_history = [{k: v for k, v in row.items() if not k.startswith("mst/")} for row in history]
        try:  # the mst/* values (in the MST section) would garble it
            super().create_model_card(language=language, license=license, tags=tags, **kwargs)
        finally:
            self.state.log_history = history
        if self.is_world_process_zero():
            metrics = hub.collect_metrics(self.state.log_history, self.mst)
            info = hub.controller_card_info(self.mst, self.state.global_step, self.state.max_steps, metrics,
                                            weights_from=self._weights_from)
            hub.write_model_card(self.args.output_dir, info)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Trainer copies only its own model files from the checkpoint into ``output_dir`` before uploading it: copy
        the MST files too, so the Hub's masks always match its weights (only when Trainer pushes this time: the
        same conditions as Trainer's, so an upload in progress never sees new masks beside old weights)."""
        in_progress = getattr(self, "push_in_progress", None)
        busy = in_progress is not None and not in_progress.is_done()
        pushes = self.args.hub_strategy != HubStrategy.END and (self.args.hub_always_push or not busy)
        if pushes and self.is_world_process_zero() and os.path.abspath(checkpoint_folder) != os.path.abspath(
            self.args.output_dir
        ):
            os.makedirs(self.args.output_dir, exist_ok=True)
            for name in (MASKS_NAME, MST_CONFIG_NAME, STATE_NAME):
                source = os.path.join(checkpoint_folder, name)
                if os.path.isfile(source):
                    shutil.copy(source, os.path.join(self.args.output_dir, name))
        super()._push_from_checkpoint(checkpoint_folder)
