"""Scaled dense-vs-MST study on the public-domain State of the Union text (pre-tokenised by prepare_data.py).

Methods, each for the same number of optimizer steps and tokens:

* ``dense``: plain `transformers.Trainer`;
* ``mst``: `MSTTrainer` with the ``gpt2-4x`` preset, topology updates scaled to the run (``--update_interval``);
* ``static``: fixed random Erdős–Rényi masks (no drop/grow) at MST's mean weight density, dense attention;
* ``rigl``: constant-sparsity RigL (gradient growth, cosine drop fraction) at the same mean density, dense attention;
* ablations of MST: ``mst_no_hsa`` (dense attention), ``mst_no_mg`` (gradient growth in every phase), ``mst_no_sv``
  (no sparsity variation: constant sparsity at MST's mean density, with MG and HSA), ``mst_linear_restoration``
  (connections given back linearly instead of the cubic time mirror, so they are regrown earlier).

    PYTHONPATH=. python bench/study.py --data .gpu/data --methods dense,mst,static,rigl --seeds 0 --out results

Reports validation loss / perplexity on held-out years, counted training FLOPs (``mst_hf.flops``: a count, not a
time) and wall time.
"""

import argparse
import math
import time

import numpy as np
import torch
from _common import TokenBlocks, gpt2, hardware, versions, write_json
from transformers import Trainer, TrainingArguments

from mst_hf import MSTConfig, MSTTrainer
from mst_hf.flops import dense_step_flops, model_flop_shapes
from mst_hf.plan import plan_run


def mst_config(method: str, args, mean_density: float | None = None) -> MSTConfig | None:
    base = dict(update_interval=args.update_interval, seed=args.seed_value)
    if method == "mst":
        return MSTConfig.from_preset("gpt2-4x", **base)
    if method == "mst_no_hsa":
        return MSTConfig.from_preset("gpt2-4x", hsa_pattern="dense", **base)
    if method == "mst_linear_restoration":
        return MSTConfig.from_preset("gpt2-4x", restoration_curve="linear", **base)
    if method == "mst_no_mg":
        return MSTConfig.from_preset("gpt2-4x", grow_method="gradient", **base)
    constant = dict(initial_sparsity=1 - mean_density, ultra_sparsity=1 - mean_density,
                    final_sparsity=1 - mean_density, warmup_ratio=0.0, restoration_ratio=0.0, **base)
    if method == "static":
        return MSTConfig(drop_fraction=0.0, drop_fraction_schedule="constant", hsa_pattern="dense", **constant)
    if method == "rigl":
        return MSTConfig(grow_method="gradient", hsa_pattern="dense", **constant)
    if method == "mst_no_sv":
        preset = MSTConfig.from_preset("gpt2-4x")
        return MSTConfig(hsa_pattern=preset.hsa_pattern, hsa_window=preset.hsa_window, hsa_stride=preset.hsa_stride,
                         hsa_phases=["ultra"], **constant)
    return None


def run(method: str, seed: int, args, train, val, mean_density: float) -> dict:
    args.seed_value = seed
    cfg = mst_config(method, args, mean_density)
    attn = "mst_hsa" if cfg is not None and cfg.hsa_pattern != "dense" else "sdpa"
    model = gpt2(args.model, args.seq_len, seed=seed, attn_implementation=attn)
    targs = TrainingArguments(
        output_dir=f"/tmp/study/{method}-{seed}", max_steps=args.steps, per_device_train_batch_size=args.batch,
        per_device_eval_batch_size=args.batch, learning_rate=args.lr, lr_scheduler_type="cosine",
        warmup_steps=args.lr_warmup, weight_decay=0.1, adam_beta2=0.95, max_grad_norm=1.0,
        bf16=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),
        logging_steps=max(args.steps // 20, 1), eval_strategy="steps", eval_steps=max(args.steps // 4, 1),
        report_to=[], save_strategy="no", disable_tqdm=True, seed=seed,
        dataloader_num_workers=2 if torch.cuda.is_available() else 0,
        torch_compile=args.compile,
    )
    common = dict(train_dataset=train, eval_dataset=val)
    trainer = Trainer(model, targs, **common) if cfg is None else MSTTrainer(model, targs, mst_config=cfg, **common)
    t0 = time.time()
    out = trainer.train()
    wall = time.time() - t0
    ev = trainer.evaluate()
    fm = model_flop_shapes(model)
    dense_flops = args.steps * dense_step_flops(fm, args.batch * args.seq_len, args.seq_len)
    mst_flops = out.metrics.get("mst/total_flops", dense_flops)
    row = {"method": method, "seed": seed, "val_loss": ev["eval_loss"], "val_ppl": math.exp(ev["eval_loss"]),
           "train_loss": out.training_loss, "flops": mst_flops, "dense_flops": dense_flops,
           "flop_reduction": dense_flops / mst_flops, "wall_s": wall,
           "final_sparsity": trainer.mst.masks.sparsity() if cfg is not None else 0.0,
           "eval_curve": [(h["step"], h["eval_loss"]) for h in trainer.state.log_history if "eval_loss" in h]}
    print(f"{method} seed {seed}: val_loss {row['val_loss']:.4f} ppl {row['val_ppl']:.2f} "
          f"reduction {row['flop_reduction']:.3f}x wall {wall:.0f}s", flush=True)
    del trainer, model
    torch.cuda.empty_cache()
    return row


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", default=".gpu/data")
    p.add_argument("--model", default="gpt2-124m")
    p.add_argument("--seq_len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--update_interval", type=int, default=25)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--lr_warmup", type=int, default=30)
    p.add_argument("--methods", default="dense,mst,static,rigl")
    p.add_argument("--seeds", default="0")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--out", default="results")
    args = p.parse_args()
    train = TokenBlocks(f"{args.data}/train.bin", args.seq_len)
    val = TokenBlocks(f"{args.data}/val.bin", args.seq_len)
    plan = plan_run(gpt2(args.model, args.seq_len).config, MSTConfig.from_preset(
        "gpt2-4x", update_interval=args.update_interval), args.steps, args.batch * args.seq_len, args.seq_len)
    mean_density = float(1.0 - np.mean(plan.arrays["sparsity"]))
    print(f"planned MST reduction {plan.flop_reduction:.3f}x, mean weight density {mean_density:.4f}", flush=True)
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for method in args.methods.split(","):
            rows.append(run(method, seed, args, train, val, mean_density))
            write_json(f"{args.out}/study.json", {"args": vars(args), "mean_density": mean_density, "rows": rows,
                                                  "hardware": hardware(), "versions": versions()})
    lines = [
        f"Command: `PYTHONPATH=. python bench/study.py --data {args.data} --model {args.model} --seq_len "
        f"{args.seq_len} --batch {args.batch} --steps {args.steps} --update_interval {args.update_interval} "
        f"--lr {args.lr} --methods {args.methods} --seeds {args.seeds}`",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; hardware: {hardware()}; {versions()}",
        f"Train tokens per run: {args.steps * args.batch * args.seq_len:,} ({len(train)} blocks of {args.seq_len} "
        f"available); validation: {len(val)} blocks (addresses 2011-2021). Static/RigL mean density "
        f"{mean_density:.4f} (MST's planned mean).",
        "",
        "| method | seed | val loss | val ppl | counted FLOPs | counted reduction | wall time (s) | final sparsity |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['method']} | {r['seed']} | {r['val_loss']:.4f} | {r['val_ppl']:.2f} | {r['flops']:.3e} | "
                     f"{r['flop_reduction']:.3f}x | {r['wall_s']:.0f} | {r['final_sparsity']:.3f} |")
    text = "\n".join(lines)
    print(text)
    with open(f"{args.out}/study.md", "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
