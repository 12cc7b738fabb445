"""Whole training steps: `MSTTrainer` with block-sparse weights on the Triton kernels against plain `Trainer`, and a
short whole MST run (all three phases, automatic kernel choice) against dense, at equal tokens. Ratios are measured
in one process, the two runs alternating.

    PYTHONPATH=. python bench/mst_step.py --model llama-1b --out $OUT/mst_step.md
    PYTHONPATH=. python bench/mst_step.py --model gpt2-124m --out $OUT/mst_step_124m.md
    PYTHONPATH=. python bench/mst_step.py --model llama-1b --mode run --steps 300 --out $OUT/mst_run.md

``--profile N`` also records the last N steps (after the timed ones) with ``torch.profiler`` in each run and
writes, next to the table, where the GPU time of a step goes (by kernel category and by operator), for dense and
MST side by side. ``--compile`` runs both with ``TrainingArguments(torch_compile=True)``:

    PYTHONPATH=. python bench/mst_step.py --model llama-1b --steps 16 --skip 8 --profile 4 --out $OUT/mst_step.md

``--mode ultra`` (default): 90% block sparsity from step 0 (the ultra phase), one topology update at step 0,
``weight_kernels="block"`` against dense `Trainer`. ``--mode run``: the default three-phase schedule with block
masks and ``weight_kernels="auto"`` (the break-even table of ``bench/blocksparse_linear.py``), wall time of the
whole run against dense, next to the counted FLOP reduction. Synthetic tokens (speed does not depend on them).

``--optimizer_state active`` trains the MST arm with AdamW moments of the active tiles only
(``MSTConfig(optimizer_state="active")``, ``mst_hf.optim_active``); the table's peak memory and the optimizer-state
bytes of each arm then show what it saves:

    PYTHONPATH=. python bench/mst_step.py --model llama-1b --optimizer_state active --out $OUT/mst_step_active.md
"""

import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Trainer, TrainerCallback, TrainingArguments

from mst_hf import MSTConfig, MSTTrainer
from mst_hf.model_sizes import model_config
from mst_hf.optim_active import optimizer_state_bytes

# name -> config maker of the sequence length; sizes from mst_hf.model_sizes, "tiny" only here
MODELS = {
    "llama-1b": lambda seq: model_config("llama-1b", max_position_embeddings=seq),
    "llama-1b-8l": lambda seq: model_config("llama-1b", num_hidden_layers=8, max_position_embeddings=seq),
    "tiny": lambda seq: LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=256, max_position_embeddings=seq),
    "gpt2-124m": lambda seq: model_config("gpt2-124m", n_positions=seq, attn_pdrop=0.0, resid_pdrop=0.0,
                                          embd_pdrop=0.0),
}


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seq: int, vocab: int):
        self.ids = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


# kernel-name patterns -> category, first match wins (CUDA kernel names of torch 2.11 / cuBLAS / Triton)
CATEGORIES = [
    ("block-sparse kernels (Triton)", ("bsr_matmul", "sampled_dw", "reduce_dw")),
    ("dense matmuls (cuBLAS)", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "splitk")),
    ("attention (SDPA)", ("flash", "fmha", "attention", "efficient_attention")),
    ("optimizer (AdamW)", ("adam", "multi_tensor_apply")),
    ("loss (log-softmax / NLL)", ("softmax", "nll_loss", "cross_entropy")),
    ("reductions", ("reduce_kernel", "reduce_")),
]


def category(kernel: str) -> str:
    name = kernel.lower()
    for cat, keys in CATEGORIES:
        if any(k in name for k in keys):
            return cat
    return "elementwise and other"


class Profile(TrainerCallback):
    """``torch.profiler`` over steps ``start .. start + n``: GPU time per kernel category and operator, per step."""

    def __init__(self, skip: int, n: int):
        self.skip, self.n, self.prof, self.summary = skip, n, None, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.skip:
            _sync()
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                           torch.profiler.ProfilerActivity.CUDA])
            self.prof.__enter__()
        elif self.prof is not None and state.global_step == self.skip + self.n:
            _sync()
            self.prof.__exit__(None, None, None)
            self.summary = summarize(self.prof, self.n)
            self.prof = None


def summarize(prof, steps: int) -> dict:
    """Milliseconds of GPU time per step: by kernel category, and the top operators by self GPU time."""
    cats: dict[str, float] = {}
    kernels: dict[str, float] = {}
    for evt in prof.events():
        if evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        ms = evt.device_time_total / 1e3 / steps
        cats[category(evt.name)] = cats.get(category(evt.name), 0.0) + ms
        kernels[evt.name[:90]] = kernels.get(evt.name[:90], 0.0) + ms
    ops = {}
    for avg in prof.key_averages():
        t = getattr(avg, "self_device_time_total", 0.0)
        if t > 0:
            ops[avg.key] = t / 1e3 / steps
    top = lambda d, n: dict(sorted(d.items(), key=lambda kv: -kv[1])[:n])  # noqa: E731
    return {"steps": steps, "gpu_ms": sum(cats.values()), "categories": top(cats, 20), "ops": top(ops, 25),
            "kernels": top(kernels, 25)}


def profile_markdown(rows: list[dict]) -> list[str]:
    d = next(r for r in rows if r["kind"] == "dense" and "profile" in r)["profile"]
    m = next(r for r in rows if r["kind"] == "mst" and "profile" in r)["profile"]
    lines = ["", f"GPU time per step (ms, torch.profiler over {d['steps']} steps; kernels only, the host is not "
                 "counted):", "", "| category | dense | MST | MST - dense |", "|---|---|---|---|"]
    for cat in sorted(set(d["categories"]) | set(m["categories"]), key=lambda c: -d["categories"].get(c, 0.0)):
        a, b = d["categories"].get(cat, 0.0), m["categories"].get(cat, 0.0)
        lines.append(f"| {cat} | {a:.2f} | {b:.2f} | {b - a:+.2f} |")
    lines.append(f"| **all kernels** | {d['gpu_ms']:.2f} | {m['gpu_ms']:.2f} | {m['gpu_ms'] - d['gpu_ms']:+.2f} |")
    for kind, prof in (("dense", d), ("MST", m)):
        lines += ["", f"Top operators by self GPU time, {kind} (ms per step):", "", "| operator | ms |", "|---|---|"]
        lines += [f"| `{k}` | {v:.2f} |" for k, v in prof["ops"].items()]
    return lines


class KernelTrace(TrainerCallback):
    """Target layers on the block kernel at each step of an MST run (``--mode run``: what automatic choice did)."""

    def __init__(self):
        self.trainer, self.per_step = None, []

    def on_step_end(self, args, state, control, **kwargs):
        wk = self.trainer.mst.weight_kernels if self.trainer is not None else None
        if wk is not None:
            self.per_step.append(wk.block_layers())


class Timer(TrainerCallback):
    """Synchronised wall time of steps ``skip..end``."""

    def __init__(self, skip: int, end: int):
        self.skip, self.end, self.t0, self.t1 = skip, end, None, None

    def on_train_begin(self, args, state, control, **kwargs):
        if self.skip == 0:  # --mode run: the whole run, Triton compilation and kernel choice included
            _sync()
            self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in (self.skip, self.end):
            _sync()
            if state.global_step == self.skip:
                self.t0 = time.perf_counter()
            else:
                self.t1 = time.perf_counter()


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run(kind: str, args) -> dict:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(MODELS[args.model](args.seq_len), attn_implementation="sdpa")
    cuda = torch.cuda.is_available()
    targs = TrainingArguments(output_dir="/tmp/mst_step", max_steps=args.steps,
                              per_device_train_batch_size=args.batch, learning_rate=3e-4, bf16=cuda,
                              logging_steps=10**6, report_to=[], save_strategy="no", disable_tqdm=True, seed=0,
                              lr_scheduler_type="constant", dataloader_num_workers=2 if cuda else 0, use_cpu=not cuda,
                              torch_compile=args.compile)
    data = Tokens(args.steps * args.batch, args.seq_len, model.config.vocab_size)
    end = args.steps - args.profile  # the profiled steps come after the timed ones
    timer = Timer(args.skip, end)
    callbacks = [timer]
    prof = None
    if args.profile:
        prof = Profile(end, args.profile)
        callbacks.append(prof)
    trace = KernelTrace()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    if kind == "dense":
        trainer = Trainer(model, targs, train_dataset=data, callbacks=callbacks)
    else:
        if args.mode == "ultra":
            cfg = MSTConfig(initial_sparsity=args.sparsity, ultra_sparsity=args.sparsity, final_sparsity=args.sparsity,
                            warmup_ratio=0.0, restoration_ratio=0.0, update_interval=10**6, hsa_pattern="dense",
                            sparsity_structure="block", block_size=args.block, weight_kernels="block",
                            optimizer_state=args.optimizer_state)
        else:
            cfg = MSTConfig(sparsity_structure="block", block_size=args.block, weight_kernels="auto",
                            hsa_pattern="dense", update_interval=max(args.steps // 10, 1),
                            optimizer_state=args.optimizer_state)
        trainer = MSTTrainer(model, targs, mst_config=cfg, train_dataset=data, callbacks=[*callbacks, trace])
        trace.trainer = trainer
    t_start = time.perf_counter()
    out = trainer.train()
    _sync()
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    result = {"kind": kind, "timed_s": timer.t1 - timer.t0, "timed_steps": end - args.skip,
              "wall_s": time.perf_counter() - t_start, "peak_gib": peak,
              "optimizer_state_gib": optimizer_state_bytes(trainer.optimizer) / 2**30, "loss": out.training_loss}
    if prof is not None and prof.summary is not None:
        result["profile"] = prof.summary
    if kind == "mst":
        result["flop_reduction"] = trainer.mst.flops.metrics().get("mst/flop_reduction")
        wk = trainer.mst.weight_kernels
        result["kernel_choice"] = {} if wk is None else dict(wk.choice)
        result["block_layers_per_step"] = trace.per_step
    del trainer, model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def _device() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama-1b", choices=sorted(MODELS))
    p.add_argument("--mode", default="ultra", choices=["ultra", "run"])
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8, help="sequences per step (8 x 2048 = 16k tokens)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--skip", type=int, default=10, help="steps excluded from timing (warm-up, Triton compilation)")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--profile", type=int, default=0, help="torch.profiler over this many steps after --skip (0: off)")
    p.add_argument("--compile", action="store_true", help="TrainingArguments(torch_compile=True) for both runs")
    p.add_argument("--optimizer_state", default="dense", choices=["dense", "active"],
                   help="MST arm's AdamW moments: dense (every weight) or active (active tiles only)")
    p.add_argument("--out", default="mst_step.md")
    args = p.parse_args()
    if args.mode == "run":
        args.skip = 0  # the whole run counts
    if args.profile < 0 or args.skip + args.profile >= args.steps:
        raise ValueError(f"--profile {args.profile}: needs 0 <= --profile and --skip + --profile < --steps "
                         f"({args.skip} + {args.profile} >= {args.steps}); raise --steps.")
    rows = []
    for r in range(args.repeats):
        for kind in ("dense", "mst") if r % 2 == 0 else ("mst", "dense"):
            res = run(kind, args)
            res["repeat"] = r
            rows.append(res)
            print(json.dumps({k: v for k, v in res.items()
                              if k not in ("kernel_choice", "profile", "block_layers_per_step")}), flush=True)
    flags = " ".join(f"--{k}" if v is True else f"--{k} {v}" for k, v in vars(args).items()
                     if k != "out" and v is not False)
    lines = [f"Command: `PYTHONPATH=. python bench/mst_step.py {flags}`",
             f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {_device()}, torch "
             f"{torch.__version__}", "",
             "| repeat | dense s/step | MST s/step | speed-up (dense time / MST time) | dense peak GiB | MST peak GiB "
             "| dense optimizer state GiB | MST optimizer state GiB | counted FLOP reduction |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in range(args.repeats):
        d = next(x for x in rows if x["repeat"] == r and x["kind"] == "dense")
        m = next(x for x in rows if x["repeat"] == r and x["kind"] == "mst")
        lines.append(f"| {r} | {d['timed_s'] / d['timed_steps']:.4f} | {m['timed_s'] / m['timed_steps']:.4f} | "
                     f"{d['timed_s'] / m['timed_s']:.3f} | {d['peak_gib']:.1f} | {m['peak_gib']:.1f} | "
                     f"{d['optimizer_state_gib']:.2f} | {m['optimizer_state_gib']:.2f} | "
                     f"{m.get('flop_reduction') or float('nan'):.3f} |")
    m = next(x for x in rows if x["kind"] == "mst")
    choice = m.get("kernel_choice", {})
    lines.append("")
    n_block = sum(v == "block" for v in choice.values())
    lines.append(f"Layers on the block kernel at the end: {n_block} of {len(choice)}.")
    trace = m.get("block_layers_per_step") or []
    if trace and choice:
        on = [n for n in trace if n]
        lines.append(f"Steps with at least one layer on the block kernel: {len(on)} of {len(trace)}; layers on it, "
                     f"averaged over all steps: {sum(trace) / len(trace):.1f} of {len(choice)} (max {max(trace)}).")
    if args.profile:
        lines += profile_markdown(rows)
    text = "\n".join(lines)
    print(text)
    with open(args.out, "w") as f:
        f.write(text + "\n")
    with open(args.out.replace(".md", ".json"), "w") as f:
        json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
