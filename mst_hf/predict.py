"""Predicted weight-matmul and attention time of a planned run on one GPU, from measured tables.

:func:`predict_times` takes a :class:`~mst_hf.plan.Plan` and walks its steps as the controller's
:class:`~mst_hf.weight_kernels.WeightKernels` would: a topology-update step runs every layer dense; any other step
puts a target layer on the block kernel where ``weight_kernels`` says so (``"auto"``: :func:`mst_hf.kernels.
choose_kernel` at the layer's tile density under the plan's allocation; ``"block"``: wherever the tile side divides
the shape; ``"dense"`` or unstructured masks: nowhere). Each layer's time comes from the table's ``measurements``
(fwd+bwd per layer): the nearest measured shape by log distance (within a factor 4, as the kernel choice), the
model's layout (``Conv1D``/``Linear``) where measured there, ``dense_ms`` for dense, and ``block_ms`` interpolated
linearly in density (below the smallest measured density: the time measured there; above the largest: no
prediction). CUDA-graph GPU times (``graph_*``) are used when every row has them, eager times otherwise. Times
scale linearly from the measured tokens and shape to the layer's size and the tokens one GPU sees in one step.

Matmul time covers every ``nn.Linear``/``Conv1D``, targeted or not. Given the model's config, attention time is
predicted too, from a separate measured table (:func:`mst_hf.attention.timing.plan_attention`: the sparse pattern
in the phases where HSA is on, SDPA causal elsewhere and in the dense baseline). Norms, the loss and the optimizer
are not, so the whole-step speed-up differs (``other_ms`` gives an Amdahl estimate of the matmuls).
"""

import math
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np

from . import allocation, schedule
from .attention.timing import plan_attention
from .topology import active_tiles

NOTE = ("Matmul time (every Linear/Conv1D) and attention time (the attention kernels), forward and backward: norms, "
        "the loss and the optimizer are not predicted, so the whole-step speed-up differs.")
_FACTOR = math.log(4)  # as mst_hf.kernels.break_even_density: nothing measured within a factor 4 -> no guess


@dataclass
class PhaseTime:
    """Predicted matmul time of one phase: ``mst_ms``/``dense_ms`` per optimizer step (None: no measurement)."""

    name: str
    steps: int
    update_steps: int
    block_share: float  # mean share of the target layers on the block kernel, over the phase's steps
    flop_reduction: float  # the plan's counted reduction of the phase
    mst_ms: float | None
    dense_ms: float | None
    always_dense: bool  # no layer on the block kernel in any step: the same kernels as dense, 1.00x
    other_ms: float | None = None
    attention_mst_ms: float | None = None  # fwd+bwd attention ms per step, all layers (None: no measurement)
    attention_dense_ms: float | None = None  # the same with SDPA causal in every layer

    @property
    def attention_speedup(self) -> float | None:
        a, d = self.attention_mst_ms, self.attention_dense_ms
        return d / a if a and d is not None else None

    @property
    def speedup(self) -> float | None:
        if self.always_dense:
            return 1.0
        return self.dense_ms / self.mst_ms if self.mst_ms and self.dense_ms is not None else None

    @property
    def whole_step_speedup(self) -> float | None:
        """Amdahl: ``(dense + other) / (mst + other)`` with the user's non-matmul ms per step."""
        if self.other_ms is None or self.speedup is None:
            return None
        if self.always_dense:
            return 1.0
        return (self.dense_ms + self.other_ms) / (self.mst_ms + self.other_ms)

    def summary(self) -> dict:
        out = {"phase": self.name, "steps": self.steps, "update_steps": self.update_steps,
               "block_layer_share": self.block_share, "mst_matmul_ms_per_step": self.mst_ms,
               "dense_matmul_ms_per_step": self.dense_ms, "matmul_speedup": self.speedup,
               "flop_reduction": self.flop_reduction,
               "mst_matmul_s": None if self.mst_ms is None else self.mst_ms * self.steps / 1e3,
               "dense_matmul_s": None if self.dense_ms is None else self.dense_ms * self.steps / 1e3,
               "mst_attention_ms_per_step": self.attention_mst_ms,
               "dense_attention_ms_per_step": self.attention_dense_ms, "attention_speedup": self.attention_speedup}
        if self.other_ms is not None:
            out["whole_step_speedup"] = self.whole_step_speedup
        return out


@dataclass
class TimePrediction:
    """What :func:`predict_times` returns: per-phase :class:`PhaseTime` rows, a total, and what was left out."""

    gpu: str
    table: str
    timing: str | None  # "graph" (CUDA-graph GPU time), "eager", or None without measurements
    kernels: str  # one sentence on which kernels the run uses
    tokens_per_gpu_step: float
    micro_batch_tokens: int
    phases: list[PhaseTime]
    total: PhaseTime
    not_predicted: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    other_ms: float | None = None
    attention: str | None = None  # where the attention times come from (None: not predicted)

    def summary(self) -> dict:
        return {"gpu": self.gpu, "table": self.table, "timing": self.timing, "kernels": self.kernels,
                "attention": self.attention,
                "tokens_per_gpu_step": self.tokens_per_gpu_step, "micro_batch_tokens": self.micro_batch_tokens,
                "other_ms": self.other_ms, "phases": [p.summary() for p in self.phases],
                "total": self.total.summary(), "not_predicted": self.not_predicted, "notes": [NOTE, *self.notes]}

    def markdown(self) -> str:
        source = {"graph": "from per-layer measurements, CUDA-graph GPU time", "eager": "from per-layer "
                  "measurements, eager wall time", None: "no measurement for this GPU"}[self.timing]
        lines = [f"## Predicted weight-matmul and attention time on {self.gpu} ({source}; not a measured run)", ""]
        head = ("| phase | steps | update steps (dense) | layers on block kernel | MST matmul ms/step | dense matmul "
                "ms/step | matmul speed-up | counted FLOP reduction | MST matmul time | dense matmul time "
                "| MST attention ms/step | dense attention ms/step | attention speed-up |")
        if self.other_ms is not None:
            head += f" whole step, other {self.other_ms:g} ms |"
        lines += [head, "|" + "---|" * head.count(" |")]
        for p in [*self.phases, self.total]:
            name = "**total**" if p is self.total else p.name
            row = (f"| {name} | {p.steps} | {p.update_steps} | {p.block_share:.1%} | {_ms(p.mst_ms)} | "
                   f"{_ms(p.dense_ms)} | {_x(p.speedup)} | {p.flop_reduction:.3f}x | {_span(p.mst_ms, p.steps)} | "
                   f"{_span(p.dense_ms, p.steps)} | {_ms(p.attention_mst_ms)} | {_ms(p.attention_dense_ms)} | "
                   f"{_x(p.attention_speedup)} |")
            if self.other_ms is not None:
                row += f" {_x(p.whole_step_speedup)} |"
            lines.append(row)
        lines += ["", NOTE, f"Kernels: {self.kernels}",
                  f"Attention: {self.attention or 'no measurement (no model config given)'}."]
        lines += self.notes
        for item in self.not_predicted:
            lines.append(f"Not predicted (left out of both sums): {item['layers']} layer(s) of {item['n_in']}x"
                         f"{item['n_out']} ({item['reason']}).")
        return "\n".join(lines)


def _ms(v):
    return "no measurement" if v is None else f"{v:.3f}"


def _x(v):
    return "no measurement" if v is None else f"{v:.2f}x"


def _span(ms, steps):
    if ms is None:
        return "no measurement"
    s = ms * steps / 1e3
    return f"{s / 3600:.2f} h" if s >= 3600 else f"{s / 60:.1f} min" if s >= 60 else f"{s:.1f} s"


# --------------------------------------------------------------------------- one layer's measured times


class _LayerTimes:
    """The measured rows nearest to one ``n_in x n_out`` layer; ``None`` attributes mean no measurement."""

    def __init__(self, rows: list[dict], n_in: int, n_out: int, layout: str | None, timing: str, block: int,
                 tokens: float):
        self.reason = None
        self.dense = self._curves = None
        if not rows:
            self.reason = "no measurements for this GPU"
            return

        def distance(r):
            return abs(math.log(r["n_in"] / n_in)) + abs(math.log(r["n_out"] / n_out))

        best = min(rows, key=distance)
        if distance(best) > _FACTOR:
            self.reason = "no measured shape within a factor 4"
            return
        here = [r for r in rows if (r["n_in"], r["n_out"]) == (best["n_in"], best["n_out"])]
        layouts = sorted({r.get("layout") for r in here}, key=lambda x: x != layout)  # the model's layout first
        d_key, b_key = ("graph_dense_ms", "graph_block_ms") if timing == "graph" else ("dense_ms", "block_ms")
        first = [r for r in here if r.get("layout") == layouts[0]]
        scale = (n_in * n_out) / (best["n_in"] * best["n_out"]) * tokens / first[0]["tokens"]
        self.dense = float(np.mean([r[d_key] for r in first])) * scale
        self._curves = []  # (densities, block ms) per layout, the model's first
        for lay in layouts:
            pts = sorted((r["density"], r[b_key]) for r in here if r.get("layout") == lay and r["block_size"] == block)
            if pts:
                self._curves.append((np.array([p[0] for p in pts]), np.array([p[1] for p in pts]) * scale))

    def block(self, density: float) -> float | None:
        """Block-kernel ms at ``density``: interpolated; the smallest measured density's time below it; None above
        the largest measured density (of every layout measured at this shape)."""
        for dens, ms in self._curves or []:
            if density <= dens[-1] + 1e-12:
                return float(np.interp(density, dens, ms))
        return None


def weight_layout(model) -> str:
    """``"conv1d"`` when the model's matmuls are transformers' ``Conv1D`` (GPT-2), else ``"linear"``."""
    from transformers.pytorch_utils import Conv1D

    return "conv1d" if any(isinstance(m, Conv1D) for m in model.modules()) else "linear"


def _kernel_sentence(cfg) -> str:
    if cfg.sparsity_structure != "block" or cfg.weight_kernels == "dense":
        why = (f"sparsity_structure={cfg.sparsity_structure!r}" if cfg.sparsity_structure != "block"
               else "weight_kernels='dense'")
        return (f"{why}: masked dense kernels in every step, so no matmul gets faster (1.00x); the counted FLOP "
                "reduction does not show in wall time. A speed-up needs sparsity_structure='block' and "
                "weight_kernels='auto' (or 'block').")
    rule = ("the measured break-even table decides per layer (mst_hf.kernels.choose_kernel) at its tile density"
            if cfg.weight_kernels == "auto" else "every layer whose shape the tile side divides")
    return (f"weight_kernels={cfg.weight_kernels!r}, block_size={cfg.block_size}: block kernel where {rule}; "
            "topology-update steps run every layer dense.")


# --------------------------------------------------------------------------- the prediction


def predict_times(plan, mst_config, device_name: str, table_path: str | None = None, gpus: int = 1,
                  micro_batch_tokens: int | None = None, layout: str | None = None,
                  other_ms: float | None = None, model_config=None,
                  attention_table: str | None = None) -> TimePrediction:
    """Predict the weight-matmul (and attention) time per step and per phase of ``plan`` on ``device_name`` (see
    the module doc).

    ``gpus``: data-parallel GPUs sharing ``plan.tokens_per_step``; ``micro_batch_tokens``: tokens of one forward on
    one GPU, what the kernel choice sees (default: a GPU's share of the step, no accumulation); ``layout``:
    ``"conv1d"`` or ``"linear"`` (which measured rows to prefer); ``other_ms``: the non-matmul ms of one step on
    one GPU, for a whole-step estimate. ``table_path``: a break-even JSON (default: ``$MST_KERNEL_TABLE``, else
    the shipped table). ``model_config``: the model's transformers config (heads, head_dim, attention dropout), for
    the attention time from ``attention_table`` (default: the shipped ``mst_hf/attention/times.json``); without
    it attention is not predicted.
    """
    from .kernels.dispatch import choose_kernel, load_table, normalize_device_name
    from .kernels.dispatch import table_path as default_table_path

    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise ValueError(f"`gpus` must be a positive int, got {gpus!r}.")
    if micro_batch_tokens is not None and (isinstance(micro_batch_tokens, bool)
                                           or not isinstance(micro_batch_tokens, int) or micro_batch_tokens < 1):
        raise ValueError(f"`micro_batch_tokens` must be a positive int, got {micro_batch_tokens!r}.")
    if other_ms is not None and not (isinstance(other_ms, (int, float)) and other_ms >= 0):
        raise ValueError(f"`other_ms` must be a non-negative number of milliseconds, got {other_ms!r}.")
    path = default_table_path(table_path)
    try:  # the one validating reader, as the controller's: a missing or malformed table fails here
        tables = load_table(table_path)
    except ValueError as err:
        if table_path is None:
            raise
        raise ValueError(f"`table_path` (--kernel-table): {err}") from err
    cfg = SimpleNamespace(**mst_config.mst_dict()) if hasattr(mst_config, "mst_dict") else mst_config
    tokens = plan.tokens_per_step / gpus
    micro = micro_batch_tokens or max(1, plan.tokens_per_step // gpus)
    table = tables.get(normalize_device_name(device_name)) or {}
    rows = table.get("measurements", [])
    timing = None
    notes = []
    if rows:
        timing = "graph" if all(r.get("graph_dense_ms") is not None and r.get("graph_block_ms") is not None
                                for r in rows) else "eager"
        notes.append(f"Per-layer times at {rows[0]['tokens']} tokens scaled linearly to {tokens:g} tokens per GPU "
                     "per step and to each layer's size; densities below the smallest measured use its time.")
    else:
        known = ", ".join(sorted(tables)) or "none"
        notes.append(f"No measurement for GPU {device_name!r} in {path} (GPUs there: {known}): matmul times are not "
                     "predicted" + (", and weight_kernels='auto' keeps every layer dense there (1.00x)."
                                    if cfg.weight_kernels == "auto" else "."))
    kernels_on = cfg.sparsity_structure == "block" and cfg.weight_kernels != "dense"
    block = cfg.block_size

    fm = plan.flop_model
    matmuls = list(fm.matmuls)
    times = [_LayerTimes(rows, m.n_in, m.n_out, layout, timing, block, tokens) for m in matmuls]
    covered = [t.dense is not None for t in times]
    dense_step = sum(t.dense for t in times if t.dense is not None) if any(covered) else None
    missing: dict = {}
    for m, t in zip(matmuls, times):
        if t.dense is None and rows:  # without rows the note above says it once
            missing.setdefault((m.n_in, m.n_out, t.reason), 0)
            missing[(m.n_in, m.n_out, t.reason)] += 1
    not_predicted = [{"n_in": a, "n_out": b, "layers": n, "reason": r} for (a, b, r), n in missing.items()]
    if not_predicted and any(covered):
        held = sum(m.numel for m, c in zip(matmuls, covered) if c) / fm.n_params
        notes.append(f"The predicted layers hold {held:.1%} of the matmul weights; the others are listed below.")
    if rows and not any(covered):
        notes.append("No layer of this model has a measured shape within a factor 4: times are not predicted.")
        dense_step = None

    targets = allocation.distinct_targets(matmuls)
    index = {m.name: i for i, m in enumerate(matmuls)}

    memo: dict = {}

    def plain_step(sparsity: float) -> tuple[float | None, int]:
        """(matmul ms, target layers on the block kernel) of a non-update step with the masks set at ``sparsity``."""
        if sparsity in memo:
            return memo[sparsity]
        ms, n_block, unmeasured = dense_step, 0, False
        densities = allocation.layer_densities(targets, cfg, sparsity) if kernels_on else {}
        for m in targets:
            d = densities.get(m.name)
            if d is None or m.n_in % block or m.n_out % block:
                continue
            grid = (m.n_in // block) * (m.n_out // block)
            tile_density = active_tiles((m.n_in, m.n_out), block, d) / grid
            if cfg.weight_kernels == "auto" and choose_kernel(m.n_in, m.n_out, micro, tile_density, block,
                                                              device_name, path) != "block":
                continue
            n_block += 1
            t = times[index[m.name]]
            if ms is None or t.dense is None:
                continue
            b = t.block(tile_density)
            if b is None:
                unmeasured = True
            else:
                ms += b - t.dense
        memo[sparsity] = (None if unmeasured else ms, n_block)
        return memo[sparsity]

    steps = plan.total_steps
    upd = np.asarray(plan.arrays["update"], dtype=bool)
    mst = np.full(steps, np.nan if dense_step is None else float(dense_step))
    share = np.zeros(steps)
    bounds = list(np.flatnonzero(upd)) + [steps]
    first = bounds[0]
    spans = ([(-1, 0, first, cfg.initial_sparsity)] if first > 0 else [])
    for u, nxt in zip(bounds[:-1], bounds[1:]):
        spans.append((u, u + 1, nxt, None))
    for u, a, b, s in spans:
        if b <= a:
            continue
        sparsity = s if s is not None else schedule.target_sparsity(int(u), steps, cfg)
        ms, n_block = plain_step(float(sparsity))
        mst[a:b] = np.nan if ms is None else ms
        share[a:b] = n_block / len(targets) if targets else 0.0
    unmeasured_block = np.isnan(mst) & (dense_step is not None)
    if unmeasured_block.any():
        notes.append("Some steps put a layer on the block kernel at a density above the largest measured one (or "
                     "at a block size the table lacks): those phases are not predicted.")

    def phase(name, a, b, reduction):
        m = mst[a:b]
        return PhaseTime(name, b - a, int(upd[a:b].sum()), float(share[a:b].mean()) if b > a else 0.0, reduction,
                         None if dense_step is None or np.isnan(m).any() else float(m.mean()),
                         None if dense_step is None else float(dense_step), not share[a:b].any(), other_ms)

    phases = [phase(p.name, p.start, p.end, p.flop_reduction) for p in plan.phases]
    total = phase("total", 0, steps, plan.flop_reduction)
    attention = None
    if model_config is not None:
        att = plan_attention(plan, cfg, device_name, tokens, model_config, attention_table)
        for p, (mst_att, dense_att) in zip([*phases, total], [*att.phases, att.total]):
            p.attention_mst_ms, p.attention_dense_ms = mst_att, dense_att
        attention, notes = att.source, notes + att.notes
    return TimePrediction(device_name, path, timing if dense_step is not None else None, _kernel_sentence(cfg),
                          tokens, micro, phases, total, not_predicted, notes, other_ms, attention)


# --------------------------------------------------------------------------- command line (used by mst_hf.plan)


def add_arguments(parser) -> None:
    """The ``--gpu`` flags of ``python -m mst_hf.plan``."""
    g = parser.add_argument_group("predicted matmul and attention time (from measured tables)")
    g.add_argument("--gpu", default=None, help="predict weight-matmul and attention time per phase on this GPU, as "
                   "named in the tables (torch.cuda.get_device_name(), e.g. 'NVIDIA H200')")
    g.add_argument("--kernel-table", default=None, help="a break-even JSON (default: mst_hf/kernels/breakeven.json)")
    g.add_argument("--attention-table", default=None, help="an attention time JSON (default: "
                   "mst_hf/attention/times.json; `bench/attention.py --json` writes one)")
    g.add_argument("--gpus", type=int, default=1, help="data-parallel GPUs sharing --tokens-per-step (default 1)")
    g.add_argument("--micro-batch-tokens", type=int, default=None,
                   help="tokens of one forward on one GPU (default: a GPU's share of the step)")
    g.add_argument("--other-ms", type=float, default=None,
                   help="non-matmul ms of one step on one GPU (measured by you), for a whole-step estimate")


def cli_prediction(args, plan, mst_config, model) -> TimePrediction:
    return predict_times(plan, mst_config, args.gpu, args.kernel_table, args.gpus, args.micro_batch_tokens,
                         weight_layout(model), args.other_ms, model.config, args.attention_table)
