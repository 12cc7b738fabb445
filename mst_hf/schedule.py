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
"""

import math

WARMUP = "warmup"
ULTRA = "ultra"
RESTORATION = "restoration"
PHASES = (WARMUP, ULTRA, RESTORATION)
CURVES = ("cubic", "linear", "cosine")
DROP_FRACTION_SCHEDULES = ("cosine", "cosine_per_phase", "constant")


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def phase_bounds(total_steps: int, config) -> tuple[int, int]:
    """Return ``(ultra_start, restoration_start)``.

    Warm-up is ``[0, ultra_start)``, ultra-sparsification ``[ultra_start, restoration_start)``, restoration
    ``[restoration_start, T)``."""
    if total_steps < 1:
        raise ValueError(f"`total_steps` must be a positive number of optimizer steps, got {total_steps!r}.")
    warmup = _round_half_up(config.warmup_ratio * total_steps)
    restoration = _round_half_up(config.restoration_ratio * total_steps)
    restoration = min(restoration, total_steps - warmup)
    return warmup, total_steps - restoration


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
    the first step of each phase."""
    return step % config.update_interval == 0 or step in phase_starts(total_steps, config)


def update_steps(total_steps: int, config) -> list[int]:
    """All topology-update steps of a run, in order."""
    return [t for t in range(total_steps) if is_update_step(t, total_steps, config)]


def _last_update_step(total_steps: int, config) -> int:
    last = (total_steps - 1) // config.update_interval * config.update_interval
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
