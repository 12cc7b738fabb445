"""The three-phase sparsity schedule (Sparsity Variation) as pure functions of the optimizer step.

No torch and no transformers here: a plan of a whole run can be printed before anything is built. Every function
takes ``(step, total_steps, config)`` where ``step`` is the 0-based optimizer step about to be taken, ``total_steps``
the run's number of optimizer steps ``T`` and ``config`` any object with the fields of :class:`mst_hf.MSTConfig`.

Phases, by ratio of ``T`` (``Tw = round(warmup_ratio * T)``, ``Tr = round(restoration_ratio * T)``):

* warm-up ``[0, Tw)``: ``s(t) = s_0 + (s_u - s_0) * f_w(t / Tw)`` with ``f_w(p) = 1 - (1 - p)^3`` for the cubic curve
  (Zhu & Gupta 2017), i.e. ``s_u + (s_0 - s_u) * (1 - t/Tw)^3``;
* ultra-sparsification ``[Tw, T - Tr)``: ``s(t) = s_u``;
* restoration ``[T - Tr, T)``: the time mirror ``s = s_u + (s_f - s_u) * f_r(tau)`` with ``f_r(tau) = tau^3``.

``tau`` runs over the restoration's *topology-update steps*: it is 0 at the phase start and 1 at the last update step
of the run, so the last update really reaches ``final_sparsity`` (with ``tau`` measured against the phase length the
last update would stop short of it and a run meant to end dense would end sparse).

With ``stop_updates_ratio`` the last ``Ts = round(stop_updates_ratio * T)`` steps have no topology update (as in
RigL) and the restoration ends where they start: it is ``[T - Ts - Tr, T - Ts)``, then the masks stay frozen.

:func:`lr_multiplier` is the learning-rate schedule aligned with these phases (``lr_schedule``), a factor of the
peak learning rate for ``torch.optim.lr_scheduler.LambdaLR``.
"""

import math

WARMUP = "warmup"
ULTRA = "ultra"
RESTORATION = "restoration"
PHASES = (WARMUP, ULTRA, RESTORATION)
CURVES = ("cubic", "linear", "cosine")
DROP_FRACTION_SCHEDULES = ("cosine", "cosine_per_phase", "constant")
LR_SCHEDULES = ("cosine_floor", "wsd")


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def frozen_steps(total_steps: int, config) -> int:
    """``Ts = round(stop_updates_ratio * T)``: the last steps of the run, in which no topology update happens."""
    return _round_half_up(getattr(config, "stop_updates_ratio", 0.0) * total_steps)


def update_end(total_steps: int, config) -> int:
    """``T - Ts``: topology updates happen only at steps before it; the masks are frozen from it on."""
    warmup = _round_half_up(config.warmup_ratio * total_steps)
    return total_steps - min(frozen_steps(total_steps, config), total_steps - warmup)


def phase_bounds(total_steps: int, config) -> tuple[int, int]:
    """Return ``(ultra_start, restoration_start)``.

    Warm-up is ``[0, ultra_start)``, ultra-sparsification ``[ultra_start, restoration_start)``, restoration
    ``[restoration_start, T)``. With ``stop_updates_ratio`` the restoration moves earlier so that it ends where the
    updates stop: ``restoration_start = T - Ts - Tr``, and the frozen tail ``[T - Ts, T)`` counts as restoration
    (as the ultra phase when there is no restoration)."""
    if total_steps < 1:
        raise ValueError(f"`total_steps` must be a positive number of optimizer steps, got {total_steps!r}.")
    warmup = _round_half_up(config.warmup_ratio * total_steps)
    end = update_end(total_steps, config)
    restoration = _round_half_up(config.restoration_ratio * total_steps)
    restoration = min(restoration, end - warmup)
    return warmup, (end - restoration if restoration > 0 else total_steps)


def phase(step: int, total_steps: int, config) -> str:
    """Name of the phase that optimizer step ``step`` belongs to: ``"warmup"``, ``"ultra"`` or ``"restoration"``."""
    ultra_start, restoration_start = phase_bounds(total_steps, config)
    if step < ultra_start:
        return WARMUP
    if step < restoration_start:
        return ULTRA
    return RESTORATION


def phase_starts(total_steps: int, config) -> list[int]:
    """The first step of every non-empty phase (a topology update always happens there)."""
    ultra_start, restoration_start = phase_bounds(total_steps, config)
    starts = [0] if ultra_start > 0 else []
    if restoration_start > ultra_start:
        starts.append(ultra_start)
    if total_steps > restoration_start:
        starts.append(restoration_start)
    return starts


def curve_fraction(name: str, progress: float, mirrored: bool = False) -> float:
    """Fraction of the way from a phase's start value to its end value after ``progress`` in [0, 1] of the phase.

    ``cubic``: ``1 - (1 - p)^3`` (fast first), mirrored ``p^3`` (fast last); ``linear``: ``p``;
    ``cosine``: ``(1 - cos(pi p)) / 2`` (symmetric, so mirroring changes nothing).
    """
    p = min(max(progress, 0.0), 1.0)
    if name == "cubic":
        return p**3 if mirrored else 1.0 - (1.0 - p) ** 3
    if name == "linear":
        return p
    if name == "cosine":
        return 0.5 * (1.0 - math.cos(math.pi * p))
    raise ValueError(f"Unknown sparsity curve {name!r}; choose one of {CURVES}.")


def is_update_step(step: int, total_steps: int, config) -> bool:
    """True when the topology is updated after the backward of ``step``: every ``update_interval`` steps and at
    the first step of each phase, except in the frozen tail ``[T - Ts, T)`` (``stop_updates_ratio``)."""
    if step >= update_end(total_steps, config):
        return False
    return step % config.update_interval == 0 or step in phase_starts(total_steps, config)


def update_steps(total_steps: int, config) -> list[int]:
    """All topology-update steps of a run, in order."""
    return [t for t in range(total_steps) if is_update_step(t, total_steps, config)]


def _last_update_step(total_steps: int, config) -> int:
    last = (update_end(total_steps, config) - 1) // config.update_interval * config.update_interval
    return max(last, phase_bounds(total_steps, config)[1])


def target_sparsity(step: int, total_steps: int, config) -> float:
    """Target global sparsity ``s(t)`` of the weights (formulas in the module docstring)."""
    ultra_start, restoration_start = phase_bounds(total_steps, config)
    s0, su, sf = config.initial_sparsity, config.ultra_sparsity, config.final_sparsity
    if step < ultra_start:
        return s0 + (su - s0) * curve_fraction(config.warmup_curve, step / ultra_start)
    if step < restoration_start:
        return su
    span = _last_update_step(total_steps, config) - restoration_start
    tau = 1.0 if span <= 0 else (step - restoration_start) / span
    return su + (sf - su) * curve_fraction(config.restoration_curve, tau, mirrored=True)


def drop_fraction(step: int, total_steps: int, config) -> float:
    """Fraction ``zeta(t)`` of active connections dropped (and regrown) at a topology update.

    ``cosine``: ``zeta_0 / 2 * (1 + cos(pi t / T))`` (RigL); ``cosine_per_phase``: the same cosine restarted at each
    phase over the phase's length; ``constant``: ``zeta_0``.
    """
    zeta0, kind = config.drop_fraction, config.drop_fraction_schedule
    if kind == "constant":
        return zeta0
    if kind == "cosine":
        return 0.5 * zeta0 * (1.0 + math.cos(math.pi * step / total_steps))
    if kind == "cosine_per_phase":
        ultra_start, restoration_start = phase_bounds(total_steps, config)
        start, end = {
            WARMUP: (0, ultra_start),
            ULTRA: (ultra_start, restoration_start),
            RESTORATION: (restoration_start, total_steps),
        }[phase(step, total_steps, config)]
        return 0.5 * zeta0 * (1.0 + math.cos(math.pi * (step - start) / max(end - start, 1)))
    raise ValueError(f"Unknown `drop_fraction_schedule` {kind!r}; choose one of {DROP_FRACTION_SCHEDULES}.")


def grow_method(step: int, total_steps: int, config) -> str:
    """Name of the grow criterion used at ``step`` (``config.grow_method`` may be one name or a dict phase -> name)."""
    method = config.grow_method
    if isinstance(method, dict):
        return method[phase(step, total_steps, config)]
    return method


def hsa_active(step: int, total_steps: int, config) -> bool:
    """True when the sparse attention pattern is on at ``step`` (its phase is listed in ``hsa_phases``)."""
    if config.hsa_pattern == "dense":
        return False
    return phase(step, total_steps, config) in config.hsa_phases


def describe(step: int, total_steps: int, config) -> dict:
    """Everything the schedule says about one step, as a plain dict (for logs and plans)."""
    return {
        "step": step,
        "phase": phase(step, total_steps, config),
        "target_sparsity": target_sparsity(step, total_steps, config),
        "drop_fraction": drop_fraction(step, total_steps, config),
        "update": is_update_step(step, total_steps, config),
        "grow_method": grow_method(step, total_steps, config),
        "hsa_active": hsa_active(step, total_steps, config),
    }


def lr_decay_start(total_steps: int, config, warmup_steps: int = 0) -> int:
    """First step of the learning-rate decay: for ``"wsd"`` ``round(lr_decay_start * T)``, or the start of the
    restoration when ``lr_decay_start`` is ``None``; for ``"cosine_floor"`` the end of the warm-up. Never before
    ``warmup_steps``."""
    start = warmup_steps
    if config.lr_schedule == "wsd":
        fraction = getattr(config, "lr_decay_start", None)
        start = phase_bounds(total_steps, config)[1] if fraction is None else _round_half_up(fraction * total_steps)
    return max(start, warmup_steps)


def lr_multiplier(step: int, total_steps: int, config, warmup_steps: int = 0) -> float:
    """Learning rate of optimizer step ``step`` as a fraction of the peak, for ``config.lr_schedule``.

    * warm-up ``[0, W)`` (``W = warmup_steps``, from ``TrainingArguments``): ``t / W``, as transformers' own
      schedulers;
    * ``"cosine_floor"``: ``f + (1 - f) (1 + cos(pi p)) / 2`` with ``p = (t - W) / (T - 1 - W)``, so the last step
      runs at the floor ``f = lr_floor``;
    * ``"wsd"`` (warmup-stable-decay): 1 until the decay start ``D`` (:func:`lr_decay_start`: by default where the
      restoration starts, so the decay follows the restoration of the weights), then linear to ``f`` at the last
      step: ``1 - (1 - f) (t - D) / (T - 1 - D)``.

    A custom loop gets the same schedule with
    ``LambdaLR(optimizer, lambda t: lr_multiplier(t, total_steps, mst_config, warmup_steps))``."""
    kind = getattr(config, "lr_schedule", None)
    if kind not in LR_SCHEDULES:
        raise ValueError(f"`lr_schedule` must be one of {LR_SCHEDULES} to compute a learning-rate multiplier, got "
                         f"{kind!r} (None leaves the learning rate to the Trainer's own scheduler).")
    if step < warmup_steps:
        return step / warmup_steps
    floor = config.lr_floor
    start = lr_decay_start(total_steps, config, warmup_steps)
    if step < start:
        return 1.0
    progress = min((step - start) / max(total_steps - 1 - start, 1), 1.0)
    if kind == "cosine_floor":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - (1.0 - floor) * progress
