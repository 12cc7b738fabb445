"""Validation of the recipe options of :class:`mst_hf.MSTConfig`: the learning-rate schedule aligned with the
phases, warm restoration of regrown connections (and the optimizer state it needs), the LM head's sparsity cap and
the frozen tail of the run.

Kept apart from ``config.py`` so that the config module stays one screenful per idea; every check raises
``ValueError``/``TypeError`` naming the field, the value and the fix. The options are described in
``docs/concepts.md`` (section "Recipe options"); their defaults reproduce the behaviour before they existed.
"""

import math

from . import schedule

REGROW_OPTIMIZER_STATES = ("zero", "warm", "restart")
REGROW_INITS = ("zero", "gradient")
OPTIMIZER_STATES = ("dense", "active")  # AdamW moments of every weight / of active tiles only (mst_hf.optim_active)
INITIAL_MASKS = ("auto", "random", "magnitude")  # mst_hf.initial_masks


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fraction(name: str, value, upper_open: bool = False, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not _number(value) or not (0.0 <= value < 1.0 if upper_open else 0.0 <= value <= 1.0):
        interval = "[0, 1)" if upper_open else "[0, 1]"
        none = " or None" if allow_none else ""
        raise ValueError(f"`{name}` must be a number in {interval}{none}, got {value!r}.")


def validate_recipe(cfg) -> None:
    """Check the recipe fields of ``cfg`` (an ``MSTConfig``) and how they fit the other fields."""
    if cfg.lr_schedule is not None and cfg.lr_schedule not in schedule.LR_SCHEDULES:
        raise ValueError(f"`lr_schedule` must be None (the Trainer's own scheduler) or one of "
                         f"{schedule.LR_SCHEDULES}, got {cfg.lr_schedule!r}.")
    _fraction("lr_floor", cfg.lr_floor)
    _fraction("lr_decay_start", cfg.lr_decay_start, allow_none=True)
    if cfg.lr_schedule == "wsd" and cfg.lr_decay_start is None and cfg.restoration_ratio == 0:
        raise ValueError(
            "`lr_schedule='wsd'` with `lr_decay_start=None` starts the decay where the restoration starts, but "
            "`restoration_ratio=0` leaves no restoration, so the learning rate would never decay: set "
            "`lr_decay_start` (a fraction of the run, e.g. 0.8) or use `lr_schedule='cosine_floor'`."
        )
    if cfg.regrow_optimizer_state not in REGROW_OPTIMIZER_STATES:
        raise ValueError(f"`regrow_optimizer_state` must be one of {REGROW_OPTIMIZER_STATES}, got "
                         f"{cfg.regrow_optimizer_state!r}.")
    if cfg.optimizer_state not in OPTIMIZER_STATES:
        raise ValueError(f"`optimizer_state` must be one of {OPTIMIZER_STATES}, got {cfg.optimizer_state!r}.")
    if cfg.optimizer_state == "active" and cfg.sparsity_structure != "block":
        raise ValueError(
            "`optimizer_state='active'` keeps AdamW moments per active tile, which needs block-structured masks: set "
            f"`sparsity_structure='block'` (got {cfg.sparsity_structure!r}) or `optimizer_state='dense'`."
        )
    if cfg.optimizer_state == "active" and cfg.regrow_optimizer_state != "zero":
        raise ValueError(
            f"`regrow_optimizer_state={cfg.regrow_optimizer_state!r}` sets per-element optimizer state of regrown "
            "weights, which `optimizer_state='active'` (moments per active tile, new tiles from zero) does not keep: "
            "set `regrow_optimizer_state='zero'` or `optimizer_state='dense'`."
        )
    if cfg.regrow_init not in REGROW_INITS:
        raise ValueError(f"`regrow_init` must be one of {REGROW_INITS}, got {cfg.regrow_init!r}.")
    if not _number(cfg.regrow_init_scale) or cfg.regrow_init_scale <= 0:
        raise ValueError(f"`regrow_init_scale` must be a positive number (a fraction of the layer's mean |w|, e.g. "
                         f"0.1), got {cfg.regrow_init_scale!r}.")
    _fraction("lm_head_max_sparsity", cfg.lm_head_max_sparsity, upper_open=True, allow_none=True)
    if cfg.lm_head_max_sparsity is not None and not cfg.sparsify_lm_head:
        raise ValueError(
            f"`lm_head_max_sparsity={cfg.lm_head_max_sparsity!r}` caps the LM head's sparsity, but "
            "`sparsify_lm_head=False` keeps the head dense: drop one of the two."
        )
    _fraction("stop_updates_ratio", cfg.stop_updates_ratio, upper_open=True)
    total = cfg.warmup_ratio + cfg.restoration_ratio + cfg.stop_updates_ratio
    if cfg.stop_updates_ratio > 0 and total > 1.0 + 1e-9:  # 1e-9: 0.1 + 0.2 + 0.7 > 1 in floats
        raise ValueError(
            f"`warmup_ratio` + `restoration_ratio` + `stop_updates_ratio` must not exceed 1 (the restoration ends "
            f"where the updates stop), got {cfg.warmup_ratio!r} + {cfg.restoration_ratio!r} + "
            f"{cfg.stop_updates_ratio!r} = {total!r}; shorten a phase or the frozen tail."
        )
    if cfg.initial_mask not in INITIAL_MASKS:
        raise ValueError(f"`initial_mask` must be one of {INITIAL_MASKS} (how the masks of step 0 are chosen), got "
                         f"{cfg.initial_mask!r}.")


def phase_lr_scheduler(optimizer, total_steps: int, cfg, warmup_steps: int = 0):
    """A ``torch.optim.lr_scheduler.LambdaLR`` of :func:`mst_hf.schedule.lr_multiplier` (``cfg.lr_schedule``,
    aligned with the phases of ``cfg``) over ``total_steps`` optimizer steps, after ``warmup_steps`` of linear
    warm-up. Used by ``MSTTrainer`` and by the example's dense baseline, so both follow the same learning rate."""
    from torch.optim.lr_scheduler import LambdaLR

    return LambdaLR(optimizer, lambda step: schedule.lr_multiplier(step, total_steps, cfg, warmup_steps))
