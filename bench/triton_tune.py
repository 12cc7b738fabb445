"""Launch-parameter sweep for the Triton HSA kernel (mst_hf.attention.impl.triton) on one CUDA GPU.

    PYTHONPATH=. python bench/triton_tune.py --out $OUT/triton_tune.md

For each length T (batch tokens // T, H=12, D=64, bf16, inputs as (B, H, T, D) views of (B, T, H, D) memory) and
each pattern, times forward+backward of the Triton kernel under each (tile, num_warps, num_stages) against SDPA
causal in the same run, and checks the output and gradients against SDPA with the boolean pattern mask.
"""

import argparse
import datetime
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, ".")
from bench.attention import bench_ms, relative_error  # noqa: E402
from mst_hf.attention import HSASpec  # noqa: E402
from mst_hf.attention.dispatch import run_kernel  # noqa: E402
from mst_hf.attention.impl import triton as at  # noqa: E402

CONFIGS = ["64,64,4,2,64", "64,64,4,3,64", "64,64,4,2,16", "128,64,8,2,64", "64,32,4,2,32", "128,128,8,2,128"]


def sweep_length(T, args, emit):
    """Every pattern and launch configuration at one length."""
    B = max(1, args.tokens // T)
    torch.manual_seed(0)
    q, k, v = (
        torch.randn(B, T, 12, 64, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
        for _ in range(3)
    )
    g = torch.randn_like(q)

    def fwd_bwd(attend):
        out = attend(q, k, v)
        return (out, *torch.autograd.grad(out, (q, k, v), g))

    causal = bench_ms(lambda: fwd_bwd(lambda *x: F.scaled_dot_product_attention(*x, is_causal=True)))
    for pattern in args.patterns:
        spec = HSASpec(pattern, 128, 128, 128)
        ref = fwd_bwd(lambda *x, spec=spec: run_kernel("sdpa_bool", *x, spec)) if T <= 4096 else None
        for cfg in args.configs:
            bm, bn, warps, stages, cls_tile = (int(x) for x in cfg.split(","))
            at.LAUNCH.update(bm=bm, bn=bn, num_warps=warps, num_stages=stages, cls_tile=cls_tile)
            triton_call = lambda *x, spec=spec: at.triton_attention(*x, spec)  # noqa: E731
            try:
                ms = bench_ms(lambda triton_call=triton_call: fwd_bwd(triton_call))
            except Exception as e:  # noqa: BLE001 - a config that does not compile is reported, not fatal
                emit(f"| {T} | {B} | {pattern} | {cfg} | failed: {type(e).__name__} | | | |")
                continue
            err = ""
            if ref is not None:
                err = f"{max(relative_error(a, b) for a, b in zip(fwd_bwd(triton_call), ref)):.1e}"
            emit(f"| {T} | {B} | {pattern} | {cfg} | {ms:.3f} | {causal:.3f} | {causal / ms:.2f} | {err} |")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    p.add_argument("--patterns", nargs="+", default=list(at.TRITON_PATTERNS))
    p.add_argument("--configs", nargs="+", default=CONFIGS, help="bm,bn,num_warps,num_stages,cls_tile")
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    lines = [
        f"# Triton HSA launch sweep, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, "
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}",
        "",
        "| T | B | pattern | bm,bn,warps,stages,cls_tile | ms | SDPA causal ms | speed-up | err |",
        "|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)

    def emit(line):
        print(line, flush=True)
        lines.append(line)

    for T in args.lengths:
        sweep_length(T, args, emit)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
