"""Loss spikes in a run's logged training loss: a run whose smoothed loss climbs well above its best so far is
unstable, and the report says so instead of ranking it silently.

The rule (stored with every record as ``spike_rule``): smooth the logged training losses with an exponential
moving average over ``EMA_LOGS`` logs (``alpha = 2 / (EMA_LOGS + 1)``, started at the first log), keep the running
minimum of the smoothed loss, and flag a spike where, after the first ``AFTER_FRACTION`` of the steps, the smoothed
loss rises more than ``threshold`` nats above that minimum. One spike is recorded per excursion (at its first log
above the line; a new one needs the loss back under it first). A non-finite loss is always a spike.
"""

import math

DEFAULT_THRESHOLD = 0.3  # nats
EMA_LOGS = 10
AFTER_FRACTION = 0.1


def spike_rule(threshold: float = DEFAULT_THRESHOLD) -> dict:
    """The rule's parameters, as stored in a record."""
    return {"threshold_nats": threshold, "ema_logs": EMA_LOGS, "after_fraction": AFTER_FRACTION,
            "signal": "training loss of the logged steps, EMA-smoothed, against its running minimum"}


def detect_spikes(losses, total_steps: int, threshold: float = DEFAULT_THRESHOLD) -> list[dict]:
    """``[{step, loss, min_so_far}]`` of every spike of ``losses`` (``(step, loss)`` pairs in step order) in a run
    of ``total_steps`` steps; ``loss`` and ``min_so_far`` are smoothed values (module docstring)."""
    if not (isinstance(threshold, (int, float)) and threshold > 0):
        raise ValueError(f"`--spike_threshold` must be a positive number of nats, got {threshold!r}.")
    alpha = 2.0 / (EMA_LOGS + 1)
    spikes, ema, low, above = [], None, math.inf, False
    for step, loss in losses:
        if not math.isfinite(loss):
            spikes.append({"step": int(step), "loss": float(loss), "min_so_far": low if math.isfinite(low) else None})
            break  # nothing after a non-finite loss means anything
        ema = loss if ema is None else ema + alpha * (loss - ema)
        low = min(low, ema)
        rising = ema - low > threshold
        if rising and not above and step > AFTER_FRACTION * total_steps:
            spikes.append({"step": int(step), "loss": ema, "min_so_far": low})
            above = True
        elif not rising:
            above = False
    return spikes


def record_spikes(record: dict, threshold: float = DEFAULT_THRESHOLD) -> dict:
    """``record`` with ``spike_rule``, ``spikes`` and ``unstable`` filled in from its ``train_loss`` where it has none
    (records written before the study flagged spikes are judged by the default rule)."""
    if "unstable" not in record:
        spikes = detect_spikes(record.get("train_loss", []), record.get("planned_steps", record["steps"]), threshold)
        record.update(spike_rule=spike_rule(threshold), spikes=spikes, unstable=bool(spikes))
    return record
