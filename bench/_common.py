"""Shared pieces of the GPU benchmarks: pre-tokenised data, GPT-2 models from config, timing, FLOP shares, curves."""

import json
import lzma
import os
import platform
import subprocess
import time

import numpy as np
import torch
from transformers import AutoModelForCausalLM, TrainerCallback

from mst_hf.model_sizes import MODEL_SIZES, model_config

# GPT-2 sizes only these benchmarks use (the library's GPT-2 vocabulary and context, other dimensions); the GPT-2
# names of mst_hf.model_sizes.MODEL_SIZES work too
BENCH_GPT2_SIZES = {
    "gpt2-mini": dict(n_layer=6, n_embd=512, n_head=8),
    "gpt2-4x256": dict(n_layer=4, n_embd=256, n_head=4),
}


def load_tokens(path: str) -> np.ndarray:
    """A uint16 token file (``.bin``, or ``.bin.xz`` decompressed in memory) as a numpy array."""
    if path.endswith(".xz"):
        with lzma.open(path, "rb") as f:
            return np.frombuffer(f.read(), dtype=np.uint16)
    if not os.path.isfile(path) and os.path.isfile(path + ".xz"):
        return load_tokens(path + ".xz")
    return np.fromfile(path, dtype=np.uint16)


class TokenBlocks(torch.utils.data.Dataset):
    """Non-overlapping ``block_size`` windows of a uint16 token file (``bench/prepare_data.py``)."""

    def __init__(self, path: str, block_size: int, max_blocks: int | None = None):
        ids = np.fromfile(path, dtype=np.uint16).astype(np.int64)
        n = len(ids) // block_size
        if max_blocks is not None:
            n = min(n, max_blocks)
        self.blocks = torch.from_numpy(ids[: n * block_size].reshape(n, block_size))

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, i):
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def gpt2(size: str, seq_len: int, seed: int = 0, attn_implementation: str = "sdpa"):
    gpt2_names = [n for n, c in MODEL_SIZES.items() if c["model_type"] == "gpt2"] + list(BENCH_GPT2_SIZES)
    if size not in gpt2_names:
        raise ValueError(f"Unknown GPT-2 size {size!r}; choose one of {', '.join(gpt2_names)}.")
    torch.manual_seed(seed)
    base, dims = ("gpt2-124m", BENCH_GPT2_SIZES[size]) if size in BENCH_GPT2_SIZES else (size, {})
    # No dropout (as in current pretraining recipes); attention dropout would also rule out the FlexAttention path.
    cfg = model_config(base, n_positions=max(seq_len, 1024), attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
                       **dims)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation)


class StepTimer(TrainerCallback):
    """Wall time between the end of optimizer step ``start`` and the end of the last step (CUDA synchronised)."""

    def __init__(self, start: int):
        self.start = start
        self.t0 = self.t1 = None
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.start or state.global_step == state.max_steps:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            now = time.perf_counter()
            if state.global_step == self.start:
                self.t0 = now
            else:
                self.t1, self.steps = now, state.global_step - self.start

    @property
    def steps_per_second(self) -> float:
        return self.steps / (self.t1 - self.t0)


def hardware() -> str:
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True).stdout.strip()
        except OSError:
            driver = "?"
        return f"{name} (driver {driver}), torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"CPU {platform.processor() or platform.machine()}, torch {torch.__version__}"


def versions() -> dict:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}


def write_json(path: str, data) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=2)


def flop_shares(flop_model, seq_len: int) -> dict[str, float]:
    """Shares of the dense causal training FLOPs per token (``mst_hf.flops``): the LM head, the other matmuls
    (transformer blocks), and attention (``Q K^T`` and ``A V``)."""
    from mst_hf.flops import attention_token_flops, dense_token_flops

    total = dense_token_flops(flop_model, seq_len)
    head = sum(6 * m.numel for m in flop_model.matmuls if m.module_name.endswith("lm_head"))
    attention = attention_token_flops(flop_model, (seq_len + 1) / 2)
    return {"head": head / total, "blocks": (total - head - attention) / total, "attention": attention / total,
            "dense_token_flops": total}


def flops_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """First FLOP count at which a ``(flops, loss)`` curve reaches ``target`` (linear interpolation between the
    two evaluations around the crossing), or ``None`` when it never does."""
    prev = None
    for flops, loss in curve:
        if loss <= target:
            if prev is None or prev[1] == loss:
                return float(flops)
            f0, l0 = prev
            return float(f0 + (flops - f0) * (l0 - target) / (l0 - loss))
        prev = (flops, loss)
    return None


# --------------------------------------------------------------------------- the study's report (bench/study.py)

CONVENTIONS = ("headline", "tiles", "no_attention_credit", "dense_head", "strictest")


def _load_rows(folder: str) -> list[dict]:
    rows = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".json") and "-s" in name and name not in ("args.json", "study_plan.json"):
            with open(os.path.join(folder, name)) as f:
                row = json.load(f)
            if not row.get("complete", True):  # stopped early: its last curve point stands in for the final loss
                row["label"] += f" (stopped at step {row['steps']}/{row['planned_steps']})"
                row["final"] = {"val": row["curve"][-1]["val"], "heldout": row["curve"][-1]["heldout"]}
            rows.append(row)
    return rows


def _fmt(x, spec=".4f") -> str:
    return "-" if x is None else format(x, spec)


def study_report(folder: str, out: str | None = None, reference: str = "dense", compare: str = "mst") -> str:
    """``study.md`` (tables) and ``study.png`` (validation loss against counted FLOPs) from the per-run JSONs.

    ``folder`` may list several folders (comma-separated) of runs of the same rung: a run (label, seed) found again
    in a later folder is a rerun, reported in a note instead of a second row. Output goes to ``out`` (default: the
    first folder). ``reference`` is the dense arm that the gaps and "FLOPs to reach its final loss" are measured
    against (e.g. ``dense_wsd`` when the best sparse arms use that schedule); ``compare`` the arm of the
    "val - ..." column."""
    folders = [f for f in folder.split(",") if f]
    rows, seen, reruns = [], set(), []
    for f in folders:
        for r in _load_rows(f):
            key = (r["label"], r["seed"])
            (reruns.append(r) if key in seen else rows.append(r))
            seen.add(key)
    if not rows:
        raise ValueError(f"No study results (LABEL-sSEED.json) in {folder!r}.")
    folder = out or folders[0]
    os.makedirs(folder, exist_ok=True)
    commands = []
    for f in folders:
        if os.path.isfile(os.path.join(f, "args.json")):
            with open(os.path.join(f, "args.json")) as fh:
                commands.append(json.load(fh).get("command", "python bench/study.py ..."))
    args = {"command": "`; `".join(commands)} if commands else {}
    labels = {r["label"] for r in rows}
    for name, label, default in (("reference", reference, "dense"), ("compare", compare, "mst")):
        if label not in labels and label != default:  # the defaults may be absent (a batch of other arms)
            raise ValueError(f"{name}={label!r}: no such arm in {folder!r}; arms: {sorted(labels)}.")
    dense = [r for r in rows if r["label"] == reference]
    dense_final = {r["seed"]: r["final"]["val"] for r in dense}
    dense_curve_final = float(np.mean([r["curve"][-1]["val"] for r in dense])) if dense else None
    dense_flops = float(np.mean([r["counted_flops"] for r in dense])) if dense else None
    extra = sorted({k for r in rows for k in r["final"] if k not in ("val", "heldout")})
    r0 = rows[0]
    lines = [
        f"Command: `{args.get('command', 'python bench/study.py ...')}`",
        f"Date: {max(r['date'] for r in rows)}; hardware: {r0['hardware']}; {r0['versions']}",
        f"Rung {r0['rung']}: {r0['steps']} steps x {r0['tokens'] // r0['steps']:,} tokens = {r0['tokens']:,} "
        "training tokens per run (every arm, single pass over the blocks it sees).",
        "",
        "| arm | seed | model (L x d) | non-emb. params | tokens / non-emb. param | val loss | held-out loss | "
        + "".join(f"{e} | " for e in extra)
        + f"gap to {reference} (same seed) | counted FLOPs | reduction (headline) | tiles | no attn credit | "
          f"head charged dense | strictest | FLOPs to {reference}'s final val loss (x {reference}) | "
          "mean active matmul params | final sparsity | train wall (s) |",
        "|" + "---|" * (19 + len(extra)),
    ]
    target_note = ""
    for r in sorted(rows, key=lambda r: (r["label"] != reference, r["label"], r["seed"])):
        m, fin = r["model"], r["final"]
        ref = dense_final.get(r["seed"])
        gap = None if ref is None else (fin["val"] - ref) / ref * 100
        curve = [(c["flops"], c["val"]) for c in r["curve"]]
        reach = flops_to_reach(curve, dense_curve_final) if dense_curve_final is not None else None
        reach_txt = "not reached" if reach is None else f"{reach:.3e} ({reach / dense_flops:.3f}x)"
        red = r["reduction"]
        lines.append(
            f"| {r['label']} | {r['seed']} | {m['n_layer']} x {m['n_embd']} | {m['non_embedding_params']:,} | "
            f"{r['tokens'] / m['non_embedding_params']:.1f} | {fin['val']:.4f} | {fin['heldout']:.4f} | "
            + "".join(f"{_fmt(fin.get(e))} | " for e in extra)
            + f"{'-' if gap is None else f'{gap:+.2f}%'} | {r['counted_flops']:.3e} | "
            + " | ".join(f"{red[c]:.2f}x" for c in CONVENTIONS)
            + f" | {reach_txt} | {m['mean_active_matmul_params']:,.0f} | {r['final_sparsity']:.3f} | "
              f"{r['wall_train_s']:.0f} |"
        )
    if dense_curve_final is not None:
        target_note = (f"{reference}'s final validation loss on the curve subset (mean of {len(dense)} seed(s)): "
                       f"{dense_curve_final:.4f}; 'FLOPs to {reference}'s final val loss' interpolates each run's "
                       "evaluation curve (same subset) linearly between the two evaluations around the crossing.")
    for r in reruns:
        lines.append(f"Rerun of {r['label']} seed {r['seed']} (not in the tables): val {r['final']['val']:.4f}, "
                     f"held-out {r['final']['heldout']:.4f}.")
    compare_vals = [r["final"]["val"] for r in rows if r["label"] == compare]
    compare_mean = float(np.mean(compare_vals)) if compare_vals else None
    lines += ["", target_note, "",
              f"Per arm, over seeds (spread = max - min; differences from `{compare}` use the means):",
              "", f"| arm | changes | seeds | val loss (each seed) | mean | spread | val - {compare} "
              "| held-out loss (each seed) | mean | spread | reduction (headline) | strictest |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for label in sorted({r["label"] for r in rows}, key=lambda x: (x != reference, x != compare, x)):
        rs = sorted((r for r in rows if r["label"] == label), key=lambda r: r["seed"])
        v = [r["final"]["val"] for r in rs]
        h = [r["final"]["heldout"] for r in rs]
        change = ", ".join(f"{k}={val}" for k, val in rs[0].get("overrides", {}).items()) or rs[0]["arm"]
        delta = "-" if compare_mean is None else f"{np.mean(v) - compare_mean:+.4f}"
        lines.append(f"| {label} | {change} | {','.join(str(r['seed']) for r in rs)} | "
                     f"{', '.join(f'{x:.4f}' for x in v)} | {np.mean(v):.4f} | {max(v) - min(v):.4f} | {delta} | "
                     f"{', '.join(f'{x:.4f}' for x in h)} | {np.mean(h):.4f} | {max(h) - min(h):.4f} | "
                     f"{rs[0]['reduction']['headline']:.2f}x | {rs[0]['reduction']['strictest']:.2f}x |")
    shares = r0["model"]["flop_shares"]
    lines += ["", f"Dense FLOP shares of the rung (per token, mst_hf.flops): LM head {shares['head']:.1%}, other "
                  f"matmuls {shares['blocks']:.1%}, attention {shares['attention']:.1%}."]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(folder, "study.md"), "w") as f:
        f.write(text)
    try:
        _plot(rows, os.path.join(folder, "study.png"), dense_curve_final)
    except ImportError:
        print("matplotlib is not installed: no plot (run `python bench/study.py --report FOLDER` elsewhere).")
    print(text)
    return text


def _plot(rows: list[dict], path: str, target: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    labels = sorted({r["label"] for r in rows}, key=lambda x: (x != "dense", x))
    colors = {label: plt.cm.tab10(i % 10) for i, label in enumerate(labels)}
    for ax, split in zip(axes, ("val", "heldout")):
        for r in sorted(rows, key=lambda r: (r["label"], r["seed"])):
            pts = [(c["flops"], c[split]) for c in r["curve"] if c["flops"] > 0]
            ax.plot(*zip(*pts), color=colors[r["label"]], linestyle="-" if r["seed"] == rows[0]["seed"] else "--",
                    marker=".", label=f"{r['label']} s{r['seed']}")
        if target is not None and split == "val":
            ax.axhline(target, color="grey", linewidth=0.8, linestyle=":")
        ax.set_xscale("log")
        ax.set_xlabel("counted training FLOPs (mst_hf.flops)")
        ax.set_ylabel(f"{'validation' if split == 'val' else 'held-out domain'} loss (curve subset)")
        lows = [c[split] for r in rows for c in r["curve"][len(r["curve"]) // 3:]]
        ax.set_ylim(min(lows) - 0.05, max(lows) + 0.1)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
