"""Whole training steps with hybrid sparse attention: `MSTTrainer` with the pattern on at every step (weights dense:
every sparsity 0) against plain `Trainer` on SDPA (flash), same model, same tokens per step, in one process, the
two runs alternating. Where does the speed of the attention kernels go in a whole step?

    PYTHONPATH=. python bench/hsa_step.py --models gpt2-124m --seq_lens 4096 8192 16384 --out $OUT/hsa_step.md
    PYTHONPATH=. python bench/hsa_step.py --models llama-1b --seq_lens 16384 --profile 3 --out $OUT/hsa_llama.md
    PYTHONPATH=. python bench/hsa_step.py --models llama-1b --seq_lens 16384 --compile --out $OUT/hsa_llama_c.md
    PYTHONPATH=. python bench/hsa_step.py --smoke --out /tmp/hsa_step.md       # CPU: tiny model, 2 steps, 256 tokens

Tokens per step are constant across lengths (``--tokens``; batch = tokens / length). Models: the study's model
(``study-s``: GPT-2, 4 layers, d=192, 3 heads, vocabulary 4096) and the table of ``bench/mst_step.py``
(``gpt2-124m``, ``llama-1b``: d=2048, 16 layers, 32 heads, 8 key/value heads, ...). The pattern, window, stride and
HSA backend are flags (``--backend auto`` measures the kernels once per shape and keeps the fastest; ``triton``
forces the Triton kernel). ``--arms dense,hsa,mst`` adds `MSTTrainer` with dense attention, which separates what
the trainer's own hooks cost from what the pattern saves.

``--profile N`` records N more steps after the timed ones with ``torch.profiler`` (``bench/mst_step.py``'s callback)
and writes where the GPU time of a step goes, by kernel category (the HSA Triton kernels their own category) and by
operator, for each arm; ``--compile`` runs every arm with ``TrainingArguments(torch_compile=True)``. The table also
gives what `mst_hf.flops` counts: attention's share of the dense step's FLOPs at that length and the pattern's
density there, which bound the speed-up a whole step can get. Synthetic tokens (speed does not depend on them).
"""

import argparse
import gc
import json
import os
import sys
import time

import torch
from _common import write_json
from mst_step import CATEGORIES, MODELS, Profile, Timer, Tokens
from transformers import AutoModelForCausalLM, GPT2Config, Trainer, TrainingArguments

from mst_hf import MSTConfig, MSTTrainer
from mst_hf.attention import HSA_BACKEND_ENV, dispatch
from mst_hf.flops import dense_flop_shares
from mst_hf.reporting import describe_hardware as hardware
from mst_hf.reporting import package_versions as versions


def study_s(seq: int) -> GPT2Config:
    """The study's model (rung S of ``bench/study.py``): GPT-2, 4 layers, d=192, 3 heads, vocabulary 4096."""
    return GPT2Config(vocab_size=4096, n_positions=seq, n_layer=4, n_embd=192, n_head=3, attn_pdrop=0.0,
                      resid_pdrop=0.0, embd_pdrop=0.0, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)


STEP_MODELS = {**MODELS, "study-s": study_s}
ARMS = ("dense", "hsa", "mst")
ARM_NAMES = {"dense": "Trainer, SDPA", "hsa": "MSTTrainer, HSA on", "mst": "MSTTrainer, dense attention"}
# HSA kernel names -> category, matched before bench/mst_step.py's categories (first match wins)
HSA_CATEGORIES = [
    ("HSA attention (Triton)", ("_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel", "_bwd_self_kernel")),
    ("HSA attention (flex)", ("flex_attention", "flex_decoding")),
]


def extend_categories() -> None:
    """Put the HSA kernel categories in front of `mst_step.CATEGORIES` (its `Profile` callback reads that list)."""
    for entry in reversed(HSA_CATEGORIES):
        if entry not in CATEGORIES:
            CATEGORIES.insert(0, entry)


def hsa_config(args, on: bool) -> MSTConfig:
    """Dense weights (every sparsity 0, no topology update); the pattern on in every phase, or dense attention."""
    return MSTConfig(initial_sparsity=0.0, ultra_sparsity=0.0, final_sparsity=0.0, warmup_ratio=0.0,
                     restoration_ratio=0.0, update_interval=10**9, hsa_pattern=args.pattern if on else "dense",
                     hsa_window=args.window, hsa_stride=args.stride, hsa_phases=["warmup", "ultra", "restoration"])


def run(arm: str, model_name: str, seq: int, args) -> dict:
    """One arm at one length: its timed steps, then the profiled ones."""
    cuda = torch.cuda.is_available()
    batch = args.tokens // seq
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(STEP_MODELS[model_name](seq), attn_implementation="sdpa")
    targs = TrainingArguments(output_dir="/tmp/hsa_step", max_steps=args.steps, per_device_train_batch_size=batch,
                              learning_rate=3e-4, bf16=cuda, logging_steps=10**6, report_to=[], save_strategy="no",
                              disable_tqdm=True, seed=0, lr_scheduler_type="constant", use_cpu=not cuda,
                              dataloader_num_workers=2 if cuda else 0, torch_compile=args.compile)
    data = Tokens(args.steps * batch, seq, model.config.vocab_size)
    end = args.steps - args.profile  # the profiled steps come after the timed ones
    timer = Timer(args.skip, end)
    callbacks = [timer]
    prof = Profile(end, args.profile) if args.profile else None
    callbacks += [prof] if prof else []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    if arm == "dense":
        trainer = Trainer(model, targs, train_dataset=data, callbacks=callbacks)
    else:
        trainer = MSTTrainer(model, targs, mst_config=hsa_config(args, arm == "hsa"), train_dataset=data,
                             callbacks=callbacks)
    dispatch._AUTO_CHOICE.clear()  # what `auto` picks in this run
    t_start = time.perf_counter()
    out = trainer.train()
    if cuda:
        torch.cuda.synchronize()
    steps = end - args.skip
    result = {"arm": arm, "model": model_name, "seq_len": seq, "batch": batch, "tokens": batch * seq,
              "s_per_step": (timer.t1 - timer.t0) / steps, "timed_steps": steps,
              "wall_s": time.perf_counter() - t_start, "loss": out.training_loss,
              "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0}
    if arm != "dense":
        ctl = trainer.mst
        result["hsa_density"] = ctl.hsa_density
        result["attention_flop_share"] = dense_flop_shares(ctl.flops.flop_model, seq)["attention"]
    if arm == "hsa":  # what ran: auto's measured choices, else the kernel a forced or compiled backend takes
        cfg = model.config
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        forced = dispatch.choose_kernel(ctl.hsa_spec, seq, head_dim, "cuda" if cuda else "cpu", args.backend)
        if args.compile and args.backend == "auto":  # auto inside torch.compile: triton where it applies
            candidates = dispatch.auto_candidates(ctl.hsa_spec, seq, head_dim, "cuda" if cuda else "cpu")
            forced = "triton" if "triton" in candidates else candidates[0]
        result["kernels"] = sorted(set(dispatch._AUTO_CHOICE.values())) or [forced]
    if prof is not None and prof.summary is not None:
        result["profile"] = prof.summary
    del trainer, model
    ctl = None  # noqa: F841 - the controller holds the model too: free it before the next run allocates
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def table(rows: list[dict], arms: list[str]) -> list[str]:
    """One line per (model, length, repeat): seconds per step of each arm, and dense time over each MST arm's."""
    others = [a for a in arms if a != "dense"]
    head = ("| model | seq | batch | repeat | " + " | ".join(f"{ARM_NAMES[a]} s/step" for a in arms) + " | "
            + " | ".join(f"speed-up {a} (dense / {a})" for a in others)
            + " | peak GiB (" + ", ".join(arms) + ") | HSA density | attention share of dense FLOPs | HSA kernel |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    keys = sorted({(r["model"], r["seq_len"], r["repeat"]) for r in rows}, key=lambda k: (k[0], k[1], k[2]))
    for model, seq, rep in keys:
        by_arm = {r["arm"]: r for r in rows if (r["model"], r["seq_len"], r["repeat"]) == (model, seq, rep)}
        d = by_arm["dense"]
        hsa = by_arm.get("hsa", {})
        lines.append(
            f"| {model} | {seq} | {d['batch']} | {rep} | "
            + " | ".join(f"{by_arm[a]['s_per_step']:.4f}" for a in arms) + " | "
            + " | ".join(f"{d['s_per_step'] / by_arm[a]['s_per_step']:.3f}" for a in others)
            + " | " + ", ".join(f"{by_arm[a]['peak_gib']:.1f}" for a in arms)
            + f" | {hsa.get('hsa_density', float('nan')):.4f} | "
            + f"{next((r['attention_flop_share'] for r in by_arm.values() if 'attention_flop_share' in r), 0):.1%}"
            + f" | {', '.join(hsa.get('kernels', ['-']))} |"
        )
    return lines


def profile_lines(rows: list[dict], arms: list[str]) -> list[str]:
    """GPU milliseconds per step by kernel category, the arms side by side, per (model, length) profiled."""
    lines = []
    for model, seq in sorted({(r["model"], r["seq_len"]) for r in rows if "profile" in r}):
        profs = {r["arm"]: r["profile"] for r in rows if (r["model"], r["seq_len"]) == (model, seq) and "profile" in r}
        present = [a for a in arms if a in profs]
        cats = sorted({c for p in profs.values() for c in p["categories"]},
                      key=lambda c: -max(p["categories"].get(c, 0.0) for p in profs.values()))
        steps = next(iter(profs.values()))["steps"]
        lines += ["", f"GPU time per step, {model} at {seq} tokens (ms; torch.profiler over {steps} steps, kernels "
                      "only: host time is not counted):", "",
                  "| category | " + " | ".join(present) + " |", "|---|" + "---|" * len(present)]
        lines += [f"| {c} | " + " | ".join(f"{profs[a]['categories'].get(c, 0.0):.2f}" for a in present) + " |"
                  for c in cats]
        lines.append("| **all kernels** | " + " | ".join(f"{profs[a]['gpu_ms']:.2f}" for a in present) + " |")
        for a in present:
            lines += ["", f"Top operators by self GPU time, {a} ({model}, {seq}; ms per step):", "",
                      "| operator | ms |", "|---|---|"]
            lines += [f"| `{k}` | {v:.2f} |" for k, v in profs[a]["ops"].items()]
    return lines


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["study-s", "gpt2-124m", "llama-1b"], choices=sorted(STEP_MODELS))
    p.add_argument("--seq_lens", nargs="+", type=int, default=[4096, 8192, 16384])
    p.add_argument("--tokens", type=int, default=32768, help="tokens per optimizer step (batch = tokens / length)")
    p.add_argument("--pattern", default="local_strided", choices=["local", "strided", "local_strided", "fixed"])
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--stride", type=int, default=128)
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "flex", "sdpa"],
                   help=f"HSA kernel ({HSA_BACKEND_ENV}); auto measures once per shape and keeps the fastest")
    p.add_argument("--arms", default="dense,hsa", help="comma-separated, from: " + ", ".join(ARMS))
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per run, profiled ones included")
    p.add_argument("--skip", type=int, default=5, help="steps excluded from timing (warm-up, compilation, auto)")
    p.add_argument("--profile", type=int, default=0, help="torch.profiler over this many steps after the timed ones")
    p.add_argument("--repeats", type=int, default=1, help="alternating pairs per (model, length)")
    p.add_argument("--compile", action="store_true", help="TrainingArguments(torch_compile=True) for every arm")
    p.add_argument("--smoke", action="store_true", help="CPU check: tiny Llama, 2 steps (+ --profile) at 256 tokens")
    p.add_argument("--out", default="hsa_step.md")
    args = p.parse_args(argv)
    if args.smoke:
        args.models, args.seq_lens, args.tokens, args.steps, args.skip = ["tiny"], [256], 512, 2 + args.profile, 1
        args.window, args.stride = 32, 32
    arms = args.arms.split(",")
    if "dense" not in arms or any(a not in ARMS for a in arms) or len(set(arms)) != len(arms):
        p.error(f"--arms {args.arms!r}: list distinct arms from {ARMS}, `dense` (the reference) among them.")
    bad = [s for s in args.seq_lens if args.tokens % s or s < 1]
    if bad:
        p.error(f"--seq_lens {bad}: each length must divide --tokens {args.tokens} (batch = tokens / length).")
    if args.profile < 0 or args.skip < 1 or args.skip + args.profile >= args.steps:
        p.error(f"--skip {args.skip} --profile {args.profile} --steps {args.steps}: needs 1 <= --skip and "
                "--skip + --profile < --steps; raise --steps.")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    extend_categories()
    if args.backend != "auto":
        os.environ[HSA_BACKEND_ENV] = args.backend
    arms = args.arms.split(",")
    command = "PYTHONPATH=. python bench/hsa_step.py " + " ".join(sys.argv[1:] if argv is None else argv)
    rows = []
    for model_name in args.models:
        for seq in args.seq_lens:
            for rep in range(args.repeats):
                for arm in arms if rep % 2 == 0 else arms[::-1]:  # alternate which arm goes first
                    res = run(arm, model_name, seq, args)
                    res["repeat"] = rep
                    rows.append(res)
                    print(json.dumps({k: v for k, v in res.items() if k != "profile"}), flush=True)
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [f"Command: `{command}`", f"Date: {date}; hardware: {hardware()}; {versions()}",
             f"Pattern {args.pattern} (window {args.window}, stride {args.stride}), HSA backend {args.backend}, "
             f"{args.tokens} tokens per step, {'torch.compile' if args.compile else 'eager'}, "
             f"{args.steps - args.skip - args.profile} timed steps after {args.skip}.", "", *table(rows, arms)]
    if args.profile:
        lines += profile_lines(rows, arms)
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    write_json(os.path.splitext(args.out)[0] + ".json", {"command": command, "date": date, "hardware": hardware(),
                                                         "versions": versions(), "args": vars(args), "rows": rows})
    return rows


if __name__ == "__main__":
    main()
