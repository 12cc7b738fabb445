"""The study's report: ``study.md`` (tables) and ``study.png`` (loss against counted FLOPs) from the per-run JSONs.

The reductions are those each record carries (its FLOPs under each convention of :mod:`mst_hf.conventions`, priced
by :mod:`study.pricing`); records written before the conventions took the library's names are read under those
names (``tiles`` -> ``attention_tiles``, ``dense_head`` -> ``dense_lm_head``) with the values they hold.
"""

import json
import os

import numpy as np

from mst_hf.conventions import CONVENTIONS

RENAMED = {"tiles": "attention_tiles", "dense_head": "dense_lm_head"}  # names of records before the library's


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


def _load_rows(folder: str) -> list[dict]:
    rows = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".json") and "-s" in name and name not in ("args.json", "study_plan.json"):
            with open(os.path.join(folder, name)) as f:
                row = json.load(f)
            for key in ("reduction", "conventions_flops"):
                row[key] = {RENAMED.get(k, k): v for k, v in row[key].items()}
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
                commands.append(json.load(fh).get("command", "python -m study ..."))
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
        f"Command: `{args.get('command', 'python -m study ...')}`",
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
            + " | ".join("n/a" if red[c] is None else f"{red[c]:.2f}x" for c in CONVENTIONS)
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
        print("matplotlib is not installed: no plot (run `python -m study --report FOLDER` elsewhere).")
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
