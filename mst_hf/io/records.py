"""The two JSON records beside the masks, read and validated: ``mst_config.json`` and ``mst_state.json``.

They are plain JSON, so a person can edit them; a value that no writer produces (a negative step, a sparsity above
1, a misspelt phase, a config field out of range) is refused with the file, the field, the value and the fix, before
anything is restored from it. The fields of ``mst_config.json`` are validated by :class:`MSTConfig` itself.
"""

import math
import os
import re

from .. import schedule
from ..config import MST_CONFIG_NAME, MSTConfig, saved_fields
from .files import read_json
from .formats import STATE_NAME

_FIX = "Restore the file from the same checkpoint (or resume from an earlier one); do not edit it by hand."


def _is_int(value, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_number(value, low: float, high: float = math.inf) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and low <= value <= high


def _refuse(path: str, key: str, value, expected: str):
    raise ValueError(f"{path!r}: `{key}` is {value!r}, expected {expected}. {_FIX}")


def _check_optional(path: str, data: dict, key: str, ok, expected: str) -> None:
    if data.get(key) is not None and not ok(data[key]):
        _refuse(path, key, data[key], expected)


def mst_config_fields() -> set[str]:
    """The names of the :class:`MSTConfig` fields stored in ``mst_config.json``."""
    return set(MSTConfig().mst_dict()) - {"model_type"}


def read_mst_config(path: str) -> dict:
    """``mst_config.json`` (a path or its directory) as a dict, after :class:`MSTConfig` validated its fields and the
    save information (``saved_at_step``, ``total_steps``, ``saved_in_phase``, ``hsa_active``) was checked."""
    path = os.path.join(path, MST_CONFIG_NAME) if os.path.isdir(path) else str(path)
    data = read_json(path)
    try:
        MSTConfig(**saved_fields(data, path))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path!r} holds an invalid MST config: {err} {_FIX}") from None
    _check_optional(path, data, "saved_at_step", lambda v: _is_int(v, 0), "an integer >= 0 (optimizer steps)")
    _check_optional(path, data, "total_steps", lambda v: _is_int(v, 1), "an integer >= 1 (the run's max_steps)")
    _check_optional(path, data, "saved_in_phase", lambda v: v in schedule.PHASES, f"one of {list(schedule.PHASES)}")
    _check_optional(path, data, "hsa_active", lambda v: isinstance(v, bool), "true or false")
    return data


def read_mst_state(path: str) -> dict:
    """``mst_state.json`` (a path or its directory) as a dict, after every value a resume uses was checked: steps
    are integers >= 0, the history a list of update records, the FLOP totals numbers >= 0, the sparsity in [0, 1]."""
    path = os.path.join(path, STATE_NAME) if os.path.isdir(path) else str(path)
    data = read_json(path)
    _check_optional(path, data, "last_update_step", lambda v: _is_int(v, 0), "an integer >= 0 or null")
    _check_optional(path, data, "saved_at_step", lambda v: _is_int(v, 0), "an integer >= 0 or null")
    _check_optional(path, data, "sparsity", lambda v: _is_number(v, 0.0, 1.0), "a number in [0, 1]")
    _check_optional(path, data, "masks_digest", lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v),
                    "the 64-hex-digit SHA-256 of the masks")
    _check_optional(path, data, "metrics", lambda v: isinstance(v, dict), "an object")
    flops = data.get("flops")
    if flops is not None:
        if not isinstance(flops, dict):
            _refuse(path, "flops", flops, "an object of FLOP totals")
        for key, value in flops.items():
            if value is not None and not _is_number(value, 0.0):
                _refuse(path, f"flops.{key}", value, "a finite number >= 0")
    history = data.get("history", [])
    if not isinstance(history, list) or not all(isinstance(r, dict) for r in history):
        _refuse(path, "history", history, "a list of update records (objects)")
    for i, record in enumerate(history):
        if not _is_int(record.get("step"), 0):
            _refuse(path, f"history[{i}].step", record.get("step"), "an integer >= 0")
    last, saved = data.get("last_update_step"), data.get("saved_at_step")
    if last is not None and saved is not None and last >= saved:
        _refuse(path, "last_update_step", last, f"a step before `saved_at_step` ({saved}): an update runs at a step "
                "that was then trained")
    return data
