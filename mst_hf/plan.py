"""Plan a Mixed Sparsity Training run before it starts: the schedule, the counted FLOPs, and the reduction.

:func:`plan_run` walks every optimizer step of the schedule without training. It reproduces what
:class:`~mst_hf.MSTController` does, so a real run's logged ``mst/total_flops`` equals the plan's total:

* the masks in force during step ``t`` are those set at the last topology update *before* ``t`` (the initial masks
  for step 0): per layer ``topology.active_count(numel, density)`` with the controller's densities
  (:func:`mst_hf.allocation.layer_densities`) at the schedule's target sparsity of that update step;
* an update step additionally pays the dense weight gradient of the inactive part of those masks;
* attention uses the HSA pattern's exact mean attended keys in the steps where ``schedule.hsa_active`` is on
  (only in the ``hsa_layers``), dense causal attention elsewhere.

Counts are built per update interval (the masks are constant inside one), so 100k+ steps take well under a second;
totals are exact integers when ``tokens_per_step`` is a multiple of ``seq_len``.

Command line (GPT-2 124M on the meta device, no weights)::

    python -m mst_hf.plan --preset gpt2-4x --steps 100000 --plot plan.png

prints a per-phase Markdown table and, as its last line, one JSON object with ``flop_reduction``,
``mst_total_flops`` and ``dense_total_flops``. ``--gpu "NVIDIA H200"`` adds the predicted weight-matmul and
attention time per phase on that GPU (:mod:`mst_hf.predict`; a ``predicted_time`` key in the JSON).
"""

import argparse
import json
import os
from dataclasses import dataclass, field
from functools import cache
from types import SimpleNamespace

import numpy as np
from transformers.utils import logging

from . import allocation, conventions, predict, schedule
from .flops import FlopModel, dense_step_flops, dense_token_flops, model_flop_shapes, step_flops
from .model_sizes import MODEL_SIZES, model_config
from .presets import DEFAULT_PRESET

_CURVE_CODES = {"cubic": 0, "linear": 1, "cosine": 2}


@dataclass
class PhasePlan:
    """One phase of a planned run: ``[start, end)`` and its counted FLOPs and means over its steps."""

    name: str
    start: int
    end: int
    mst_flops: int | float
    dense_flops: int | float
    mean_target_sparsity: float
    mean_sparsity: float
    mean_attention_density: float

    @property
    def steps(self) -> int:
        return self.end - self.start

    @property
    def flop_reduction(self) -> float:
        return self.dense_flops / self.mst_flops if self.mst_flops else 1.0


@dataclass
class Plan:
    """A planned run. ``arrays`` holds one value per step: ``step``, ``target_sparsity`` (the schedule's ``s(t)``),
    ``sparsity`` (of the masks in force, as counted), ``attention_density``, ``update`` (bool), ``step_flops``,
    ``mst_cumulative_flops`` and ``dense_cumulative_flops`` (floats; the exact totals are the attributes)."""

    total_steps: int
    tokens_per_step: int
    seq_len: int
    mst_total_flops: int | float
    dense_total_flops: int | float
    phase_bounds: tuple[int, int]
    phases: list[PhasePlan]
    flop_model: FlopModel
    arrays: dict[str, np.ndarray] = field(repr=False)

    @property
    def flop_reduction(self) -> float:
        """Dense total over MST total."""
        return self.dense_total_flops / self.mst_total_flops

    def trace(self) -> dict:
        """The per-step arrays plus ``phase_bounds``: the input of :func:`mst_hf.plotting.plot_schedule`."""
        return {**self.arrays, "phase_bounds": self.phase_bounds}

    def summary(self) -> dict:
        """JSON-ready totals and per-phase breakdown (no per-step arrays)."""
        fm = self.flop_model
        return {
            "flop_reduction": self.flop_reduction,
            "mst_total_flops": self.mst_total_flops,
            "dense_total_flops": self.dense_total_flops,
            "total_steps": self.total_steps,
            "tokens_per_step": self.tokens_per_step,
            "seq_len": self.seq_len,
            "matmul_params": fm.n_params,
            "dense_token_flops": dense_token_flops(fm, self.seq_len),
            "dense_token_flops_noncausal": dense_token_flops(fm, self.seq_len, causal=False),
            "phase_bounds": list(self.phase_bounds),
            "phases": [
                {"phase": p.name, "start": p.start, "end": p.end, "steps": p.steps, "mst_flops": p.mst_flops,
                 "dense_flops": p.dense_flops, "flop_reduction": p.flop_reduction,
                 "mean_target_sparsity": p.mean_target_sparsity, "mean_sparsity": p.mean_sparsity,
                 "mean_attention_density": p.mean_attention_density}
                for p in self.phases
            ],
        }

    def markdown(self) -> str:
        """A per-phase Markdown table with a total row."""
        head = ("| phase | steps | range | target sparsity (mean) | counted sparsity (mean) "
                "| attention density (mean) | MST FLOPs | dense FLOPs | reduction |")
        rows = [head, "|" + "---|" * 9]
        for p in self.phases:
            rows.append(f"| {p.name} | {p.steps} | [{p.start}, {p.end}) | {p.mean_target_sparsity:.4f} | "
                        f"{p.mean_sparsity:.4f} | {p.mean_attention_density:.4f} | {p.mst_flops:.4e} | "
                        f"{p.dense_flops:.4e} | {p.flop_reduction:.3f}x |")
        a = self.arrays
        rows.append(f"| **total** | {self.total_steps} | [0, {self.total_steps}) | "
                    f"{a['target_sparsity'].mean():.4f} | {a['sparsity'].mean():.4f} | "
                    f"{a['attention_density'].mean():.4f} | {self.mst_total_flops:.4e} | "
                    f"{self.dense_total_flops:.4e} | **{self.flop_reduction:.3f}x** |")
        return "\n".join(rows)


# --------------------------------------------------------------------------- the schedule, vectorised


def fast_update_steps(total_steps: int, config) -> list[int]:
    """``schedule.update_steps`` without a Python test per step: multiples of the interval and phase starts, before
    the frozen tail (``stop_updates_ratio``)."""
    end = schedule.update_end(total_steps, config)
    steps = set(range(0, end, config.update_interval)) | set(schedule.phase_starts(total_steps, config))
    return sorted(t for t in steps if t < end)


def _curve(name: str, p: np.ndarray, mirrored: bool) -> np.ndarray:
    p = np.clip(p, 0.0, 1.0)
    if name == "cubic":
        return p**3 if mirrored else 1.0 - (1.0 - p) ** 3
    if name == "linear":
        return p
    return 0.5 * (1.0 - np.cos(np.pi * p))


def target_sparsity_array(total_steps: int, config, updates: list[int] | None = None) -> np.ndarray:
    """``schedule.target_sparsity(t)`` for every step at once (same formulas, numpy)."""
    ultra_start, restoration_start = schedule.phase_bounds(total_steps, config)
    updates = fast_update_steps(total_steps, config) if updates is None else updates
    s0, su, sf = config.initial_sparsity, config.ultra_sparsity, config.final_sparsity
    t = np.arange(total_steps, dtype=np.float64)
    out = np.full(total_steps, float(su))
    if ultra_start > 0:
        w = slice(0, ultra_start)
        out[w] = s0 + (su - s0) * _curve(config.warmup_curve, t[w] / ultra_start, mirrored=False)
    if restoration_start < total_steps:
        r = slice(restoration_start, total_steps)
        span = max(updates[-1], restoration_start) - restoration_start
        tau = np.ones(total_steps - restoration_start) if span <= 0 else (t[r] - restoration_start) / span
        out[r] = su + (sf - su) * _curve(config.restoration_curve, tau, mirrored=True)
    return out


# --------------------------------------------------------------------------- the plan


def build_meta_model(model_or_config):
    """A causal LM on the ``meta`` device (shapes only) from a transformers config, a named size
    (:data:`mst_hf.model_sizes.MODEL_SIZES`), or a path to a ``config.json`` (or its folder)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = model_or_config
    if isinstance(config, str):
        if config in MODEL_SIZES:
            config = model_config(config)
        elif os.path.exists(config):
            config = AutoConfig.from_pretrained(config)
        else:
            raise ValueError(f"`model` {model_or_config!r} is neither a named size ({', '.join(MODEL_SIZES)}) nor "
                             "an existing config.json file or folder.")
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _flop_model(model_or_config, mst_config) -> FlopModel:
    if isinstance(model_or_config, FlopModel):
        return model_or_config
    from torch import nn

    model = model_or_config if isinstance(model_or_config, nn.Module) else build_meta_model(model_or_config)
    return model_flop_shapes(model, mst_config)


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}.")


def plan_run(model_or_config, mst_config, total_steps: int, tokens_per_step: int, seq_len: int | None = None) -> Plan:
    """Count the FLOPs of every step of an MST run without training (see the module docstring).

    ``model_or_config``: a model (any device, ``meta`` included), a transformers config, a named size or config
    path (built on the meta device), or a :class:`~mst_hf.flops.FlopModel`. ``tokens_per_step``: tokens per
    optimizer step over all ranks and micro-batches; ``seq_len``: tokens per sequence (default: the model's
    ``max_position_embeddings``).
    """
    _check_positive_int("total_steps", total_steps)
    _check_positive_int("tokens_per_step", tokens_per_step)
    fm = _flop_model(model_or_config, mst_config)
    seq_len = seq_len if seq_len is not None else fm.max_seq_len
    _check_positive_int("seq_len", seq_len)
    if fm.max_seq_len and seq_len > fm.max_seq_len:
        logger.warning("Planning sequences of %d tokens for a model whose context is %d positions: the model cannot "
                       "train at that length as configured; the plan counts it anyway.", seq_len, fm.max_seq_len)
    # the schedule reads config fields thousands of times: a plain snapshot is much faster than a PretrainedConfig
    cfg = SimpleNamespace(**mst_config.mst_dict()) if hasattr(mst_config, "mst_dict") else mst_config
    steps = total_steps
    updates = fast_update_steps(steps, cfg)
    targets = allocation.distinct_targets(fm.matmuls)  # find_targets' order, a tied matrix once

    @cache
    def masks_at(sparsity: float) -> tuple[dict, float]:
        """Per-layer densities the controller sets at global ``sparsity``, and the sparsity of their active counts."""
        densities = allocation.layer_densities(targets, cfg, sparsity)
        return densities, allocation.counted_sparsity(targets, densities)

    # in_force[i]: masks during the steps (updates[i-1], updates[i]]; in_force[0]: the initial masks
    in_force = [masks_at(cfg.initial_sparsity)] + [masks_at(schedule.target_sparsity(u, steps, cfg)) for u in updates]

    memo: dict = {}

    def flops_of(densities: dict, hsa: bool, update: bool) -> int | float:
        key = (id(densities), hsa, update)  # densities dicts are shared through masks_at's cache
        if key not in memo:
            memo[key] = step_flops(fm, densities, tokens_per_step, seq_len, hsa_on=hsa, update_step=update)
        return memo[key]

    dense_step = dense_step_flops(fm, tokens_per_step, seq_len)
    arr_flops = np.zeros(steps)
    arr_sparsity = np.zeros(steps)
    arr_attention = np.zeros(steps)
    total = 0
    by_phase: dict[str, int | float] = {p: 0 for p in schedule.PHASES}
    for i, start in enumerate(updates):
        end = updates[i + 1] if i + 1 < len(updates) else steps
        hsa = schedule.hsa_active(start, steps, cfg)  # phases start at update steps: constant on [start, end)
        (old, old_sparsity), (new, new_sparsity) = in_force[i], in_force[i + 1]
        f_update = flops_of(old, hsa, True)
        f_plain = flops_of(new, hsa, False)
        interval = f_update + (end - start - 1) * f_plain
        total += interval
        by_phase[schedule.phase(start, steps, cfg)] += interval
        arr_flops[start], arr_flops[start + 1 : end] = f_update, f_plain
        arr_sparsity[start], arr_sparsity[start + 1 : end] = old_sparsity, new_sparsity
        arr_attention[start:end] = fm.attention_density(seq_len, hsa)

    bounds = schedule.phase_bounds(steps, cfg)
    arrays = {
        "step": np.arange(steps),
        "target_sparsity": target_sparsity_array(steps, cfg, updates),
        "sparsity": arr_sparsity,
        "attention_density": arr_attention,
        "update": np.isin(np.arange(steps), updates),
        "step_flops": arr_flops,
        "mst_cumulative_flops": np.cumsum(arr_flops),
        "dense_cumulative_flops": float(dense_step) * np.arange(1, steps + 1),
    }
    phases = []
    for name, (a, b) in zip(schedule.PHASES, [(0, bounds[0]), bounds, (bounds[1], steps)]):
        if b > a:
            phases.append(PhasePlan(
                name, a, b, by_phase[name], dense_step * (b - a), float(arrays["target_sparsity"][a:b].mean()),
                float(arr_sparsity[a:b].mean()), float(arr_attention[a:b].mean()),
            ))
    return Plan(steps, tokens_per_step, seq_len, total, dense_step * steps, bounds, phases, fm, arrays)


# --------------------------------------------------------------------------- command line


def convention_reductions(flop_model: FlopModel, mst_config, total_steps: int, tokens_per_step: int,
                          seq_len: int | None = None, headline: float | None = None) -> dict[str, float | None]:
    """Counted FLOP reduction (dense causal baseline over the run's count) under each of
    :data:`mst_hf.conventions.CONVENTIONS` (``headline``: the headline reduction when already planned, to skip
    planning it again)."""
    out = {}
    for name, fm in conventions.convention_flop_models(flop_model).items():
        if name == "headline" and headline is not None:
            out[name] = headline
        elif fm is None:
            out[name] = None
        else:
            out[name] = plan_run(fm, mst_config, total_steps, tokens_per_step, seq_len).flop_reduction
    return out



def load_mst_config(path: str):
    """An :class:`~mst_hf.MSTConfig` from an ``mst_config.json`` file (any name) or the folder holding one."""
    from .config import MST_CONFIG_NAME, MSTConfig, saved_fields

    if os.path.isdir(path):
        path = os.path.join(path, MST_CONFIG_NAME)
    if not os.path.isfile(path):
        raise ValueError(f"`--config` {path!r} is not an MST config file, nor a folder with {MST_CONFIG_NAME}.")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return MSTConfig(**saved_fields(data, path))


logger = logging.get_logger(__name__)

# What the study measured (docs/results.md), printed next to every counted reduction: a counted FLOP figure says
# nothing about quality, and the study is the only quality evidence so far (one small scale).
MEASURED_QUALITY = (
    "Quality, measured (docs/results.md; only at 2.6M matmul weights and 38M tokens; one seed per learning rate): "
    "the default preset at a counted 4.0x ends 0.26 nats above an iso-FLOP small dense model and further above "
    "dense, each at its own best learning rate; no setting measured so far reaches dense quality with fewer "
    "counted FLOPs."
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mst_hf.plan", description=__doc__.split("\n")[0])
    source = p.add_mutually_exclusive_group()
    source.add_argument("--preset", default=None, help=f"an MSTConfig preset (default: {DEFAULT_PRESET})")
    source.add_argument("--config", default=None, help="an mst_config.json file, or a folder holding one")
    p.add_argument("--model", default="gpt2-124m",
                   help=f"a named size ({', '.join(MODEL_SIZES)}) or a config.json file/folder (built on meta)")
    p.add_argument("--steps", type=int, default=100_000, help="optimizer steps of the run")
    p.add_argument("--tokens-per-step", type=int, default=512 * 1024, help="tokens per optimizer step, all ranks")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the model's context)")
    p.add_argument("--plot", default=None, help="write a PNG of the schedule and the cumulative FLOPs here")
    p.add_argument("--json", action="store_true", help="print only the JSON summary line")
    predict.add_arguments(p)
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from .defaults import run_config

    model = build_meta_model(args.model)
    if args.config:
        mst_config = load_mst_config(args.config)
    else:  # the rule MSTTrainer without mst_config and the example follow: the preset scaled to this run
        seq_len = args.seq_len if args.seq_len is not None else model_flop_shapes(model).max_seq_len
        mst_config = run_config(args.preset, max_steps=args.steps, seq_len=seq_len, model=model)
    plan = plan_run(model, mst_config, args.steps, args.tokens_per_step, args.seq_len)
    label = args.config or f"preset {args.preset or DEFAULT_PRESET}"
    summary = {"model": args.model, "mst_config": label, **plan.summary(), "mst_config_fields": mst_config.mst_dict()}
    summary["conventions"] = convention_reductions(plan.flop_model, mst_config, args.steps,
                                                               args.tokens_per_step, plan.seq_len, plan.flop_reduction)
    summary["lm_head_at_ultra"] = conventions.lm_head_sparsity(plan.flop_model, mst_config, mst_config.ultra_sparsity)
    if not args.json:
        fm = plan.flop_model
        print(f"# MST plan: {label}, model {args.model} ({fm.n_params:,} matmul weights, {fm.n_layers} layers, "
              f"attention dim {fm.attn_dim}), {plan.total_steps:,} steps x {plan.tokens_per_step:,} tokens, "
              f"sequence length {plan.seq_len}\n")
        print(plan.markdown())
        print(f"\nDense FLOPs per token: {summary['dense_token_flops']:,} (causal, k_bar = (T+1)/2); nanoGPT's "
              f"6N + 12LdT: {summary['dense_token_flops_noncausal']:,}.")
        print(f"Counted FLOP reduction: {plan.flop_reduction:.3f}x "
              f"({plan.mst_total_flops:.4e} MST vs {plan.dense_total_flops:.4e} dense FLOPs).")
        print(MEASURED_QUALITY)
        print("Counted reduction under each convention (same dense causal baseline; docs/concepts.md):")
        for key, value in summary["conventions"].items():
            print(f"  {conventions.DESCRIPTIONS[key]}: {'n/a' if value is None else f'{value:.3f}x'}")
        head = summary["lm_head_at_ultra"]
        if head is not None:
            print(f"LM head at ultra sparsity {mst_config.ultra_sparsity}: sparsity {head['lm_head']:.4f} "
                  f"({head['lm_head_share']:.1%} of the targeted weights), other targets {head['other_targets']:.4f}.")
    if args.gpu:
        prediction = predict.cli_prediction(args, plan, mst_config, model)
        summary["predicted_time"] = prediction.summary()
        if not args.json:
            print("\n" + prediction.markdown())
    if args.plot:
        from .plotting import plot_schedule

        plot_schedule(plan.trace(), args.plot, title=f"MST plan: {label}, {args.model}")
        if not args.json:
            print(f"Plot written to {args.plot}.")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
