"""Per-layer benchmark of the block-sparse linear (mst_hf.kernels) against dense cuBLAS, fwd+bwd, on one GPU.

For each weight shape (square ``d x d``, MLP up ``d -> 4d`` and down ``4d -> d`` for d in --dims), block size and
density, times ``y = x @ W^T`` plus ``dX`` and ``dW`` for 16k bf16 tokens: the dense product (``F.linear``, which
is cuBLAS) and the block kernel on the same masked weight, interleaved in one run (CUDA events, warm-up, median
of rounds). A short sweep of the launch parameters runs first and the main table uses its winners.

Writes under --out: ``blocksparse_linear.md`` (tables) and ``blocksparse_breakeven.json`` (what
``mst_hf.kernels.choose_kernel`` reads, with every measurement and the sweep).

    PYTHONPATH=. python3 bench/blocksparse_linear.py --out $OUT
"""

import argparse
import copy
import datetime
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

from mst_hf.kernels import BlockLayout, block_sparse_linear, expand_block_mask, ops
from mst_hf.kernels.triton import launch

sys.path.insert(0, os.path.dirname(__file__))
from blocksparse_common import graphed, hardware, random_block_mask, time_interleaved  # noqa: E402

DEVICE = "cuda"
DTYPE = torch.bfloat16  # float16 in --smoke (the interpreter has no bfloat16 matmul)
MM_CANDIDATES = {  # (bm, bk, num_warps, num_stages) for forward and dX
    32: [(128, 32, 4, 3), (64, 32, 4, 3), (128, 32, 4, 4)],
    64: [(128, 64, 4, 3), (128, 32, 4, 4), (64, 64, 4, 3), (256, 64, 8, 3)],
    128: [(128, 64, 8, 3), (128, 128, 8, 2), (64, 128, 4, 3), (256, 64, 8, 3)],
}
DW_CANDIDATES = {  # (bm, num_warps, num_stages) for the sampled dW
    32: [(64, 4, 3), (32, 4, 3), (128, 4, 3)],
    64: [(64, 4, 3), (32, 4, 4), (64, 8, 3)],
    128: [(64, 8, 3), (32, 8, 3), (64, 4, 3), (128, 8, 2)],
}
MM_CANDIDATES[16] = [(64, 16, 4, 2), (32, 16, 4, 2)]  # --smoke only
DW_CANDIDATES[16] = [(32, 4, 2), (16, 4, 2)]
BREAK_EVEN_MARGIN = 1.05  # "faster" means at least 5% faster than dense (timing noise)


def shapes(d: int):
    return [("square", d, d), ("mlp_up", d, 4 * d), ("mlp_down", 4 * d, d)]


def masked_weight(n_in, n_out, block, density, gen, conv1d=False):
    blocks = random_block_mask(n_out // block, n_in // block, density, gen)
    w = torch.randn(n_out, n_in, device=DEVICE) * n_in**-0.5
    w = w * expand_block_mask(blocks, block).to(DEVICE)
    if conv1d:
        w = w.t().contiguous()
    return w.to(DTYPE).requires_grad_(True), BlockLayout(blocks, block)


def fwd_bwd(forward, x, w, g):
    def step():
        y = forward(x, w)
        torch.autograd.grad(y, (x, w), g)

    return step


def tune(tokens, blocks, gen, reps, rounds, n_in=2048, n_out=8192):
    """Pick each block size's launch parameters on the d=2048 MLP-up shape at density 0.1 (fwd + dX, then dW)."""
    x = torch.randn(tokens, n_in, device=DEVICE, dtype=DTYPE)
    g = torch.randn(tokens, n_out, device=DEVICE, dtype=DTYPE)
    wd = torch.randn(n_out, n_in, device=DEVICE, dtype=DTYPE)
    dense = time_interleaved(
        {"fwd": lambda: x @ wd.t(), "dx": lambda: g @ wd, "dw": lambda: g.t() @ x}, reps=reps, rounds=rounds
    )
    out = {"shape": [n_in, n_out], "density": 0.1, "tokens": tokens, "dense_ms": dense, "blocks": {}}
    for b in blocks:
        w, layout = masked_weight(n_in, n_out, b, 0.1, gen)
        out["blocks"][b] = _tune_block(b, x, g, w.detach(), layout.index(DEVICE), reps, rounds)
    return out


def _tune_block(b, x, g, w, index, reps, rounds):
    """Time the candidates of one block size; install and return the fastest (mm and dw chosen separately)."""
    chosen = copy.deepcopy(launch.LAUNCH[b])

    def with_cfg(kind, cfg, fn):
        def run():
            launch.LAUNCH[b][kind] = cfg
            fn()

        return run

    def mm():
        with launch.direct_launches():
            launch.forward(x, w, None, index, b, False)
            launch.grad_input(g, w, index, b, False)

    def dw():
        with launch.direct_launches():
            launch.grad_weight(g, x, w, index, b, False)

    cands = {
        "mm": {f"mm {bm},{bk},{nw},{ns}": dict(bm=bm, bk=bk, num_warps=nw, num_stages=ns)
               for bm, bk, nw, ns in MM_CANDIDATES[b]},
        "dw": {f"dw {bm},{nw},{ns}": dict(bm=bm, num_warps=nw, num_stages=ns) for bm, nw, ns in DW_CANDIDATES[b]},
    }
    result = {}
    for kind, fn in (("mm", mm), ("dw", dw)):
        ok = {}
        for name, cfg in cands[kind].items():
            run = with_cfg(kind, cfg, fn)
            try:
                run()
                if DEVICE == "cuda":
                    torch.cuda.synchronize()
                ok[name] = run
            except Exception as e:  # a configuration that does not compile (e.g. too much shared memory)
                result[name] = f"failed: {type(e).__name__}: {str(e)[:120]}"
        times = time_interleaved(ok, reps=reps, rounds=rounds, warmup=1)
        result.update(times)
        if not times:
            print(f"  tune b={b} {kind}: every candidate failed ({result}); keeping {chosen[kind]}")
            continue
        best = min(times, key=times.get)
        chosen[kind] = cands[kind][best]
        launch.LAUNCH[b] = copy.deepcopy(chosen)
        print(f"  tune b={b} {kind}: " + ", ".join(f"{k}={v:.3f}" for k, v in times.items()) + f" -> {best}")
    return {"ms": result, "chosen": chosen}


def break_even(speedups: list[tuple[float, float]]) -> float:
    """Largest density at which the block kernel is still BREAK_EVEN_MARGIN faster, interpolated between the
    measured densities (not extrapolated past the largest one; 0 when it is slower at the smallest)."""
    pts = sorted(speedups)
    if pts[0][1] < BREAK_EVEN_MARGIN:
        return 0.0
    for (d0, s0), (d1, s1) in zip(pts, pts[1:]):
        if s1 < BREAK_EVEN_MARGIN:
            return d0 + (s0 - BREAK_EVEN_MARGIN) * (d1 - d0) / (s0 - s1)
    return pts[-1][0]


def measure_shape(name, n_in, n_out, tokens, blocks, densities, gen, reps, rounds, conv1d=False):
    x = torch.randn(tokens, n_in, device=DEVICE, dtype=DTYPE, requires_grad=True)
    g = torch.randn(tokens, n_out, device=DEVICE, dtype=DTYPE)
    wd = (torch.randn(n_out, n_in, device=DEVICE) * n_in**-0.5).to(DTYPE)
    if conv1d:
        wd = wd.t().contiguous()
    wd.requires_grad_(True)
    dense_fwd = (lambda x, w: x @ w) if conv1d else (lambda x, w: F.linear(x, w))
    train = {"dense": fwd_bwd(dense_fwd, x, wd, g)}
    infer = {"dense": lambda: dense_fwd(x, wd)}
    errs = {}
    for b in blocks:
        for dens in densities:
            w, layout = masked_weight(n_in, n_out, b, dens, gen, conv1d)

            def blk(x, w, layout=layout):
                return block_sparse_linear(x, w, None, layout, conv1d)

            train[(b, dens)] = fwd_bwd(blk, x, w, g)
            infer[(b, dens)] = lambda blk=blk, w=w: blk(x, w)
            with torch.no_grad():
                ref, got = dense_fwd(x, w).float(), blk(x, w).float()
                errs[(b, dens)] = ((got - ref).norm() / ref.norm()).item()
    with torch.no_grad():
        t_inf = time_interleaved(infer, reps=reps, rounds=rounds)
    t_train = time_interleaved(train, reps=reps, rounds=rounds)
    t_graph = {}
    if DEVICE == "cuda":  # the same fwd+bwd replayed from CUDA graphs: GPU time without host time
        graphs = {k: graphed(fn) for k, fn in train.items()}
        if all(v is not None for v in graphs.values()):
            t_graph = time_interleaved(graphs, reps=reps, rounds=rounds)
        del graphs
    rows = []
    for key in train:
        if key == "dense":
            continue
        b, dens = key
        rows.append(dict(
            shape=name, layout="conv1d" if conv1d else "linear", n_in=n_in, n_out=n_out, block_size=b,
            density=dens, tokens=tokens, dense_ms=t_train["dense"], block_ms=t_train[key],
            speedup=t_train["dense"] / t_train[key], fwd_dense_ms=t_inf["dense"], fwd_block_ms=t_inf[key],
            fwd_speedup=t_inf["dense"] / t_inf[key], rel_err=errs[key],
            graph_dense_ms=t_graph.get("dense"), graph_block_ms=t_graph.get(key),
            graph_speedup=t_graph["dense"] / t_graph[key] if t_graph else None,
        ))
    return rows


def host_paths(gen, reps, rounds, d=768, token_counts=(16384, 1024)):
    """fwd+bwd ms of the eager autograd.Function path vs the custom-op path (d=768, density 0.1, block 64) at
    16384 and 1024 tokens: the difference is host time per layer."""
    out = {}
    block = 64 if d % 64 == 0 else 16
    w, layout = masked_weight(d, d, block, 0.1, gen)
    for tokens in token_counts:
        x = torch.randn(tokens, d, device=DEVICE, dtype=DTYPE, requires_grad=True)
        g = torch.randn(tokens, d, device=DEVICE, dtype=DTYPE)

        def run(path, x=x, g=g):
            ops.EAGER_PATH = path
            y = block_sparse_linear(x, w, None, layout)
            torch.autograd.grad(y, (x, w), g)

        times = time_interleaved({p: (lambda p=p: run(p)) for p in ("function", "op")}, reps=reps, rounds=rounds)
        out[tokens] = times
    ops.EAGER_PATH = "function"
    return out


def markdown(rows, tune_result, args, hw, elapsed, paths=None):
    densities = sorted({r["density"] for r in rows})
    lines = [
        f"# Block-sparse linear vs dense cuBLAS, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"Hardware: {hw}. bf16, {args.tokens} tokens, fwd+bwd (`y = x W^T`, `dX`, sampled `dW`) per call; median "
        f"of {args.rounds} rounds of {args.reps} calls, dense and block interleaved in one run. Random block masks "
        f"with an exact active-block count. Command: `PYTHONPATH=. python3 bench/blocksparse_linear.py "
        f"{' '.join(sys.argv[1:])}` ({elapsed:.0f} s).",
        "",
        "## Speed-up of fwd+bwd (dense ms / block ms)",
        "",
        "| layout | shape | n_in x n_out | block | dense ms | " + " | ".join(f"d={d}" for d in densities) + " |",
        "|---|---|---|---|---|" + "---|" * len(densities),
    ]
    groups = {}
    for r in rows:
        groups.setdefault((r["layout"], r["shape"], r["n_in"], r["n_out"], r["block_size"]), {})[r["density"]] = r
    for (lay, shape, n_in, n_out, b), by_d in groups.items():
        dense_ms = next(iter(by_d.values()))["dense_ms"]
        cells = " | ".join(f"{by_d[d]['speedup']:.2f}" if d in by_d else "" for d in densities)
        lines.append(f"| {lay} | {shape} | {n_in} x {n_out} | {b} | {dense_ms:.3f} | {cells} |")
    if any(r["graph_speedup"] for r in rows):
        lines += ["", "## Speed-up of fwd+bwd replayed from CUDA graphs (GPU time only, no host time)", "",
                  "| layout | shape | n_in x n_out | block | dense ms | "
                  + " | ".join(f"d={d}" for d in densities) + " |",
                  "|---|---|---|---|---|" + "---|" * len(densities)]
        for (lay, shape, n_in, n_out, b), by_d in groups.items():
            dense_ms = next(iter(by_d.values()))["graph_dense_ms"] or float("nan")
            cells = " | ".join(f"{by_d[d]['graph_speedup']:.2f}" if d in by_d and by_d[d]["graph_speedup"] else ""
                               for d in densities)
            lines.append(f"| {lay} | {shape} | {n_in} x {n_out} | {b} | {dense_ms:.3f} | {cells} |")
    lines += ["", "## Forward only (inference) speed-up", "",
              "| layout | shape | n_in x n_out | block | dense ms | " + " | ".join(f"d={d}" for d in densities) + " |",
              "|---|---|---|---|---|" + "---|" * len(densities)]
    for (lay, shape, n_in, n_out, b), by_d in groups.items():
        dense_ms = next(iter(by_d.values()))["fwd_dense_ms"]
        cells = " | ".join(f"{by_d[d]['fwd_speedup']:.2f}" if d in by_d else "" for d in densities)
        lines.append(f"| {lay} | {shape} | {n_in} x {n_out} | {b} | {dense_ms:.3f} | {cells} |")
    lines += ["", "## Targets (d >= 2048, best block size per shape)", ""]
    for target_d, target in ((0.1, 4.0), (0.25, 2.0)):
        for (lay, shape, n_in, n_out) in sorted({k[:4] for k in groups}):
            if min(n_in, n_out) < 2048 or lay != "linear":
                continue
            cands = [r for r in rows if (r["layout"], r["shape"], r["n_in"], r["n_out"]) == (lay, shape, n_in, n_out)
                     and r["density"] == target_d]
            if cands:
                best = max(cands, key=lambda r: r["speedup"])
                verdict = "met" if best["speedup"] >= target else "NOT met"
                graph = max((r["graph_speedup"] or 0.0) for r in cands)
                lines.append(f"- density {target_d}, {shape} {n_in}x{n_out}: {best['speedup']:.2f}x at block "
                             f"{best['block_size']} (target {target}x: {verdict}); GPU time only (graphs): "
                             f"{graph:.2f}x")
    worst = max(r["rel_err"] for r in rows)
    lines += ["", f"Largest relative error of a block forward against dense on the same masked weight: {worst:.1e}."]
    if paths:
        lines += ["", "## Host paths (d=768, density 0.1, block 64, fwd+bwd ms)", "",
                  "| tokens | autograd.Function (eager default) | custom ops |", "|---|---|---|"]
        lines += [f"| {t} | {v['function']:.3f} | {v['op']:.3f} |" for t, v in paths.items()]
    if tune_result:
        lines += ["", "## Launch sweep (d=2048 MLP up, density 0.1; ms per call)", "",
                  "Dense at this shape: fwd {fwd:.3f}, dX {dx:.3f}, dW {dw:.3f} ms. ".format(**tune_result["dense_ms"])
                  + "mm = fwd + dX (bm, bk, warps, stages); "
                  "dw = sampled dW (bm, warps, stages).", "", "| block | candidate | ms |", "|---|---|---|"]
        for b, res in tune_result["blocks"].items():
            for name, ms in res["ms"].items():
                lines.append(f"| {b} | {name} | {ms if isinstance(ms, str) else f'{ms:.3f}'} |")
            lines.append(f"| {b} | chosen | {res['chosen']} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/blocksparse")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--dims", type=int, nargs="+", default=[768, 2048, 4096])
    p.add_argument("--densities", type=float, nargs="+", default=[0.05, 0.1, 0.25, 0.5])
    p.add_argument("--blocks", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--no-tune", action="store_true", help="use the launch parameters in the code as they are")
    p.add_argument("--conv1d-dim", type=int, default=2048, help="also time GPT-2's Conv1D layout at this d (0: no)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU in Triton's interpreter (checks the "
                   "script, times nothing meaningful; set TRITON_INTERPRET=1)")
    args = p.parse_args(argv)
    global DEVICE, DTYPE
    if args.smoke:
        DEVICE, DTYPE = "cpu", torch.float16
        ops.CPU_KERNELS = "triton"  # the Triton kernels in the interpreter, not the ops' plain-torch CPU version
        args.tokens, args.dims, args.blocks, args.reps, args.rounds, args.conv1d_dim = 40, [32], [16, 32], 1, 1, 32
    elif not torch.cuda.is_available():
        raise SystemExit("bench/blocksparse_linear.py needs a CUDA GPU (or --smoke with TRITON_INTERPRET=1).")
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    hw = hardware()
    print(hw, flush=True)
    gen = torch.Generator().manual_seed(0)
    tune_shape = (64, 128) if args.smoke else (2048, 8192)
    tune_result = None if args.no_tune else tune(args.tokens, args.blocks, gen, 5, 3, *tune_shape)
    print(f"tuned in {time.time() - t0:.0f} s; launch = {launch.LAUNCH}", flush=True)
    rows = []
    for d in args.dims:
        for name, n_in, n_out in shapes(d):
            rows += measure_shape(name, n_in, n_out, args.tokens, args.blocks, args.densities, gen, args.reps,
                                  args.rounds)
            best = {dn: max(r["speedup"] for r in rows[-len(args.blocks) * len(args.densities):] if r["density"] == dn)
                    for dn in args.densities}
            print(f"{name} {n_in}x{n_out}: dense {rows[-1]['dense_ms']:.3f} ms; best speed-up by density "
                  + ", ".join(f"{k}: {v:.2f}" for k, v in best.items()) + f"  [{time.time() - t0:.0f} s]", flush=True)
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
    if args.conv1d_dim:
        d = args.conv1d_dim
        for name, n_in, n_out in shapes(d)[:2]:
            rows += measure_shape(name, n_in, n_out, args.tokens, args.blocks, [0.1, 0.25], gen, args.reps,
                                  args.rounds, conv1d=True)
    paths = host_paths(gen, args.reps, args.rounds, *((32, (40,)) if args.smoke else ()))
    elapsed = time.time() - t0
    text = markdown(rows, tune_result, args, hw, elapsed, paths)
    print(text)
    with open(os.path.join(args.out, "blocksparse_linear.md"), "w") as f:
        f.write(text)
    be = []
    for key in sorted({(r["n_in"], r["n_out"], r["block_size"]) for r in rows if r["layout"] == "linear"}):
        # GPU time (graph replays) where measured: in a training step the host runs ahead of the GPU, so host
        # time per layer is hidden unless the whole step is host-bound (then eager timing is the better guide)
        pts = [(r["density"], r["graph_speedup"] or r["speedup"]) for r in rows
               if (r["n_in"], r["n_out"], r["block_size"]) == key and r["layout"] == "linear"]
        be.append(dict(n_in=key[0], n_out=key[1], block_size=key[2], break_even_density=round(break_even(pts), 4)))
    name = torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu-interpreter"
    table = {"devices": {name: dict(
        tokens=args.tokens, dtype="bfloat16", hardware=hw, margin=BREAK_EVEN_MARGIN,
        break_even_from="CUDA-graph fwd+bwd (GPU time)" if any(r["graph_speedup"] for r in rows) else "eager fwd+bwd",
        date=f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        command="PYTHONPATH=. python3 bench/blocksparse_linear.py " + " ".join(sys.argv[1:]),
        launch={str(k): v for k, v in launch.LAUNCH.items()}, break_even=be, measurements=rows, tune=tune_result,
        host_paths=paths,
    )}}
    with open(os.path.join(args.out, "blocksparse_breakeven.json"), "w") as f:
        json.dump(table, f, indent=1, default=str)
    print(f"wrote {args.out} in {elapsed:.0f} s")


if __name__ == "__main__":
    main()
