"""Trainer overhead of MST: the same GPT-2 124M run (bf16, context 1024) under plain `Trainer` and `MSTTrainer`
(dense attention, 90% sparsity, topology update every 100 steps), steps/s measured in one process, ratio reported;
then the same pair under ``torch_compile``.

    PYTHONPATH=. python bench/overhead.py --data .gpu/data --out results/overhead.md

MST's weight sparsity is simulated with dense tensors and masks (as the paper's reference does), so no speed-up is
expected here: the question is only how much time the masking and the topology updates add.
"""

import argparse
import time

import torch
from _common import StepTimer, TokenBlocks, gpt2, write_json
from transformers import Trainer, TrainingArguments

from mst_hf import MSTConfig, MSTTrainer
from mst_hf.reporting import describe_hardware as hardware
from mst_hf.reporting import package_versions as versions


def run_once(kind: str, compile_: bool, data, args) -> float:
    model = gpt2(args.model, args.seq_len)
    targs = TrainingArguments(
        output_dir="/tmp/overhead", max_steps=args.steps, per_device_train_batch_size=args.batch,
        learning_rate=3e-4, bf16=torch.cuda.is_available(), logging_steps=50, report_to=[], save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=2 if torch.cuda.is_available() else 0, use_cpu=not torch.cuda.is_available(),
        torch_compile=compile_, seed=0, lr_scheduler_type="constant",
    )
    timer = StepTimer(args.skip)
    common = dict(train_dataset=data, callbacks=[timer])
    if kind == "trainer":
        trainer = Trainer(model, targs, **common)
    else:
        cfg = MSTConfig(initial_sparsity=0.9, ultra_sparsity=0.9, final_sparsity=0.9, warmup_ratio=0.0,
                        restoration_ratio=0.0, update_interval=100, hsa_pattern="dense")
        trainer = MSTTrainer(model, targs, mst_config=cfg, **common)
    trainer.train()
    sps = timer.steps_per_second
    del trainer, model
    torch.cuda.empty_cache()
    return sps


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", default=".gpu/data")
    p.add_argument("--model", default="gpt2-124m")
    p.add_argument("--seq_len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=230, help="optimizer steps per run (updates every 100 steps)")
    p.add_argument("--skip", type=int, default=20, help="steps excluded from timing (warm-up, compilation)")
    p.add_argument("--repeats", type=int, default=2, help="alternating eager pairs")
    p.add_argument("--no_compile", action="store_true", help="skip the torch.compile pair")
    p.add_argument("--only_compile", action="store_true", help="skip the eager pairs")
    p.add_argument("--out", default="results/overhead.md")
    args = p.parse_args()
    data = TokenBlocks(f"{args.data}/train.bin", args.seq_len)
    rows = []
    plan = [] if args.only_compile else [(False, r) for r in range(args.repeats)]
    if not args.no_compile:
        # Compile once, untimed, so that neither timed run pays Inductor's compilation (the kernels are cached
        # on disk and shared: MST's hooks live outside the compiled model, so both runs compile the same graph).
        warm = argparse.Namespace(**{**vars(args), "steps": args.skip + 5})
        t0 = time.time()
        run_once("trainer", True, data, warm)
        print(f"compile warm-up run: {time.time() - t0:.0f} s", flush=True)
        plan.append((True, 0))
    for compile_, r in plan:
        sps = {}
        for kind in ("trainer", "mst") if r % 2 == 0 else ("mst", "trainer"):  # alternate the order
            t0 = time.time()
            sps[kind] = run_once(kind, compile_, data, args)
            print(f"compile={compile_} repeat={r} {kind}: {sps[kind]:.3f} steps/s ({time.time() - t0:.0f} s)",
                  flush=True)
        rows.append({"torch_compile": compile_, "repeat": r, "trainer_steps_per_s": sps["trainer"],
                     "mst_steps_per_s": sps["mst"], "mst_over_trainer_time": sps["trainer"] / sps["mst"]})
    tokens = args.batch * args.seq_len
    lines = [
        f"Command: `PYTHONPATH=. python bench/overhead.py --data {args.data} --model {args.model} --seq_len "
        f"{args.seq_len} --batch {args.batch} --steps {args.steps} --skip {args.skip}`",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; hardware: {hardware()}; {versions()}",
        f"Timed steps {args.skip}..{args.steps} ({tokens} tokens/step), including the topology updates at steps "
        f"{[t for t in range(100, args.steps, 100) if t >= args.skip]}.",
        "",
        "| torch.compile | repeat | Trainer steps/s | MSTTrainer steps/s | MST step time / Trainer step time |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['torch_compile']} | {r['repeat']} | {r['trainer_steps_per_s']:.3f} | "
                     f"{r['mst_steps_per_s']:.3f} | {r['mst_over_trainer_time']:.4f} |")
    text = "\n".join(lines)
    print(text)
    with open(args.out, "w") as f:
        f.write(text + "\n")
    write_json(args.out.replace(".md", ".json"), {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
