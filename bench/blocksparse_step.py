"""Whole training step with every target linear on the block-sparse kernel (90% block sparsity) vs the same model
dense, interleaved in one run on one GPU.

Models (bf16 autocast, float32 master weights, fused AdamW, 16k tokens a step, SDPA attention, no dropout):
``gpt2-124m`` (GPT-2 small, 16 x 1024 tokens), ``gpt2-d2048`` (GPT-2 layout at d=2048, 24 layers, ~1.3B
parameters, 8 x 2048) and ``llama-d2048`` (Llama layout at d=2048, 16 layers, MLP 5632, ~1.0B, 8 x 2048). The
targets are the attention and MLP projections and the LM head (vocab 50304 / 32000, both divisible by 128; GPT-2's
head is tied to the token embedding, so the embedding is sparse too, as MST's default makes it).

Variants, timed round-robin on one model (same weights, same masks):
- ``dense``: plain training step, no masks (what a plain ``Trainer`` does);
- ``masked``: MST as it runs today: dense kernels, gradients and weights multiplied by the masks each step;
- ``block-<b>``: the block kernel at block size b, plus the same mask multiplications.
Masks are random with 10% of the 128 x 128 blocks active in every target (so every block size computes the same
function). Writes ``blocksparse_step.md`` and ``blocksparse_step.json`` under --out.

    PYTHONPATH=. python3 bench/blocksparse_step.py --out $OUT
"""

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig
from transformers.pytorch_utils import Conv1D

from mst_hf.kernels import disable_block_sparse, enable_block_sparse, expand_block_mask
from mst_hf.model_sizes import model_config

sys.path.insert(0, os.path.dirname(__file__))
from blocksparse_common import hardware, random_block_mask  # noqa: E402

NO_DROPOUT = dict(attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)


def sized(name, layer_field, **overrides):
    """A config maker of the library's named size ``name``: ``layers`` (None: the size's own) replaces its depth."""
    return lambda layers: model_config(name, **overrides, **({layer_field: layers} if layers else {}))


# name -> (config maker of the layer count, sequences per step, sequence length); sizes from mst_hf.model_sizes
MODELS = {
    "gpt2-124m": (sized("gpt2-124m", "n_layer", **NO_DROPOUT), 16, 1024),
    "gpt2-d2048": (sized("gpt2-d2048", "n_layer", n_positions=2048, **NO_DROPOUT), 8, 2048),
    "llama-d2048": (sized("llama-d2048", "num_hidden_layers"), 8, 2048),
    # --smoke only
    "gpt2-smoke": (lambda layers: GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=2,
                                             **NO_DROPOUT), 2, 16),
    "llama-smoke": (lambda layers: LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2),
                    2, 16),
}
MASK_BLOCK = 128
DEVICE, DTYPE = "cuda", torch.bfloat16  # --smoke: CPU interpreter, float16, blocks of 16


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def targets(model):
    """Every Linear/Conv1D of the model (projections and LM head), one entry per distinct weight."""
    seen, out = set(), []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, Conv1D)) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            out.append((name, m))
    return out


def make_masks(model, density, gen):
    """Element masks (weight layout) with `density` of the MASK_BLOCK blocks active; weights zeroed outside."""
    masks = {}
    for name, m in targets(model):
        conv1d = isinstance(m, Conv1D)
        n_out, n_in = (m.weight.shape[1], m.weight.shape[0]) if conv1d else m.weight.shape
        blocks = random_block_mask(n_out // MASK_BLOCK, n_in // MASK_BLOCK, density, gen)
        elem = expand_block_mask(blocks.t() if conv1d else blocks, MASK_BLOCK).to(m.weight.device)
        with torch.no_grad():
            m.weight.mul_(elem)
        masks[name] = (m, elem)
    return masks


def set_variant(masks, variant):
    for m, elem in masks.values():
        if variant.startswith("block-"):
            enable_block_sparse(m, elem, int(variant.split("-")[1]))
        else:
            disable_block_sparse(m)


def train_step(model, opt, ids, masks):
    with torch.autocast(DEVICE, dtype=DTYPE):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    if masks is not None:
        for m, elem in masks.values():
            m.weight.grad.mul_(elem)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if masks is not None:
        with torch.no_grad():
            for m, elem in masks.values():
                m.weight.mul_(elem)
    return loss


def check_same_function(model, masks, ids, variants):
    """Loss and LM-head gradient norm of each block variant against dense kernels on the same masked weights."""
    out = {}
    for variant in ["masked"] + [v for v in variants if v.startswith("block-")]:
        set_variant(masks, variant)
        with torch.autocast(DEVICE, dtype=DTYPE):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        gnorm = torch.stack([m.weight.grad.mul(e).norm() for m, e in masks.values()]).norm().item()
        model.zero_grad(set_to_none=True)
        out[variant] = (loss.item(), gnorm)
    set_variant(masks, "masked")
    return out


def bench_model(name, args, gen):
    make_config, batch, seq = MODELS[name]
    cfg = make_config(args.layers.get(name))
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    masks = make_masks(model, 1 - args.sparsity, gen)
    if args.compile:  # regional compilation: each decoder layer (one graph per variant, shared by all layers)
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        layers = model.transformer.h if hasattr(model, "transformer") else model.model.layers
        for layer in layers:
            layer.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=DEVICE == "cuda")
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    variants = ["dense", "masked"] + [f"block-{b}" for b in args.blocks]
    checks = check_same_function(model, masks, ids, variants)
    times = {v: [] for v in variants}
    for v in variants:  # warm-up: compile kernels, allocator, optimizer state
        set_variant(masks, v)
        for _ in range(args.warmup):
            train_step(model, opt, ids, None if v == "dense" else masks)
    sync()
    for _ in range(args.rounds):
        for v in variants:
            set_variant(masks, v)
            sync()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                train_step(model, opt, ids, None if v == "dense" else masks)
            sync()
            times[v].append((time.perf_counter() - t0) / args.steps * 1e3)
    set_variant(masks, "dense")
    med = {v: statistics.median(t) for v, t in times.items()}
    peak = torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else 0.0
    result = dict(model=name, compiled=args.compile, params=n_params,
                  layers=cfg.num_hidden_layers, tokens=batch * seq, batch=batch, seq=seq,
                  sparsity=args.sparsity, targets=len(masks), step_ms=med, all_ms=times,
                  speedup_vs_dense={v: med["dense"] / med[v] for v in variants},
                  speedup_vs_masked={v: med["masked"] / med[v] for v in variants}, checks=checks, peak_gib=peak)
    print(json.dumps({k: result[k] for k in ("model", "params", "step_ms", "speedup_vs_dense", "checks")}), flush=True)
    del model, opt, masks
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return result


def markdown(results, args, hw, elapsed):
    variants = list(results[0]["step_ms"])
    now = datetime.datetime.now(datetime.timezone.utc)
    lines = [
        f"# Whole training step, block-sparse vs dense, {now:%Y-%m-%d %H:%M} UTC",
        "",
        f"Hardware: {hw}. {'Decoder layers compiled (torch.compile per layer). ' if args.compile else ''}"
        f"bf16 autocast, fused AdamW, 16k tokens a step, every projection and the LM head at "
        f"{args.sparsity:.0%} block sparsity (random masks, 10% of 128x128 blocks active). Median of {args.rounds} "
        f"rounds of {args.steps} steps, variants interleaved. `masked` = dense kernels with the masks applied to "
        f"gradients and weights (MST today); `block-b` = the block kernel at block size b plus the same masking. "
        f"Command: `PYTHONPATH=. python3 bench/blocksparse_step.py {' '.join(sys.argv[1:])}` ({elapsed:.0f} s).",
        "",
        "| model | params | layers | " + " | ".join(f"{v} ms" for v in variants) + " | "
        + " | ".join(f"{v} vs dense" for v in variants[1:]) + " | peak GiB |",
        "|---|---|---|" + "---|" * (2 * len(variants) - 1) + "---|",
    ]
    for r in results:
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:.0f}M | {r['layers']} | "
            + " | ".join(f"{r['step_ms'][v]:.1f}" for v in variants) + " | "
            + " | ".join(f"{r['speedup_vs_dense'][v]:.2f}x" for v in variants[1:]) + f" | {r['peak_gib']:.1f} |"
        )
    lines += ["", "Same function check (loss, masked gradient norm) per variant on one batch before timing:", ""]
    for r in results:
        checks = "; ".join(f"{v} {lo:.5f} / {gn:.4e}" for v, (lo, gn) in r["checks"].items())
        lines.append(f"- {r['model']}: {checks}")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/blocksparse")
    p.add_argument("--models", nargs="+", default=["gpt2-124m", "gpt2-d2048", "llama-d2048"], choices=list(MODELS))

    p.add_argument("--blocks", type=int, nargs="+", default=[64, 128])
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--layers", nargs="*", default=[], metavar="MODEL=N", help="fewer layers, e.g. gpt2-d2048=12")
    p.add_argument("--compile", action="store_true", help="torch.compile each decoder layer (all variants)")
    p.add_argument("--smoke", action="store_true", help="a tiny GPT-2 and Llama on the CPU in Triton's interpreter "
                   "(checks the script only; set TRITON_INTERPRET=1)")
    args = p.parse_args(argv)
    args.layers = {k: int(v) for k, v in (s.split("=") for s in args.layers)}
    if args.smoke:
        global DEVICE, DTYPE, MASK_BLOCK
        DEVICE, DTYPE, MASK_BLOCK = "cpu", torch.float16, 16
        args.models, args.blocks, args.steps, args.rounds, args.warmup = ["gpt2-smoke", "llama-smoke"], [16], 1, 1, 1
    elif not torch.cuda.is_available():
        raise SystemExit("bench/blocksparse_step.py needs a CUDA GPU (or --smoke with TRITON_INTERPRET=1).")
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    hw = hardware()
    print(hw, flush=True)
    gen = torch.Generator().manual_seed(0)
    results = [bench_model(name, args, gen) for name in args.models]
    elapsed = time.time() - t0
    text = markdown(results, args, hw, elapsed)
    print(text)
    stem = "blocksparse_step_compiled" if args.compile else "blocksparse_step"
    with open(os.path.join(args.out, f"{stem}.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, f"{stem}.json"), "w") as f:
        json.dump(dict(hardware=hw, command="PYTHONPATH=. python3 bench/blocksparse_step.py " + " ".join(sys.argv[1:]),
                       results=results), f, indent=1)
    print(f"wrote {args.out} in {elapsed:.0f} s")


if __name__ == "__main__":
    main()
