"""Training one arm of the study: the loop, its evaluations and the run's record.

The loop is the one ``MSTController``'s docstring writes (``before_forward``, backward, ``after_backward``, optimizer
step, ``after_optimizer_step``); the learning rate is :func:`mst_hf.schedule.lr_multiplier`; the FLOPs are the
controller's own meter, and the run priced under every convention by :class:`study.pricing.ConventionMeters`.
"""

import os
import time

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from mst_hf import MSTConfig, MSTController, model_flop_shapes
from mst_hf.flops import dense_flop_shares as flop_shares
from mst_hf.flops import dense_token_flops
from mst_hf.io.files import write_json
from mst_hf.optim import ElementwiseAdamW
from mst_hf.plan import convention_reductions
from mst_hf.reporting import describe_hardware, package_versions
from mst_hf.schedule import lr_multiplier

from .arms import STUDY_KEYS, Study
from .data import load_tokens
from .pricing import ConventionMeters
from .spikes import DEFAULT_THRESHOLD, detect_spikes, spike_rule

LR_FIELDS = ("lr_schedule", "lr_floor", "lr_decay_start")  # what a dense arm's overrides may set
MATRIX_DECAY = 0.1  # AdamW's weight decay on matrices and embeddings (none on biases and norms)


def lr_config(args, cfg: MSTConfig | None, overrides: dict, label: str) -> MSTConfig:
    """The config whose ``lr_schedule`` gives the arm's learning rate (:func:`mst_hf.schedule.lr_multiplier`): a
    sparse arm's own when it sets one; otherwise ``"cosine_floor"`` to ``--lr_floor``, with a dense arm's
    learning-rate overrides on top (``"wsd"`` then decays from the default restoration start)."""
    if cfg is not None and cfg.lr_schedule is not None:
        return cfg
    fields = {"lr_schedule": "cosine_floor", "lr_floor": args.lr_floor}
    if cfg is None:
        bad = sorted(set(overrides) - set(LR_FIELDS))
        if bad:
            raise ValueError(f"`--arm {label}=...`: a dense arm only takes the learning-rate overrides {LR_FIELDS} "
                             f"(and the study keys {STUDY_KEYS}), got {bad}; set other fields on a sparse arm.")
        fields.update(overrides)
    return MSTConfig(hsa_pattern="dense", **fields)


def warmup_steps(args, steps: int | None = None) -> int:
    """``--lr_warmup`` of the run's ``steps`` (default ``--steps``), at least one."""
    return max(1, int(round(args.lr_warmup * (steps or args.steps))))


def training_order(n_blocks: int, per_pass: int, seed: int, passes: int = 1) -> torch.Tensor:
    """The block of every sequence of the run, pass after pass: the first ``per_pass`` blocks of a permutation of
    the ``n_blocks`` training blocks drawn from a generator seeded by ``seed`` (pass 0: the single-pass order), then
    for each later pass the same blocks in a fresh order, the next permutation the same generator draws."""
    generator = torch.Generator().manual_seed(seed)
    blocks = torch.randperm(n_blocks, generator=generator)[:per_pass]
    later = [blocks[torch.randperm(per_pass, generator=generator)] for _ in range(1, passes)]
    return torch.cat([blocks, *later]) if later else blocks


def param_groups(model, ctl, overrides: dict) -> tuple[list[dict], list[str | None]]:
    """AdamW's parameter groups and, per group, the masked matrix it holds (``None`` for the others).

    Decay ``MATRIX_DECAY`` on matrices and embeddings, none on biases and norms; with ``lr_density_exponent`` or
    ``masked_weight_decay`` in ``overrides``, each masked matrix gets a group of its own (the weight decay
    ``masked_weight_decay``; its learning rate is scaled by :func:`lr_lambdas`)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    if ctl is None or not {"lr_density_exponent", "masked_weight_decay"} & set(overrides):
        return [{"params": decay, "weight_decay": MATRIX_DECAY}, {"params": no_decay, "weight_decay": 0.0}], [None] * 2
    masked = {id(p): name for name, p in ctl.masks.params.items()}
    groups = [{"params": [p for p in decay if id(p) not in masked], "weight_decay": MATRIX_DECAY},
              {"params": no_decay, "weight_decay": 0.0}]
    wd = float(overrides.get("masked_weight_decay", MATRIX_DECAY))
    groups += [{"params": [p], "weight_decay": wd} for p in ctl.masks.params.values()]
    names = [None, None, *ctl.masks.params]
    kept = [i for i, g in enumerate(groups) if g["params"]]
    return [groups[i] for i in kept], [names[i] for i in kept]


def lr_lambdas(multiplier, ctl, names: list[str | None], exponent: float | None) -> list:
    """One ``LambdaLR`` factor per group: ``multiplier(t)``, divided for a masked matrix's group by
    ``density ** exponent``, the density of its mask when the learning rate is set (after the previous step)."""
    def scaled(name):
        def factor(t):
            density = ctl.masks.density(name)
            return multiplier(t) / density**exponent if density > 0 else multiplier(t)
        return factor

    return [multiplier if name is None or exponent is None else scaled(name) for name in names]


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
    # the study keys of the arm: passes over the blocks, peak LR, Adam's beta2 (e.g. HF's default 0.999 for 0.95)
    passes = int(overrides.get("passes", getattr(args, "passes", 1)))
    steps, lr = args.steps * passes, float(overrides.get("lr", args.lr))
    beta2 = float(overrides.get("adam_beta2", 0.95))
    threshold = float(getattr(args, "spike_threshold", DEFAULT_THRESHOLD))
    order = training_order(len(train), needed, seed, passes).to(device)
    evals = {s: blocks_of(load_tokens(os.path.join(args.data, f"{s}.bin")), args.seq_len, device)
             for s in ("val", "heldout")}
    curve_sets = {s: b[: args.curve_blocks] for s, b in evals.items()}
    extra = extra_val_blocks(args, device)

    mst_overrides = {k: v for k, v in overrides.items() if k not in STUDY_KEYS}
    mcfg, cfg, delay = study.arm(base, seed, mst_overrides, steps)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(mcfg, attn_implementation="sdpa").to(device)
    ctl = MSTController(model, cfg) if cfg is not None else None
    fm = ctl.flops.flop_model if ctl is not None else model_flop_shapes(model, MSTConfig(hsa_pattern="dense"))
    pricing = ConventionMeters(fm)
    meter = ctl.flops if ctl is not None else pricing.meters["headline"]  # the run's counted FLOPs
    groups, group_masks = param_groups(model, ctl, overrides)
    if cfg is not None and cfg.regrow_optimizer_state == "restart":  # per-element bias correction (mst_hf.optim)
        opt = ElementwiseAdamW(groups, lr=lr, betas=(0.9, beta2))
    else:
        opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, beta2), fused=device.type == "cuda")
    lr_cfg, warm = lr_config(args, cfg, mst_overrides, label), warmup_steps(args, steps)
    lambdas = lr_lambdas(lambda t: lr_multiplier(t, steps, lr_cfg, warm), ctl, group_masks,
                         overrides.get("lr_density_exponent"))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambdas)
    total_sched = steps - delay
    eval_steps = set(np.linspace(0, steps, args.evals + 1).round().astype(int).tolist()[1:])
    n_active_sum = 0
    curve = [{"step": 0, "tokens": 0, "flops": 0.0, "train_s": 0.0,
              **{s: evaluate(model, b, args.eval_batch, autocast) for s, b in curve_sets.items()}}]
    train_time, t_prev, losses = 0.0, time.time(), []
    non_target = fm.n_params - (sum(m.numel() for m in ctl.masks.masks.values()) if ctl is not None else 0)
    non_embedding = sum(p.numel() for n, p in model.named_parameters()
                        if not n.startswith(("transformer.wte", "transformer.wpe")))
    # the library's plan-based conventions (mst_hf.conventions) of an undelayed sparse arm
    planned = None
    if cfg is not None and delay == 0:
        planned = convention_reductions(fm, cfg, steps, args.batch * args.seq_len, args.seq_len)

    def snapshot(steps_done: int, final: dict | None) -> dict:
        """The run's record after ``steps_done`` steps (``final`` evaluations only at the end)."""
        tokens = steps_done * args.batch * args.seq_len
        base_dense = tokens * dense_token_flops(study.base_fm, args.seq_len)
        conventions = pricing.totals()
        spikes = detect_spikes(losses, steps, threshold)
        return {
            "label": label, "arm": base, "overrides": overrides, "seed": seed, "rung": args.rung,
            "complete": final is not None, "lr": lr, "passes": passes, "steps_per_pass": args.steps,
            "spike_rule": spike_rule(threshold), "spikes": spikes, "unstable": bool(spikes),
            "model": {"n_layer": mcfg.n_layer, "n_embd": mcfg.n_embd, "n_head": mcfg.n_head,
                      "vocab": mcfg.vocab_size, "non_embedding_params": non_embedding, "matmul_params": fm.n_params,
                      "mean_active_matmul_params": non_target + n_active_sum / max(1, steps_done),
                      "flop_shares": flop_shares(fm, args.seq_len)},
            "mst_config": cfg.mst_dict() if cfg is not None else None, "schedule_delay_steps": delay,
            "steps": steps_done, "planned_steps": steps, "tokens": tokens,
            "counted_flops": float(meter.total_flops), "base_dense_flops": float(base_dense),
            "reduction": {k: None if v is None else base_dense / v if v else 1.0 for k, v in conventions.items()},
            "conventions_flops": conventions, "planned_conventions": planned,
            "final": final, "curve": curve, "train_loss": losses,
            "final_sparsity": ctl.masks.sparsity() if ctl is not None else 0.0,
            "topology_updates": len(ctl.history) if ctl is not None else 0,
            "wall_train_s": train_time, "wall_total_s": time.time() - t_start, "jobs": getattr(args, "jobs", None),
            "hardware": describe_hardware(), "versions": package_versions(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        }

    for step in range(steps):
        x = train[order[step * args.batch : (step + 1) * args.batch]].long()
        s = max(0, step - delay)
        if ctl is not None:
            ctl.before_forward(s, total_sched, {"input_ids": x})
        with autocast():
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        if ctl is not None:
            n_active_sum += sum(ctl.masks.active(n) for n in ctl.masks.masks)
            # priced as the controller's meter counts the step: the masks it ran with, before the update
            pricing.step(args.batch, args.seq_len, ctl.masks, bool(ctl.hsa_on), ctl.is_update_step(s, total_sched))
            ctl.after_backward(s, total_sched, opt)
        else:
            pricing.step(args.batch, args.seq_len)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ctl is not None:
            ctl.after_optimizer_step(opt)
        sched.step()
        if (step + 1) % max(1, steps // 50) == 0:
            losses.append((step + 1, float(loss.detach())))
        if step + 1 in eval_steps:
            if device.type == "cuda":
                torch.cuda.synchronize()
            train_time += time.time() - t_prev
            curve.append({"step": step + 1, "tokens": (step + 1) * args.batch * args.seq_len,
                          "flops": float(meter.total_flops), "train_s": train_time,
                          **{k: evaluate(model, b, args.eval_batch, autocast) for k, b in curve_sets.items()}})
            print(f"[{label} s{seed}] step {step + 1}/{steps} val {curve[-1]['val']:.4f} heldout "
                  f"{curve[-1]['heldout']:.4f} ({train_time:.0f}s)", flush=True)
            if out_path:  # a run stopped by the launcher's budget still leaves its curve
                write_json(out_path, snapshot(step + 1, None))
            t_prev = time.time()
    limit = args.final_blocks or None
    final = {k: evaluate(model, b[:limit], args.eval_batch, autocast) for k, b in {**evals, **extra}.items()}
    record = snapshot(steps, final)
    if record["unstable"]:
        print(f"[{label} s{seed}] unstable: loss spikes {record['spikes']}", flush=True)
    return record
