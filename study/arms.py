"""The study's arms: the rung's model, MST's plan, and the matched densities and width the other arms derive from
it. Every FLOP and density here comes from the library's planner (:func:`mst_hf.plan_run`)."""

import json
from functools import cached_property

import numpy as np
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from mst_hf import MSTConfig, model_flop_shapes
from mst_hf.flops import dense_token_flops
from mst_hf.plan import plan_run

from .noise import REPEAT_TAG
from .sweep import sweep_label, sweep_lrs

RUNGS = {
    "S": dict(n_layer=4, n_embd=192, n_head=3),
    "M": dict(n_layer=6, n_embd=256, n_head=4),
    "L": dict(n_layer=8, n_embd=512, n_head=8),  # 25.2M non-embedding parameters (12 L d^2)
    "tiny": dict(n_layer=2, n_embd=32, n_head=2),  # --smoke
}
BASE_ARMS = ("dense", "mst", "rigl", "static", "gmp", "gmp_matched", "small_dense")
DEFAULT_ARMS = "dense,mst,rigl,static,gmp,gmp_matched,small_dense"
DENSE_ARMS = ("dense", "small_dense")


def model_config(args, n_embd=None, n_head=None) -> GPT2Config:
    """GPT-2 of the rung (or narrower), no dropout, tied head; ``<|endoftext|>`` is id 0 of the study tokenizer."""
    size = dict(RUNGS[args.rung])
    if n_embd is not None:
        size.update(n_embd=n_embd, n_head=n_head)
    return GPT2Config(vocab_size=args.vocab_size, n_positions=args.seq_len, attn_pdrop=0.0, resid_pdrop=0.0,
                      embd_pdrop=0.0, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, **size)


def meta_shapes(cfg: GPT2Config):
    with torch.device("meta"):
        return model_flop_shapes(AutoModelForCausalLM.from_config(cfg), MSTConfig(hsa_pattern="dense"))


def parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# study key -> (valid value?, what it must be)
_STUDY_KEY_RULES = {
    "lr": (lambda v: _number(v) and v > 0, "a positive number (the peak learning rate, e.g. 2e-3)"),
    "passes": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a whole number >= 1"),
    "adam_beta2": (lambda v: _number(v) and 0 < v < 1, "a number in (0, 1)"),
    "lr_density_exponent": (_number, "a number (e.g. 0.5: lr / density**0.5 on each masked matrix)"),
    "masked_weight_decay": (lambda v: _number(v) and v >= 0, "a number >= 0 (AdamW's decay on the masked matrices)"),
}
STUDY_KEYS = tuple(_STUDY_KEY_RULES)  # arm keys the study reads itself (training side), never MSTConfig fields


def check_study_keys(label: str, base: str, overrides: dict) -> None:
    """Refuse a bad value of a study key (``STUDY_KEYS``) of ``--arm label=base:...``."""
    for key, (valid, want) in _STUDY_KEY_RULES.items():
        if key in overrides and not valid(overrides[key]):
            raise ValueError(f"`--arm {label}=...`: `{key}` must be {want}, got {overrides[key]!r}.")
    masked_only = sorted({"lr_density_exponent", "masked_weight_decay"} & set(overrides))
    if base in DENSE_ARMS and masked_only:
        raise ValueError(f"`--arm {label}={base}:...` sets {masked_only}, which act on masked matrices; a dense arm "
                         "has none. Set them on a sparse arm.")


def parse_arms(args) -> dict[str, tuple[str, dict]]:
    """``label -> (base arm, overrides)`` from ``--arms`` and every ``--arm LABEL=BASE:key=value[@SEEDS]``, then
    every arm at every LR of a sweep (``ARM@lr=V``, :func:`study.sweep.sweep_lrs`), then a same-seed repeat
    ``LABEL#rep`` of every label of ``--repeat``.

    Overrides are ``MSTConfig`` fields, except the study keys (``STUDY_KEYS``): ``lr`` (the peak learning rate),
    ``passes`` (passes over the run's training blocks), ``adam_beta2`` (AdamW's beta2, default 0.95), and for
    sparse arms ``lr_density_exponent`` and ``masked_weight_decay``. A dense arm's other overrides may only be
    learning-rate fields (``lr_schedule``, ``lr_floor``, ``lr_decay_start``)."""
    arms = {}
    for name in [a for a in args.arms.split(",") if a]:
        if name not in BASE_ARMS:
            raise ValueError(f"`--arms` names {name!r}; known arms are {BASE_ARMS} (add variants with --arm).")
        arms[name] = (name, {})
    for spec in args.arm:
        spec = spec.partition("@")[0]  # "@SEEDS" is read by `tasks`
        label, _, rest = spec.partition("=")
        base, *pairs = rest.split(":")
        if not label or base not in BASE_ARMS or any("=" not in p for p in pairs):
            raise ValueError(f"`--arm {spec}` must read LABEL=BASE:field=value:... with BASE in {BASE_ARMS}.")
        arms[label] = (base, {k: parse_value(v) for k, v in (p.split("=", 1) for p in pairs)})
    for label, (base, overrides) in arms.items():
        check_study_keys(label, base, overrides)
    lrs = sweep_lrs(args)
    if lrs:
        arms = {sweep_label(label, lr): (base, {**ov, "lr": lr}) for label, (base, ov) in arms.items() for lr in lrs}
    for label in [x for x in getattr(args, "repeat", "").split(",") if x]:
        if label not in arms:
            raise ValueError(f"`--repeat` names {label!r}, which is not a run of this command; its runs are "
                             f"{sorted(arms)}.")
        arms[label + REPEAT_TAG] = arms[label]
    return arms


def mst_config(args, seed: int, overrides: dict) -> MSTConfig:
    fields = dict(update_interval=args.update_interval, seed=seed, **args.mst_overrides)
    fields.update(overrides)
    return MSTConfig.from_preset(args.preset, **fields)


def constant_config(args, seed: int, density: float, **fields) -> MSTConfig:
    s = 1.0 - density
    base = dict(initial_sparsity=s, ultra_sparsity=s, final_sparsity=s, warmup_ratio=0.0, restoration_ratio=0.0,
                hsa_pattern="dense", update_interval=args.update_interval, seed=seed)
    base.update(fields)
    return MSTConfig(**base)


def gmp_config(args, seed: int, start: float, end: float, sparsity: float,
               steps: int | None = None) -> tuple[MSTConfig, int]:
    """GMP as an MSTConfig run on a delayed clock: the controller sees step ``max(0, t - delay)`` of a run of
    ``T - delay`` steps (``T``: ``steps``, default ``--steps``), whose warm-up (the cubic ramp of Zhu & Gupta)
    spans ``[start, end)`` of the real run; no drop-and-grow (``drop_fraction=0``), so an update only prunes by
    magnitude. Returns ``(config, delay)``."""
    delay = int(round(start * (steps or args.steps)))
    ramp = (end - start) / (1.0 - start)
    cfg = MSTConfig(initial_sparsity=0.0, ultra_sparsity=sparsity, final_sparsity=sparsity, warmup_ratio=ramp,
                    restoration_ratio=0.0, drop_fraction=0.0, drop_fraction_schedule="constant",
                    grow_method="gradient", hsa_pattern="dense", update_interval=args.update_interval, seed=seed)
    return cfg, delay


def mean_density(plan, delay: int = 0) -> float:
    sparsity = np.concatenate([np.zeros(delay), plan.arrays["sparsity"]])
    return float(1.0 - sparsity.mean())


class Study:
    """The derived quantities every arm needs: the MST plan, the matched densities, the iso-FLOP width."""

    def __init__(self, args):
        self.args = args
        self.base_cfg = model_config(args)
        with torch.device("meta"):
            self._meta = AutoModelForCausalLM.from_config(self.base_cfg)  # shapes only: built once, no weights
        self.base_fm = model_flop_shapes(self._meta, MSTConfig(hsa_pattern="dense"))
        self.tokens_per_step = args.batch * args.seq_len
        self.mst_plan = self.plan(mst_config(args, 0, {}))
        self.mst_density = mean_density(self.mst_plan)

    @cached_property
    def gmp(self) -> dict:
        return self._solve_gmp(self.args.gmp_start, self.args.gmp_end)

    @cached_property
    def gmp_matched(self) -> dict:
        return self._solve_gmp_matched()

    @cached_property
    def small(self) -> dict:
        return self._iso_flop_width()

    def plan(self, cfg, steps=None):
        fm = model_flop_shapes(self._meta, cfg)
        return plan_run(fm, cfg, steps or self.args.steps, self.tokens_per_step, self.args.seq_len)

    def gmp_density(self, start, end, sparsity) -> float:
        cfg, delay = gmp_config(self.args, 0, start, end, sparsity)
        return mean_density(self.plan(cfg, self.args.steps - delay), delay)

    def _solve_gmp(self, start, end) -> dict:
        lo, hi = 0.0, self.args.gmp_max_sparsity
        if self.gmp_density(start, end, hi) > self.mst_density:  # even the cap leaves more weights than MST
            return {"start": start, "end": end, "sparsity": hi, "mean_density": self.gmp_density(start, end, hi),
                    "matched": False}
        for _ in range(30):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if self.gmp_density(start, end, mid) > self.mst_density else (lo, mid)
        return {"start": start, "end": end, "sparsity": hi, "mean_density": self.gmp_density(start, end, hi),
                "matched": True}

    def _solve_gmp_matched(self) -> dict:
        if self.gmp["matched"]:
            return self.gmp
        a, b = self.args.gmp_start, self.args.gmp_end
        lo, hi = 0.0, 1.0  # scale of (start, end)
        s = self.args.gmp_max_sparsity
        for _ in range(30):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if self.gmp_density(a * mid, b * mid, s) <= self.mst_density else (lo, mid)
        return {"start": a * lo, "end": b * lo, "sparsity": s, "mean_density": self.gmp_density(a * lo, b * lo, s),
                "matched": True}

    def _iso_flop_width(self) -> dict:
        head_dim = self.base_cfg.n_embd // self.base_cfg.n_head
        target = self.mst_plan.mst_total_flops / (self.args.steps * self.tokens_per_step)
        best = None
        for d in range(16, self.base_cfg.n_embd + 1, 16):
            n_head = max(1, d // head_dim)
            if d % n_head:
                continue
            per_token = dense_token_flops(meta_shapes(model_config(self.args, d, n_head)), self.args.seq_len)
            if best is None or abs(per_token - target) < abs(best["token_flops"] - target):
                best = {"n_embd": d, "n_head": n_head, "token_flops": per_token, "mst_token_flops": target}
        return best

    def arm(self, base: str, seed: int, overrides: dict, steps: int | None = None):
        """``(model config, MSTConfig or None, delay)`` of one arm in a run of ``steps`` steps (default ``--steps``;
        only GMP's delay depends on it)."""
        args = self.args
        if base == "dense":
            return self.base_cfg, None, 0
        if base == "small_dense":
            return model_config(args, self.small["n_embd"], self.small["n_head"]), None, 0
        if base == "mst":
            return self.base_cfg, mst_config(args, seed, overrides), 0
        if base in ("rigl", "static"):
            # static: no drop-grow, and one update only (step 0), so no step pays the dense-gradient surcharge
            fields = dict(grow_method="gradient") if base == "rigl" else dict(
                drop_fraction=0.0, drop_fraction_schedule="constant", update_interval=10**9)
            fields.update(overrides)
            return self.base_cfg, constant_config(args, seed, self.mst_density, **fields), 0
        g = self.gmp if base == "gmp" else self.gmp_matched
        cfg, delay = gmp_config(args, seed, g["start"], g["end"], g["sparsity"], steps)
        return self.base_cfg, cfg, delay
