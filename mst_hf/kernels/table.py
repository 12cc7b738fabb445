"""The break-even table the kernel choice reads: which file, and its validation when it is read.

A table is the JSON that ``bench/blocksparse_linear.py`` writes::

    {"devices": {"NVIDIA H100 80GB HBM3": {
        "tokens": 16384,                                   # tokens per step the table was measured at
        "break_even": [{"n_in": 768, "n_out": 768, "block_size": 64, "break_even_density": 0.34}, ...],
        "measurements": [{"n_in": ..., "n_out": ..., "block_size": ..., "density": ..., "tokens": ...,
                          "dense_ms": ..., "block_ms": ...}, ...]}}}   # optional: the planner's time prediction

:func:`load_table` is the one reader: the controller (``weight_kernels="auto"``, at construction), the kernel choice
of :mod:`.dispatch` and the planner's ``--kernel-table`` all go through it. Every field they read is checked once,
when the file is read, and a bad one raises a ``ValueError`` naming the file, the device, the row and the field.
"""

import functools
import json
import math
import os

ENV = "MST_KERNEL_TABLE"
DEFAULT_TABLE = os.path.join(os.path.dirname(__file__), "breakeven.json")
FIX = ("Write a table with `python bench/blocksparse_linear.py --out DIR` (DIR/blocksparse_breakeven.json) or "
       f"correct the entry; unset {ENV} to use the table shipped with mst_hf.")

# field -> (what it must be, check); rows of "break_even" and of "measurements"
_POSITIVE_INT = ("a positive int", lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0)
_POSITIVE = ("a positive number", lambda v: _number(v) and v > 0)
_NON_NEGATIVE = ("a non-negative number", lambda v: _number(v) and v >= 0)
_FRACTION = ("a number in [0, 1]", lambda v: _number(v) and 0 <= v <= 1)
_OPTIONAL_MS = ("null or a non-negative number", lambda v: v is None or (_number(v) and v >= 0))
BREAK_EVEN_ROW = {"n_in": _POSITIVE_INT, "n_out": _POSITIVE_INT, "block_size": _POSITIVE_INT,
                  "break_even_density": _FRACTION}
MEASUREMENT_ROW = {"n_in": _POSITIVE_INT, "n_out": _POSITIVE_INT, "block_size": _POSITIVE_INT, "density": _FRACTION,
                   "tokens": _POSITIVE, "dense_ms": _NON_NEGATIVE, "block_ms": _NON_NEGATIVE}
OPTIONAL_MEASUREMENT_FIELDS = {"graph_dense_ms": _OPTIONAL_MS, "graph_block_ms": _OPTIONAL_MS}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def normalize_device_name(name: str) -> str:
    """Device names as keys: lower case, single spaces (``torch.cuda.get_device_name`` spellings)."""
    return " ".join(str(name).lower().split())


def table_path(path: str | None = None) -> str:
    """The break-even table in use: `path`, else ``$MST_KERNEL_TABLE``, else the one shipped in the package."""
    return os.path.abspath(path or os.environ.get(ENV) or DEFAULT_TABLE)


def _origin(path: str | None) -> str:
    if path:
        return ""
    return f" (named by {ENV})" if os.environ.get(ENV) else " (shipped with mst_hf)"


def load_table(path: str | None = None) -> dict:
    """``{normalised device name: table}`` of the break-even JSON :func:`table_path` names, validated (see the
    module docstring); a ``ValueError`` naming the file, the entry and the field when it is missing or malformed."""
    return _read(table_path(path), _origin(path))


def read_device_json(path: str, where: str, what: str, fix: str) -> dict:
    """The ``"devices"`` object of a per-GPU JSON table (``{"devices": {GPU name: entry}}``), keyed by the raw
    names; a ``ValueError`` that starts with ``where``, names the problem, the kind of file (``what``) and ``fix``,
    when the file is missing, is not JSON or lacks that object."""
    if not os.path.isfile(path):
        problem = "is a directory" if os.path.isdir(path) else "does not exist"
        raise ValueError(f"{where} {problem}: name {what}. {fix}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{where} is not valid JSON ({err}). {fix}") from err
    if not isinstance(data, dict) or not isinstance(data.get("devices"), dict):
        got = type(data).__name__ if not isinstance(data, dict) else f"an object with keys {sorted(data)}"
        raise ValueError(f'{where}: must be a JSON object {{"devices": {{GPU name: entry}}}}, got {got}. {fix}')
    return data["devices"]


@functools.cache
def _read(path: str, origin: str) -> dict:
    where = f"Kernel table {path}{origin}"
    devices = read_device_json(path, where, "a break-even JSON file", FIX)
    return {normalize_device_name(name): _check_device(table, f"{where}: devices[{name!r}]")
            for name, table in devices.items()}


def _check_device(table, where: str) -> dict:
    if not isinstance(table, dict):
        raise ValueError(f"{where} must be an object with `tokens` and `break_even`, got {type(table).__name__}. "
                         f"{FIX}")
    check_fields(table, {"tokens": _POSITIVE}, where)
    for key, spec, required in (("break_even", BREAK_EVEN_ROW, True), ("measurements", MEASUREMENT_ROW, False)):
        rows = table.get(key)
        if rows is None and not required:
            continue
        if not isinstance(rows, list):
            raise ValueError(f"{where}: `{key}` must be a list of rows, got {rows!r:.60}. {FIX}")
        for i, row in enumerate(rows):
            optional = OPTIONAL_MEASUREMENT_FIELDS if key == "measurements" else {}
            check_fields(row, spec, f"{where}.{key}[{i}]", optional)
    return table


def check_fields(row, spec: dict, where: str, optional: dict | None = None, fix: str = FIX) -> None:
    """``row`` is an object with every field of ``spec`` (``name -> (what it must be, test)``) passing its test, and
    every field of ``optional`` it has passing its own; else a ``ValueError`` naming ``where``, the field, ``fix``."""
    if not isinstance(row, dict):
        raise ValueError(f"{where} must be an object with {sorted(spec)}, got {row!r:.60}. {fix}")
    for name, (what, ok) in spec.items():
        if name not in row:
            raise ValueError(f"{where} has no `{name}` (it must be {what}). {fix}")
        if not ok(row[name]):
            raise ValueError(f"{where}: `{name}` must be {what}, got {row[name]!r}. {fix}")
    for name, (what, ok) in (optional or {}).items():
        if name in row and not ok(row[name]):
            raise ValueError(f"{where}: `{name}` must be {what}, got {row[name]!r}. {fix}")
