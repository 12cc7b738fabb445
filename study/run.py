"""The MST study: dense, MST, RigL, static, gradual magnitude pruning and an iso-FLOP small dense model, all at
equal tokens on the study data of ``bench/study_data.py``, with the library's counted FLOPs.

    python bench/study.py --data .gpu/study --rung S --jobs 9 --out results/study     # GPU: arms in parallel
    python bench/study.py --smoke --out /tmp/study_smoke                               # CPU: the whole pipeline
    python bench/study.py --report results/study                                       # table and plot again

Arms (``--arms``; ``--arm LABEL=BASE:field=value:...`` adds variants, e.g. ablations of MSTConfig fields):

* ``dense``: the rung's model, no masks;
* ``mst``: ``MSTController`` with ``--preset`` (topology update every ``--update_interval`` steps);
* ``rigl`` / ``static``: constant sparsity at MST's planned mean weight density (gradient growth / no drop-grow),
  dense attention;
* ``gmp``: gradual magnitude pruning on Jin et al.'s schedule (dense until ``--gmp_start`` of the steps, cubic ramp
  to the final sparsity by ``--gmp_end``, fixed after), the final sparsity solved so that the mean density equals
  MST's (capped at ``--gmp_max_sparsity``; when the cap binds, ``gmp_matched`` shortens the dense prefix and the
  ramp in the same 1:3 proportion until the mean density matches);
* ``small_dense``: the same depth, narrower, the width whose dense training FLOPs come closest to MST's planned
  FLOPs (iso-FLOP at equal tokens).

Every arm sees the same blocks in the same order for a seed (single epoch by default), AdamW (beta2 0.95, decay
0.1 on matrices), cosine LR with a warm-up and a floor, bf16 autocast on CUDA. Outputs under ``--out``: one
``ARM-sSEED.json`` per run (curves included), ``study.md`` (tables) and ``study.png`` (validation loss against
counted FLOPs).
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time
from functools import cached_property

import numpy as np
import torch
from _common import flop_shares, hardware, load_tokens, study_report, versions, write_json
from transformers import AutoModelForCausalLM, GPT2Config

from mst_hf import MSTConfig, MSTController
from mst_hf.flops import FlopMeter, attention_token_flops, dense_token_flops, model_flop_shapes
from mst_hf.plan import plan_run

RUNGS = {
    "S": dict(n_layer=4, n_embd=192, n_head=3),
    "M": dict(n_layer=6, n_embd=256, n_head=4),
    "tiny": dict(n_layer=2, n_embd=32, n_head=2),  # --smoke
}
BASE_ARMS = ("dense", "mst", "rigl", "static", "gmp", "gmp_matched", "small_dense")
DEFAULT_ARMS = "dense,mst,rigl,static,gmp,gmp_matched,small_dense"


# --------------------------------------------------------------------------- models and arms


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


def parse_arms(args) -> dict[str, tuple[str, dict]]:
    """``label -> (base arm, MSTConfig overrides)`` from ``--arms`` and every ``--arm LABEL=BASE:key=value[@SEEDS]``.
    A dense arm's overrides may only be learning-rate fields (``lr_schedule``, ``lr_floor``, ``lr_decay_start``);
    any arm may also set ``adam_beta2`` (AdamW's beta2, default 0.95), which is not an MSTConfig field."""
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


def gmp_config(args, seed: int, start: float, end: float, sparsity: float) -> tuple[MSTConfig, int]:
    """GMP as an MSTConfig run on a delayed clock: the controller sees step ``max(0, t - delay)`` of a run of
    ``T - delay`` steps, whose warm-up (the cubic ramp of Zhu & Gupta) spans ``[start, end)`` of the real run; no
    drop-and-grow (``drop_fraction=0``), so an update only prunes by magnitude. Returns ``(config, delay)``."""
    delay = int(round(start * args.steps))
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

    def arm(self, base: str, seed: int, overrides: dict):
        """``(model config, MSTConfig or None, delay)`` of one arm."""
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
        cfg, delay = gmp_config(args, seed, g["start"], g["end"], g["sparsity"])
        return self.base_cfg, cfg, delay


# --------------------------------------------------------------------------- counting conventions


def tile_k_bar(cfg: MSTConfig, seq_len: int, n_heads: int, tile: int = 64) -> float:
    """Mean keys per query when the sparse pattern is charged at whole ``tile x tile`` blocks (what a block-sparse
    kernel computes): every tile holding an admitted (query, key) pair counts in full."""
    from mst_hf.attention.patterns import pattern_mask_fn

    fn = pattern_mask_fn(cfg.hsa_pattern, cfg.hsa_window, cfg.hsa_stride, cfg.hsa_block, cfg.hsa_head_split,
                         n_heads)
    n = math.ceil(seq_len / tile)
    q = torch.arange(n * tile).view(-1, 1)
    k = torch.arange(n * tile).view(1, -1)
    pairs = 0
    for h in range(n_heads):
        m = fn(0, torch.tensor(h), q, k) & (q < seq_len) & (k < seq_len)
        pairs += int(m.view(n, tile, n, tile).any(3).any(1).sum()) * tile * tile
    return pairs / n_heads / seq_len


class Conventions:
    """Re-prices the library's count under stricter conventions: attention charged at 64x64 tiles, no attention
    credit, the tied LM head charged dense, and both (``strictest``)."""

    def __init__(self, fm, cfg: MSTConfig | None, seq_len: int, n_heads: int):
        self.fm, self.seq_len = fm, seq_len
        self.head = next((m for m in fm.matmuls if m.module_name.endswith("lm_head")), None)
        dense_attn = attention_token_flops(fm, (seq_len + 1) / 2)
        self.attn = {"dense": dense_attn, "exact": dense_attn, "tiles": dense_attn}
        if cfg is not None and cfg.hsa_pattern != "dense" and fm.hsa_layers:
            self.attn["exact"] = attention_token_flops(fm, fm.k_bar(seq_len, True))
            tiles = tile_k_bar(cfg, seq_len, n_heads)
            k = [tiles if i in fm.hsa_layers else (seq_len + 1) / 2 for i in range(fm.n_layers)]
            self.attn["tiles"] = attention_token_flops(fm, k)
        self.hsa_tokens = 0
        self.head_extra = 0  # sum over steps of tokens * (numel - a) * (6 - 2 * update)

    def step(self, tokens: int, hsa_on: bool, head_active: int | None, update: bool) -> None:
        if hsa_on:
            self.hsa_tokens += tokens
        if self.head is not None and head_active is not None:
            self.head_extra += tokens * (self.head.numel - head_active) * (6 - 2 * int(update))

    def totals(self, headline: float) -> dict[str, float]:
        no_credit = headline + self.hsa_tokens * (self.attn["dense"] - self.attn["exact"])
        return {
            "headline": float(headline),
            "tiles": float(headline + self.hsa_tokens * (self.attn["tiles"] - self.attn["exact"])),
            "no_attention_credit": float(no_credit),
            "dense_head": float(headline + self.head_extra),
            "strictest": float(no_credit + self.head_extra),
        }


# --------------------------------------------------------------------------- training one arm


def lr_at(step: int, args, cfg: MSTConfig | None = None) -> float:
    """The config's own ``lr_schedule`` when it sets one (``mst_hf.schedule.lr_multiplier``); otherwise linear
    warm-up, then cosine from 1 to ``--lr_floor`` (a fraction of the peak)."""
    warm = max(1, int(round(args.lr_warmup * args.steps)))
    if cfg is not None and getattr(cfg, "lr_schedule", None) is not None:
        from mst_hf.schedule import lr_multiplier

        return lr_multiplier(step, args.steps, cfg, warmup_steps=warm)
    if step < warm:
        return (step + 1) / warm
    p = (step - warm) / max(1, args.steps - warm)
    return args.lr_floor + (1 - args.lr_floor) * 0.5 * (1 + math.cos(math.pi * p))


@torch.no_grad()
def evaluate(model, blocks: torch.Tensor, batch: int, autocast) -> float:
    model.eval()
    total = 0.0
    for i in range(0, len(blocks), batch):
        x = blocks[i : i + batch].long()
        with autocast():
            total += float(model(input_ids=x, labels=x).loss) * len(x)
    model.train()
    return total / max(1, len(blocks))


def blocks_of(ids, seq_len: int, device, limit: int | None = None) -> torch.Tensor:
    n = len(ids) // seq_len if limit is None else min(limit, len(ids) // seq_len)
    return torch.from_numpy(np.asarray(ids[: n * seq_len], dtype=np.int32).reshape(n, seq_len)).to(device)


def extra_val_blocks(args, device) -> dict[str, torch.Tensor]:
    if not args.extra_val:
        return {}
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(args.data, "tokenizer.json"))
    eot = tok.token_to_id("<|endoftext|>")
    out = {}
    for spec in args.extra_val:
        name, _, path = spec.partition("=")
        if not name or not os.path.isfile(path):
            raise ValueError(f"`--extra_val {spec}` must read NAME=PATH of an existing text file.")
        with open(path, encoding="utf-8") as f:
            ids = tok.encode(f.read(), add_special_tokens=False).ids + [eot]
        out[name] = blocks_of(ids, args.seq_len, device)
    return out


def run_arm(label: str, base: str, overrides: dict, seed: int, args, study: Study, out_path: str = "") -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    if device.type == "cuda":
        def autocast():
            return torch.autocast("cuda", dtype=torch.bfloat16)
    else:
        def autocast():
            return torch.autocast("cpu", enabled=False)
    if args.hsa_backend:
        os.environ["MST_HSA_BACKEND"] = args.hsa_backend
    t_start = time.time()
    train = blocks_of(load_tokens(os.path.join(args.data, "train.bin")), args.seq_len, device)
    needed = args.steps * args.batch
    if needed > len(train):
        raise ValueError(f"{args.steps} steps x {args.batch} sequences need {needed} blocks of {args.seq_len} "
                         f"tokens; the training split has {len(train)}. Lower --steps.")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:needed].to(device)
    evals = {s: blocks_of(load_tokens(os.path.join(args.data, f"{s}.bin")), args.seq_len, device)
             for s in ("val", "heldout")}
    curve_sets = {s: b[: args.curve_blocks] for s, b in evals.items()}
    extra = extra_val_blocks(args, device)

    # training-side overrides (not MSTConfig fields): Adam's beta2, e.g. HF's default 0.999 instead of 0.95
    train_keys = {"adam_beta2"}
    beta2 = float(overrides.get("adam_beta2", 0.95))
    mst_overrides = {k: v for k, v in overrides.items() if k not in train_keys}
    mcfg, cfg, delay = study.arm(base, seed, mst_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(mcfg, attn_implementation="sdpa").to(device)
    ctl = MSTController(model, cfg) if cfg is not None else None
    meter = ctl.flops if ctl is not None else FlopMeter(model_flop_shapes(model, MSTConfig(hsa_pattern="dense")))
    conv = Conventions(meter.flop_model, cfg, args.seq_len, mcfg.n_head)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, beta2), fused=device.type == "cuda")
    lr_cfg = cfg
    if cfg is None and mst_overrides:  # a dense arm with its own learning-rate schedule (default phases for "wsd")
        bad = sorted(set(mst_overrides) - {"lr_schedule", "lr_floor", "lr_decay_start"})
        if bad:
            raise ValueError(f"arm {label!r}: a dense arm only takes learning-rate overrides, got {bad}.")
        lr_cfg = MSTConfig(hsa_pattern="dense", **mst_overrides)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, args, lr_cfg))
    total_sched = args.steps - delay
    eval_steps = set(np.linspace(0, args.steps, args.evals + 1).round().astype(int).tolist()[1:])
    n_active_sum = 0
    curve = [{"step": 0, "tokens": 0, "flops": 0.0,
              **{s: evaluate(model, b, args.eval_batch, autocast) for s, b in curve_sets.items()}}]
    train_time, t_prev, losses = 0.0, time.time(), []
    fm = meter.flop_model
    non_target = fm.n_params - (sum(m.numel() for m in ctl.masks.masks.values()) if ctl is not None else 0)
    non_embedding = sum(p.numel() for n, p in model.named_parameters()
                        if not n.startswith(("transformer.wte", "transformer.wpe")))

    planned = None  # the library's plan-based conventions (mst_hf.conventions) of an undelayed sparse arm
    if cfg is not None and delay == 0:
        from mst_hf.plan import convention_reductions

        planned = convention_reductions(fm, cfg, args.steps, args.batch * args.seq_len, args.seq_len)

    def snapshot(steps_done: int, final: dict | None) -> dict:
        """The run's record after ``steps_done`` steps (``final`` evaluations only at the end)."""
        tokens = steps_done * args.batch * args.seq_len
        base_dense = tokens * dense_token_flops(study.base_fm, args.seq_len)
        conventions = conv.totals(meter.total_flops)
        return {
            "label": label, "arm": base, "overrides": overrides, "seed": seed, "rung": args.rung,
            "complete": final is not None,
            "model": {"n_layer": mcfg.n_layer, "n_embd": mcfg.n_embd, "n_head": mcfg.n_head,
                      "vocab": mcfg.vocab_size, "non_embedding_params": non_embedding, "matmul_params": fm.n_params,
                      "mean_active_matmul_params": non_target + n_active_sum / max(1, steps_done),
                      "flop_shares": flop_shares(fm, args.seq_len)},
            "mst_config": cfg.mst_dict() if cfg is not None else None, "schedule_delay_steps": delay,
            "steps": steps_done, "planned_steps": args.steps, "tokens": tokens,
            "counted_flops": float(meter.total_flops), "base_dense_flops": float(base_dense),
            "reduction": {k: base_dense / v if v else 1.0 for k, v in conventions.items()},
            "conventions_flops": conventions, "planned_conventions": planned,
            "final": final, "curve": curve, "train_loss": losses,
            "final_sparsity": ctl.masks.sparsity() if ctl is not None else 0.0,
            "topology_updates": len(ctl.history) if ctl is not None else 0,
            "wall_train_s": train_time, "wall_total_s": time.time() - t_start,
            "hardware": hardware(), "versions": versions(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        }

    for step in range(args.steps):
        x = train[order[step * args.batch : (step + 1) * args.batch]].long()
        s = max(0, step - delay)
        hsa_on = bool(ctl.before_forward(s, total_sched, {"input_ids": x})) if ctl is not None else False
        with autocast():
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        head_active, update = None, False
        if ctl is not None:
            if conv.head is not None and conv.head.name in ctl.masks.masks:
                head_active = ctl.masks.active(conv.head.name)  # the masks this step ran with
            n_active_sum += sum(ctl.masks.active(n) for n in ctl.masks.masks)
            update = ctl.after_backward(s, total_sched, opt) is not None
        else:
            meter.add_batch(args.batch, args.seq_len)
            meter.end_step(None)
        conv.step(args.batch * args.seq_len, hsa_on, head_active, update)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ctl is not None:
            ctl.after_optimizer_step()
        sched.step()
        if (step + 1) % max(1, args.steps // 50) == 0:
            losses.append((step + 1, float(loss.detach())))
        if step + 1 in eval_steps:
            if device.type == "cuda":
                torch.cuda.synchronize()
            train_time += time.time() - t_prev
            curve.append({"step": step + 1, "tokens": (step + 1) * args.batch * args.seq_len,
                          "flops": float(meter.total_flops),
                          **{k: evaluate(model, b, args.eval_batch, autocast) for k, b in curve_sets.items()}})
            print(f"[{label} s{seed}] step {step + 1}/{args.steps} val {curve[-1]['val']:.4f} heldout "
                  f"{curve[-1]['heldout']:.4f} ({train_time:.0f}s)", flush=True)
            if out_path:  # a run stopped by the launcher's budget still leaves its curve
                write_json(out_path, snapshot(step + 1, None))
            t_prev = time.time()
    limit = args.final_blocks or None
    final = {k: evaluate(model, b[:limit], args.eval_batch, autocast) for k, b in {**evals, **extra}.items()}
    return snapshot(args.steps, final)


# --------------------------------------------------------------------------- launcher


def tasks(args) -> list[tuple[str, str, dict, int]]:
    """Every (arm, seed) run, in order: ``--seeds`` for the ``--two_seed_arms``, the first seed for the others, and
    the seeds after ``@`` for an ``--arm`` spec that has them (e.g. ``--arm x=mst:ultra_sparsity=0.8@1``)."""
    seeds = [int(s) for s in args.seeds.split(",")]
    two = set(parse_arms(args)) if args.two_seed_arms == "all" else set(args.two_seed_arms.split(","))
    explicit = {spec.partition("=")[0]: [int(x) for x in spec.partition("@")[2].split(",")]
                for spec in args.arm if "@" in spec}
    return [(label, base, ov, seed) for label, (base, ov) in parse_arms(args).items()
            for seed in explicit.get(label, seeds if label in two else seeds[:1])]


def launch(args, study: Study) -> None:
    os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)
    write_json(os.path.join(args.out, "args.json"), vars(args))
    todo = tasks(args)
    if args.jobs <= 0:  # in this process, one after the other (the CPU smoke)
        for label, base, ov, seed in todo:
            path = os.path.join(args.out, f"{label}-s{seed}.json")
            write_json(path, run_arm(label, base, ov, seed, args, study, path))
        return
    deadline = time.time() + args.budget_s
    running, queue = [], list(todo)
    while queue or running:
        while queue and len(running) < args.jobs:
            label, _, _, seed = queue.pop(0)
            log = open(os.path.join(args.out, "logs", f"{label}-s{seed}.log"), "w")
            cmd = [sys.executable, __file__, "--worker", f"{label}:{seed}", "--args_json",
                   os.path.join(args.out, "args.json")]
            running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log, label, seed))
        time.sleep(1)
        for item in list(running):
            proc, log, label, seed = item
            if proc.poll() is not None or time.time() > deadline:
                if proc.poll() is None:
                    print(f"{label} seed {seed}: past --budget_s, stopped", flush=True)
                    proc.kill()
                proc.wait()
                log.close()
                running.remove(item)
                print(f"{label} seed {seed}: exit {proc.returncode}", flush=True)


def worker(args) -> None:
    label, seed = args.worker.rsplit(":", 1)
    base, ov = parse_arms(args)[label]
    path = os.path.join(args.out, f"{label}-s{seed}.json")
    write_json(path, run_arm(label, base, ov, int(seed), args, Study(args), path))


def prepare_data(args) -> None:
    """Decompress the ``.bin.xz`` splits once (into ``--cache``) so that parallel workers only read them."""
    os.makedirs(args.cache, exist_ok=True)
    for split in ("train", "val", "heldout"):
        dst = os.path.join(args.cache, f"{split}.bin")
        if not os.path.isfile(dst):
            load_tokens(os.path.join(args.data, f"{split}.bin")).tofile(dst + ".tmp")
            os.replace(dst + ".tmp", dst)
    for name in ("tokenizer.json", "manifest.json"):
        src = os.path.join(args.data, name)
        if os.path.isfile(src) and not os.path.isfile(os.path.join(args.cache, name)):
            with open(src, "rb") as f, open(os.path.join(args.cache, name), "wb") as g:
                g.write(f.read())
    args.data = args.cache


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=".gpu/study", help="bench/study_data.py's output folder")
    p.add_argument("--cache", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "mst_study_data"))
    p.add_argument("--out", default="results/study")
    p.add_argument("--rung", default="S", choices=sorted(RUNGS))
    p.add_argument("--vocab_size", type=int, default=4096)
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=1160, help="optimizer steps (1160 x 64 x 512 = 38.0M tokens)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--lr_warmup", type=float, default=0.05, help="warm-up, fraction of the steps")
    p.add_argument("--lr_floor", type=float, default=0.1, help="final LR as a fraction of the peak")
    p.add_argument("--preset", default="gpt2-4x", help="MSTConfig preset of the mst arm")
    p.add_argument("--update_interval", type=int, default=20)
    p.add_argument("--mst_override", action="append", default=[], help="field=value for the mst arm's config")
    p.add_argument("--arms", default=DEFAULT_ARMS)
    p.add_argument("--arm", action="append", default=[], help="LABEL=BASE:field=value:... (repeatable)")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--two_seed_arms", default="dense,mst,rigl", help="arms run with every seed ('all': every arm)")
    p.add_argument("--gmp_start", type=float, default=0.25)
    p.add_argument("--gmp_end", type=float, default=0.75)
    p.add_argument("--gmp_max_sparsity", type=float, default=0.95)
    p.add_argument("--evals", type=int, default=20, help="evaluations along the run (curve points)")
    p.add_argument("--curve_blocks", type=int, default=256, help="validation blocks per curve point")
    p.add_argument("--eval_batch", type=int, default=128)
    p.add_argument("--final_blocks", type=int, default=0, help="blocks of each final evaluation (0: all)")
    p.add_argument("--extra_val", action="append", default=[], help="NAME=PATH of a text file (repeatable)")
    p.add_argument("--hsa_backend", default="", help="force an HSA backend (MST_HSA_BACKEND)")
    p.add_argument("--jobs", type=int, default=0, help="parallel worker processes (0: in this process)")
    p.add_argument("--budget_s", type=float, default=420.0, help="stop workers still running after this long")
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run of the whole pipeline")
    p.add_argument("--reference", default="dense", help="with --report: the dense arm gaps and 'FLOPs to reach' "
                   "use (e.g. dense_wsd)")
    p.add_argument("--compare", default="mst", help="with --report: the arm of the 'val - ARM' column")
    p.add_argument("--report", default=None, help="only rebuild study.md / study.png from the JSONs of these "
                   "folders (comma-separated; written to --out when given, else the first folder)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--args_json", default=None, help=argparse.SUPPRESS)
    return p


def smoke_setup(args) -> None:
    """A few seconds of everything: a 512-token BPE on Moby Dick (shipped with the package), a 2-layer model."""
    torch.set_num_threads(1)
    args.cpu, args.rung, args.vocab_size = True, "tiny", 512
    args.seq_len, args.batch, args.update_interval = 64, 8, 5
    args.steps = args.steps if "--steps" in args.command.split() else 40
    args.evals, args.curve_blocks, args.eval_batch, args.hsa_backend = 3, 8, 32, args.hsa_backend or "sdpa"
    args.mst_override = args.mst_override + ["hsa_window=16", "hsa_stride=16"]
    args.data = os.path.join(args.out, "smoke_data")
    if os.path.isfile(os.path.join(args.data, "train.bin")):
        return
    from study_data import EOT, train_bpe

    book = os.path.join(os.path.dirname(__file__), "..", "mst_hf", "data", "moby-dick", "moby-dick.txt")
    with open(book, encoding="utf-8") as f:
        text = f.read()[:400_000]  # a third of the book: enough for a 512-token BPE and 40 steps
    chunks = [text[i : i + 20000] for i in range(0, len(text), 20000)]
    splits = {"train": chunks[:-6], "val": chunks[-6:-3], "heldout": chunks[-3:]}
    tok = train_bpe(splits["train"], args.vocab_size)
    os.makedirs(args.data, exist_ok=True)
    tok.save(os.path.join(args.data, "tokenizer.json"))
    eot = tok.token_to_id(EOT)
    for name, parts in splits.items():
        ids = [i for enc in tok.encode_batch(parts, add_special_tokens=False) for i in enc.ids + [eot]]
        np.asarray(ids, dtype=np.uint16).tofile(os.path.join(args.data, f"{name}.bin"))


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    args.command = "python bench/study.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.args_json:  # a worker: the launcher's arguments, plus which run
        worker_id = args.worker
        with open(args.args_json) as f:
            args = argparse.Namespace(**json.load(f))
        args.worker = worker_id
        args.mst_overrides = {k: parse_value(v) for k, v in (o.split("=", 1) for o in args.mst_override)}
        worker(args)
        return 0
    if args.report:
        study_report(args.report, args.out if "--out" in args.command.split() else None, args.reference,
                     args.compare)
        return 0
    if args.smoke:
        smoke_setup(args)
    else:
        prepare_data(args)
    args.mst_overrides = {k: parse_value(v) for k, v in (o.split("=", 1) for o in args.mst_override)}
    study = Study(args)
    used = {base for base, _ in parse_arms(args).values()}
    plan = {"mst_reduction": study.mst_plan.flop_reduction, "mst_mean_density": study.mst_density,
            "flop_shares": flop_shares(study.base_fm, args.seq_len)}
    for key, arm in (("gmp", "gmp"), ("gmp_matched", "gmp_matched"), ("small_dense", "small_dense")):
        if arm in used:
            plan[key] = getattr(study, "small" if arm == "small_dense" else arm)
    print("study plan:", json.dumps(plan), flush=True)
    write_json(os.path.join(args.out, "study_plan.json"), plan)
    launch(args, study)
    study_report(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
