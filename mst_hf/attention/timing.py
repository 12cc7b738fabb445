"""Measured attention time per step: the sparse pattern's kernel and SDPA causal, from a table shipped with mst_hf.

The table (``mst_hf/attention/times.json``) holds, per GPU, the forward + backward time of one attention layer as
``bench/attention.py`` measures it: ``auto``'s choice of kernel for each HSA pattern, and SDPA with
``is_causal=True`` (flash) in the same run, at a few sequence lengths::

    {"devices": {"NVIDIA H200": {
        "heads": 12, "head_dim": 64, "dtype": "bf16", "tokens": 32768,      # the measured shape, tokens per row
        "window": 128, "stride": 128, "block": 128,                          # the patterns' sizes
        "source": "docs/results/attention_triton.md", "date": "2026-11-29 05:32 UTC", ...,
        "rows": [{"seq_len": 4096, "batch": 8, "pattern": "local_strided", "kernel": "triton",
                  "ms": 0.652, "sdpa_causal_ms": 1.84, "density": 0.0691}, ...]}}}

It is written from the benchmark's Markdown output by :func:`parse_benchmark` (``tools/attention_table.py`` for the
committed results, ``bench/attention.py --json`` on your GPU), so each number is one that a committed run printed.
:func:`load_times` is the one reader; a bad field raises a ``ValueError`` naming the file, the device, the row and
the field. :func:`attention_ms` predicts the time of one training step's attention from it; :func:`plan_attention`
does so per phase of a plan (`mst_hf.predict` prints it).
"""

import functools
import json
import math
import os
import re
from dataclasses import dataclass, field

from .. import schedule
from ..kernels.table import check_fields, normalize_device_name, read_device_json
from .patterns import PATTERNS, HSASpec

DEFAULT_TIMES = os.path.join(os.path.dirname(__file__), "times.json")
FIX = ("Regenerate the shipped table with `python tools/attention_table.py`, write one for your GPU with "
       "`python bench/attention.py --out T.md --json PATH`, or correct the entry.")
FACTOR = 2.0  # a length further than this factor from every measured one is not predicted
SIZES = {"local": ("window",), "strided": ("stride",), "local_strided": ("window", "stride"), "fixed": ("block",),
         "dense": ()}  # the sizes each pattern's time depends on

_INT = ("a positive int", lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0)
_MS = ("a positive number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
       and math.isfinite(v) and v > 0)
_TEXT = ("a non-empty string", lambda v: isinstance(v, str) and v.strip() != "")
_DENSITY = ("a number in (0, 1]", lambda v: _MS[1](v) and v <= 1)
DEVICE_FIELDS = {"heads": _INT, "head_dim": _INT, "dtype": _TEXT, "tokens": _INT, "window": _INT, "stride": _INT,
                 "block": _INT, "source": _TEXT, "date": _TEXT}
ROW_FIELDS = {"seq_len": _INT, "batch": _INT, "pattern": (f"one of {PATTERNS}", lambda v: v in PATTERNS),
              "kernel": _TEXT, "ms": _MS, "sdpa_causal_ms": _MS, "density": _DENSITY}


# --------------------------------------------------------------------------- the table: written, read, checked


def parse_benchmark(text: str, source: str) -> tuple[str, dict]:
    """``(GPU name, device entry)`` from the Markdown ``bench/attention.py`` writes: its header line (``date: ...;
    GPU: ...; H=12, D=64, bf16, window=128, ...``) and the ``auto -> KERNEL`` rows of its table (an ``OOM`` cell is
    no measurement and is skipped). ``source`` is recorded as the entry's ``source``."""
    header = next((line for line in text.splitlines() if line.startswith("date:")), None)
    if header is None:
        raise ValueError(f"{source}: no `date: ...; GPU: ...` header line; is it bench/attention.py output?")

    def find(pattern, name):
        m = re.search(pattern, header)
        if m is None:
            raise ValueError(f"{source}: the header line has no {name} ({pattern!r}): {header!r}")
        return m.group(1).strip()

    entry = {"heads": int(find(r"\bH=(\d+)", "head count")), "head_dim": int(find(r"\bD=(\d+)", "head dim")),
             "dtype": find(r"\b(bf16|fp16|fp32)\b", "dtype"), "tokens": 0,
             **{k: int(find(rf"\b{k}=(\d+)", k)) for k in ("window", "stride", "block")},
             "source": source, "date": find(r"date: ([^;]+)", "date"),
             "software": "; ".join(p.strip() for p in header.split(";") if p.strip().startswith(("torch", "triton"))),
             "timing": header.split(";")[-1].strip(), "rows": []}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 10 or not cells[0].isdigit() or not cells[3].startswith("auto -> ") or cells[4] == "OOM":
            continue
        try:
            entry["rows"].append({"seq_len": int(cells[0]), "batch": int(cells[1]), "pattern": cells[2],
                                  "kernel": cells[3].removeprefix("auto -> "), "ms": float(cells[4]),
                                  "sdpa_causal_ms": float(cells[5]), "density": float(cells[7])})
        except ValueError as err:
            raise ValueError(f"{source}: cannot read the row {line!r} ({err}).") from err
    tokens = {r["seq_len"] * r["batch"] for r in entry["rows"]}
    if len(tokens) != 1:
        raise ValueError(f"{source}: rows at different tokens per step {sorted(tokens)} (or none): one table is one "
                         "`--tokens` setting.")
    entry["tokens"] = tokens.pop()
    return find(r"GPU: ([^;]+)", "GPU"), entry


def dump_times(devices: dict) -> str:
    """The table's JSON text: one line per row, so a re-measured row is a one-line diff."""
    parts = []
    for name, entry in devices.items():
        head = {k: v for k, v in entry.items() if k != "rows"}
        rows = ",\n".join("   " + json.dumps(r) for r in entry["rows"])
        parts.append(f" {json.dumps(name)}: {json.dumps(head)[:-1]}, \"rows\": [\n{rows}\n  ]}}")
    return '{"devices": {\n' + ",\n".join(parts) + "\n}}\n"


def times_path(path: str | None = None) -> str:
    """The attention time table in use: ``path``, else the one shipped in the package."""
    return os.path.abspath(path or DEFAULT_TIMES)


def load_times(path: str | None = None) -> dict:
    """``{normalised GPU name: entry}`` of the table :func:`times_path` names, validated (see the module docstring);
    a ``ValueError`` naming the file, the entry and the field when it is missing or malformed."""
    return _read(times_path(path))


@functools.cache
def _read(path: str) -> dict:
    where = f"Attention time table {path}"
    devices = read_device_json(path, where, "an attention time JSON file", FIX)
    return {normalize_device_name(name): _check_device(entry, f"{where}: devices[{name!r}]")
            for name, entry in devices.items()}


def _check_device(entry, where: str) -> dict:
    check_fields(entry, DEVICE_FIELDS, where, fix=FIX)
    rows = entry.get("rows")
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{where}: `rows` must be a non-empty list of measured rows, got {rows!r:.60}. {FIX}")
    seen, sdpa = set(), {}
    for i, row in enumerate(rows):
        check_fields(row, ROW_FIELDS, f"{where}.rows[{i}]", fix=FIX)
        key = (row["seq_len"], row["pattern"])
        if key in seen:
            raise ValueError(f"{where}.rows[{i}]: a second row for `pattern` {key[1]!r} at `seq_len` {key[0]}: keep "
                             f"one. {FIX}")
        seen.add(key)
        if sdpa.setdefault(row["seq_len"], row["sdpa_causal_ms"]) != row["sdpa_causal_ms"]:
            raise ValueError(f"{where}.rows[{i}]: `sdpa_causal_ms` {row['sdpa_causal_ms']} differs from "
                             f"{sdpa[row['seq_len']]} of another row at `seq_len` {row['seq_len']} (one run, one "
                             f"baseline per length). {FIX}")
    return entry


# --------------------------------------------------------------------------- one step's attention


@dataclass(frozen=True)
class AttentionTime:
    """Predicted fwd+bwd attention ms of one step on one GPU: ``sparse_ms`` with the pattern on in its layers (SDPA
    causal in the others), ``sdpa_ms`` with SDPA causal in every layer; None: no measurement (``reason`` says why)."""

    sparse_ms: float | None
    sdpa_ms: float | None
    measured_seq_len: int | None = None
    kernel: str | None = None  # what `auto` ran for the pattern in the measured row
    reason: str | None = None


def attention_ms(gpu: str, pattern: str | HSASpec, seq_len: int, tokens: float, heads: int, head_dim: int,
                 layers: int, dropout: float = 0.0, table_path: str | None = None) -> AttentionTime:
    """Forward + backward attention time of one training step (``tokens`` tokens on one GPU, sequences of
    ``seq_len``) of a model with ``layers`` attention layers of ``heads`` query heads of ``head_dim``, on ``gpu``.

    ``pattern``: a pattern name (every layer sparse, the measured sizes) or an `HSASpec` (its ``layers``,
    ``"all"``, ``"alternate"`` or indices, pick the sparse layers; the others run SDPA causal, as the attention
    does). Steps:

    1. the table's entry for ``gpu`` (names compared lower case, single spaces);
    2. the measured length nearest to ``seq_len`` in log distance (a tie goes to the shorter one, whose
       speed-ups are the smaller); none within a factor 2: no measurement (no extrapolation);
    3. per layer, the row's ms (the pattern under ``auto``) and its ``sdpa_causal_ms``, times
       ``tokens / (seq_len * batch)`` of the row, ``heads / measured heads`` and ``head_dim / measured head_dim``;
    4. sparse layers at the pattern's time, the others at SDPA's; ``sdpa_ms`` is every layer at SDPA's.

    Assumptions, each an approximation: time linear in the tokens of a step at a fixed length (whole sequences;
    micro-batching and host overhead ignored); linear in the heads; linear in ``head_dim`` (the kernels' tiles
    change with it, so this one is rougher); at a length that is not measured, the nearest one's time per token,
    although SDPA causal's time per token grows with the length (1.84 ms at 4096, 6.65 at 16384 for the same
    tokens on the H200) while the sparse kernels' barely does: up to a factor 2 away the error can approach 2x,
    which is why :class:`AttentionTime` names the length used. Key/value heads were as many as query heads (GQA
    not measured; taken at the query heads' time), the dtype the table's. Not predicted (None, with the reason),
    since the measured kernel would not be the one that runs: a window, stride or block the pattern uses other
    than the measured one; ``head_split``; a forced ``backend``; attention dropout (triton and flex have none);
    ``head_dim`` over 128 for a row that ran triton."""
    spec = pattern if isinstance(pattern, HSASpec) else HSASpec(pattern=pattern)
    for name, value in (("seq_len", seq_len), ("heads", heads), ("head_dim", head_dim), ("layers", layers)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
    if isinstance(tokens, bool) or not isinstance(tokens, (int, float)) or not tokens > 0:
        raise ValueError(f"`tokens` must be a positive number of tokens per step on one GPU, got {tokens!r}.")
    path = times_path(table_path)
    entry = load_times(table_path).get(normalize_device_name(gpu))
    if entry is None:
        known = ", ".join(sorted(e for e in load_times(table_path))) or "none"
        return AttentionTime(None, None, reason=f"no measurement for GPU {gpu!r} in {path} (GPUs there: {known})")
    if dropout:
        return AttentionTime(None, None, reason=f"attention dropout {dropout} was not measured (the table's runs "
                             "had none, and with dropout `auto` cannot run triton or flex); set `attn_pdrop` / "
                             "`attention_dropout` of the model config to 0")
    lengths = sorted({r["seq_len"] for r in entry["rows"]})
    near = min(lengths, key=lambda n: (abs(math.log(n / seq_len)), n))
    if abs(math.log(near / seq_len)) > math.log(FACTOR) + 1e-12:
        return AttentionTime(None, None, reason=f"no measurement within a factor {FACTOR:g} of seq_len {seq_len} "
                             f"on {gpu} (measured: {', '.join(map(str, lengths))})")
    at = [r for r in entry["rows"] if r["seq_len"] == near]
    scale = heads / entry["heads"] * head_dim / entry["head_dim"] * tokens / (at[0]["seq_len"] * at[0]["batch"])
    sdpa_layer = at[0]["sdpa_causal_ms"] * scale
    n_sparse = len(spec.sparse_layers(layers)) if spec.pattern != "dense" else 0
    sdpa_ms = layers * sdpa_layer
    row = next((r for r in at if r["pattern"] == spec.pattern), None)
    why = None
    if n_sparse == 0:
        return AttentionTime(sdpa_ms, sdpa_ms, near, "sdpa_causal")
    if row is None:
        why = f"pattern {spec.pattern!r} not measured at {near} tokens"
    elif bad := [f"{k} {getattr(spec, k)} (measured {entry[k]})" for k in SIZES[spec.pattern]
                 if getattr(spec, k) != entry[k]]:
        why = f"{spec.pattern} with {', '.join(bad)} not measured"
    elif spec.head_split:
        why = "head_split not measured (it rules out the triton kernel)"
    elif spec.backend != "auto":
        why = f"backend {spec.backend!r} not measured (the table has `auto`'s choice)"
    elif row["kernel"] == "triton" and head_dim > 128:
        why = f"head_dim {head_dim} > 128 rules out the triton kernel the measured row ran"
    if why:
        return AttentionTime(None, sdpa_ms, near, None, why)
    sparse_ms = n_sparse * row["ms"] * scale + (layers - n_sparse) * sdpa_layer
    return AttentionTime(sparse_ms, sdpa_ms, near, row["kernel"])


# --------------------------------------------------------------------------- per phase of a plan


def model_attention(model_config, attn_dim: int) -> tuple[int | None, int | None, float]:
    """``(query heads, head_dim, attention dropout)`` of a transformers config; ``attn_dim`` is heads x head_dim as
    the FLOP count read it (`mst_hf.flops.FlopModel.attn_dim`). None where the config does not say."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    heads = getattr(text, "num_attention_heads", None)
    head_dim = attn_dim // heads if heads and attn_dim and attn_dim % heads == 0 else None
    dropout = next((d for d in (getattr(text, n, None) for n in ("attn_pdrop", "attention_dropout")) if d), 0.0)
    return heads, head_dim, float(dropout)


@dataclass
class PlanAttention:
    """What :func:`plan_attention` returns: ``(mst_ms, dense_ms)`` per step for each phase of the plan and for the
    whole run (None: no measurement), the table, and one sentence on where the numbers come from."""

    table: str
    phases: list[tuple[float | None, float | None]]
    total: tuple[float | None, float | None]
    source: str
    notes: list[str] = field(default_factory=list)


def plan_attention(plan, mst_config, gpu: str, tokens: float, model_config,
                   table_path: str | None = None) -> PlanAttention:
    """Attention ms per step of each phase of ``plan`` (:func:`attention_ms`): in a phase where
    ``schedule.hsa_active`` is on, the pattern in the ``hsa_layers`` (``plan.flop_model.hsa``) and SDPA causal in
    the others; elsewhere SDPA causal in every layer, as the dense baseline. ``tokens``: per step on one GPU."""
    fm = plan.flop_model
    path = times_path(table_path)
    heads, head_dim, dropout = model_attention(model_config, fm.attn_dim) if model_config is not None else (
        None, None, 0.0)
    if not heads or not head_dim or not fm.n_layers:
        time = AttentionTime(None, None, reason="the model's attention shape (heads, head_dim, layers) is unknown")
    elif any(w is not None and w < plan.seq_len for w in fm.layer_windows):
        time = AttentionTime(None, None, reason="the model's sliding window is shorter than the sequence (not "
                             "measured: those layers run SDPA with a boolean mask)")
    else:
        time = attention_ms(gpu, fm.hsa, plan.seq_len, tokens, heads, head_dim, fm.n_layers, dropout, table_path)
    phases = []
    for p in plan.phases:
        on = schedule.hsa_active(p.start, plan.total_steps, mst_config)  # constant over a phase
        phases.append((time.sparse_ms if on else time.sdpa_ms, time.sdpa_ms))
    steps = [p.end - p.start for p in plan.phases]
    mst = None if any(m is None for m, _ in phases) else sum(m * n for (m, _), n in zip(phases, steps)) / sum(steps)
    entry = load_times(table_path).get(normalize_device_name(gpu))
    if time.sdpa_ms is None:
        source = time.reason if time.reason.startswith("no measurement") else f"no measurement: {time.reason}"
    else:
        source = (f"predicted from measured fwd+bwd times in {path} ({entry['source']}, {entry['date']}: "
                  f"H={entry['heads']}, D={entry['head_dim']}, {entry['dtype']}, {entry['tokens']} tokens per row), "
                  f"not a measured run; scaled linearly to {tokens:g} tokens per GPU per step, {heads} heads of "
                  f"{head_dim}, {fm.n_layers} layers")
    notes = []
    if time.measured_seq_len is not None and time.measured_seq_len != plan.seq_len:
        notes.append(f"Attention: no measurement at sequence length {plan.seq_len}; the nearest measured length, "
                     f"{time.measured_seq_len}, is used per token (SDPA causal's time per token grows with the "
                     "length, the sparse kernels' barely: a rough figure).")
    if time.sdpa_ms is not None and time.sparse_ms is None and any(m is None for m, _ in phases):
        notes.append(f"Attention with the sparse pattern: no measurement ({time.reason}).")
    return PlanAttention(path, phases, (mst, time.sdpa_ms), source, notes)
