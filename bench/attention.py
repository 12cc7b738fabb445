"""Forward + backward time of each HSA pattern and kernel against SDPA causal attention, on one CUDA GPU.

    PYTHONPATH=. python bench/attention.py --out docs/attention_benchmark_table.md [--json times.json]

``--json PATH`` also writes the ``auto`` rows as the planner's attention time table (the format of
``mst_hf/attention/times.json``, through `mst_hf.attention.timing.parse_benchmark`); an existing file keeps its
other GPUs. ``python -m mst_hf.plan --gpu NAME --attention-table PATH`` then predicts attention time on this GPU.

For each sequence length T the batch is ``tokens // T`` (about 32k tokens per step), H=12 heads of D=64 (GPT-2
small), bf16. Each cell is the median of `triton.testing.do_bench` over ``torch.autograd.grad(out, (q, k, v), g)``,
the best of `--rounds` interleaved rounds over all cells of a length (the baseline too),
after warm-up calls (compilation and mask building excluded). Columns:

- speed-up: SDPA causal time / this time, measured in the same run (> 1 is faster than dense causal);
- density: attended (query, key) pairs / causal pairs, exact (`mst_hf.attention.patterns.attention_density`);
- flex blocks: 128x128 blocks the flex layout computes / blocks of causal attention (what flex's BlockMask sees);
- err: largest relative L2 error of the output and of the q/k/v gradients against SDPA with the boolean pattern
  mask (T <= 4096); above that, of the output on a 2048-token prefix (the patterns are causal, so a prefix is
  self-contained).

Kernels listed per pattern are `auto` (which measures its candidates once and keeps the fastest) and each candidate
`auto` considers (`mst_hf.attention.dispatch.auto_candidates`). Inputs are (B, H, T, D) views of (B, T, H, D) memory,
the layout transformers' attention modules pass.
"""

import argparse
import datetime
import sys

import torch
import torch._dynamo
import torch.nn.functional as F


def _triton_version():
    import triton

    return triton.__version__


def bench_ms(fn, warmup_calls=3):
    import triton.testing

    for _ in range(warmup_calls):
        fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def bench_length(T, args, emit):
    """All patterns and kernels at one sequence length; `emit` writes a table row."""
    from mst_hf.attention.dispatch import auto_candidates, auto_kernel, hsa_attention, run_kernel
    from mst_hf.attention.impl.flex import flex_block_counts
    from mst_hf.attention.patterns import HSASpec, attention_density

    device = torch.device("cuda")
    B = max(1, args.tokens // T)
    torch.manual_seed(0)
    # (B, H, T, D) views of (B, T, H, D) memory: the layout transformers' attention modules pass
    q, k, v = (
        torch.randn(B, T, args.heads, args.head_dim, device=device, dtype=torch.bfloat16).transpose(1, 2)
        .requires_grad_(True)
        for _ in range(3)
    )
    g = torch.randn_like(q)

    def fwd_bwd(attend):
        return lambda: torch.autograd.grad(attend(), (q, k, v), g)

    # every cell is timed in `args.rounds` interleaved rounds and keeps its best: no kernel (the baseline included)
    # is judged only on a round where the GPU clocks or the host happened to be slow
    baseline = fwd_bwd(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    cells = []  # (row cells, fn, density, flex block fraction, err)
    prefix = min(T, 2048)
    for pattern in args.patterns:
        spec = HSASpec(pattern, args.window, args.stride, args.block)
        density = attention_density(pattern, T, args.window, args.stride, args.block)
        blocks, causal_blocks = flex_block_counts(spec, T, device)
        kernels = ["auto"] + [c for c in auto_candidates(spec, T, args.head_dim, device) if c != "sdpa_causal"]
        # reference: SDPA with the boolean pattern mask, on the whole sequence (T <= 4096: output and gradients)
        # or on a 2048-token prefix (output only; causal patterns make a prefix self-contained)
        if T <= 4096:
            ref = run_kernel("sdpa_bool", q, k, v, spec)
            ref_grads = torch.autograd.grad(ref, (q, k, v), g)
        else:
            with torch.no_grad():
                ref = run_kernel("sdpa_bool", *(x[:, :, :prefix] for x in (q, k, v)), spec)
        for kernel in kernels:
            run = auto_kernel(q, k, v, spec) if kernel == "auto" else kernel
            name = f"auto -> {run}" if kernel == "auto" else kernel
            row = f"| {T} | {B} | {pattern} | {name} |"
            try:
                out = run_kernel(run, q, k, v, spec)
                if T <= 4096:
                    grads = torch.autograd.grad(out, (q, k, v), g)
                    err = max([relative_error(out, ref)] + [relative_error(a, b) for a, b in zip(grads, ref_grads)])
                else:
                    err = relative_error(out[:, :, :prefix], ref)
                del out
            except torch.OutOfMemoryError:
                emit(f"{row} OOM | | | {density:.4f} | | |")
                torch.cuda.empty_cache()
                continue
            if kernel == "auto":  # through the dispatcher, as a model layer calls it
                fn = fwd_bwd(lambda spec=spec: hsa_attention(q, k, v, spec))
            else:
                fn = fwd_bwd(lambda run=run, spec=spec: run_kernel(run, q, k, v, spec))
            blk = f"{blocks / causal_blocks:.3f}" if run == "flex" else ""
            cells.append((row, fn, density, blk, err))
    best = {}
    for _ in range(args.rounds):
        best["baseline"] = min(best.get("baseline", float("inf")), bench_ms(baseline))
        for i, (_, fn, *_rest) in enumerate(cells):
            best[i] = min(best.get(i, float("inf")), bench_ms(fn))
    causal_ms = best["baseline"]
    emit(f"| {T} | {B} | (baseline) | sdpa is_causal | {causal_ms:.3f} | {causal_ms:.3f} | 1.00 | 1.000 | 1.000 | |")
    for i, (row, _, density, blk, err) in enumerate(cells):
        ms = best[i]
        emit(f"{row} {ms:.3f} | {causal_ms:.3f} | {causal_ms / ms:.2f} | {density:.4f} | {blk} | {err:.1e} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="Markdown file the table is written to")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    parser.add_argument("--tokens", type=int, default=32768, help="batch = max(1, tokens // T)")
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--stride", type=int, default=128)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--patterns", nargs="+", default=["local", "strided", "local_strided", "fixed", "dense"])
    parser.add_argument("--rounds", type=int, default=2, help="interleaved timing rounds; each cell keeps its best")
    parser.add_argument("--json", default=None, help="also write the auto rows as an attention time table here "
                        "(the format of mst_hf/attention/times.json; other GPUs in an existing file are kept)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench/attention.py needs a CUDA GPU")

    # every (layout, length) is one compiled flex entry; the sweep has more than dynamo's default limit of 8
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, 64)

    header = [
        f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; "
        f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}; triton {_triton_version()}; "
        f"H={args.heads}, D={args.head_dim}, bf16, window={args.window}, stride={args.stride}, block={args.block}; "
        f"fwd+bwd, median ms (best of {args.rounds} interleaved rounds)",
        "",
        "| T | B | pattern | kernel | ms | SDPA causal ms | speed-up | density | flex blocks | err |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = []

    def emit(row):
        rows.append(row)
        print(row, flush=True)
        with open(args.out, "w") as f:
            f.write("\n".join(header + rows) + "\n")

    print("\n".join(header), flush=True)
    for T in args.lengths:
        bench_length(T, args, emit)
        torch.cuda.empty_cache()
    if args.json:
        write_json(args.out, args.json)
    return 0


def write_json(markdown_path, json_path):
    """The auto rows of the Markdown just written, as this GPU's entry of an attention time table at `json_path`."""
    import json
    import os

    from mst_hf.attention.timing import dump_times, parse_benchmark

    with open(markdown_path, encoding="utf-8") as f:
        gpu, entry = parse_benchmark(f.read(), markdown_path)
    devices = {}
    if os.path.isfile(json_path):
        with open(json_path, encoding="utf-8") as f:
            devices = json.load(f)["devices"]
    devices[gpu] = entry
    with open(json_path, "w", encoding="utf-8") as f:
        f.write(dump_times(devices))
    print(f"attention time table for {gpu} written to {json_path}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
