"""Loss against wall-clock time: the study's timing table and figure, for runs timed alone on one GPU.

Every evaluation point of a run record carries ``train_s``: the training seconds up to that point (the GPU
synchronised before the clock is read; evaluations are not counted). Times are comparable between runs only when
each ran alone on the same GPU with the same process set-up (``python -m study --jobs 1``, one run at a time); each
record keeps its ``--jobs`` and the table says when runs shared the GPU, so a parallel batch is never read as a
timing.

For each run: its final validation loss, training seconds, steps per second, and the seconds (and fraction of the
reference's seconds) at which its evaluation curve first reaches the reference's final validation loss (linear
interpolation between the two evaluations around the crossing, as :func:`study.frontier.flops_to_reach` does for
FLOPs).
"""

import numpy as np

from .frontier import flops_to_reach
from .noise import diff_text


def timed(rows: list[dict]) -> list[dict]:
    """The runs whose curves carry training seconds (records written before ``train_s`` existed are left out)."""
    return [r for r in rows if r["curve"] and all("train_s" in c for c in r["curve"])]


def seconds_to_reach(record: dict, target: float) -> float | None:
    """Training seconds at which the run's validation curve first reaches ``target`` (``None``: never)."""
    return flops_to_reach([(c["train_s"], c["val"]) for c in record["curve"]], target)


def timing_lines(rows: list[dict], reference: str, floor) -> list[str]:
    """The wall-clock table (Markdown lines), or ``[]`` when no run is timed or the reference is missing."""
    rows = timed(rows)
    jobs = max((r.get("jobs") or 0 for r in rows), default=0)
    ref = [r for r in rows if r["label"] == reference]
    if not ref:
        return []
    target = float(np.mean([r["curve"][-1]["val"] for r in ref]))
    ref_s = float(np.mean([r["wall_train_s"] for r in ref]))
    shared = ("each run alone on the GPU, `--jobs` 0 or 1" if jobs <= 1 else
              f"**up to {jobs} runs shared the GPU (`--jobs {jobs}`): these times are not comparable**")
    lines = ["", f"Wall-clock time, {shared}. Target: {reference}'s final validation loss on the curve subset, "
                 f"{target:.4f} (mean of {len(ref)} seed(s)); {reference}'s mean training time {ref_s:.1f} s.", "",
             f"| arm | seed | val loss | val - {reference} (same seed) | train s | steps/s | s to {reference}'s "
             f"final val loss | x {reference}'s time |",
             "|---|---|---|---|---|---|---|---|"]
    ref_val = {r["seed"]: r["final"]["val"] for r in ref}
    for r in sorted(rows, key=lambda r: (r["label"] != reference, r["label"], r["seed"])):
        reach = seconds_to_reach(r, target)
        gap = "-" if r["seed"] not in ref_val else diff_text(r["final"]["val"] - ref_val[r["seed"]], floor)
        lines.append(f"| {r['label']} | {r['seed']} | {r['final']['val']:.4f} | {gap} | {r['wall_train_s']:.1f} | "
                     f"{r['steps'] / max(r['wall_train_s'], 1e-9):.2f} | "
                     + ("not reached | - |" if reach is None else f"{reach:.1f} | {reach / ref_s:.3f} |"))
    return lines


def plot_time(rows: list[dict], path: str, target: float | None) -> bool:
    """Validation loss against training seconds (left) and counted FLOPs (right), every timed run; ``False`` when
    there is nothing to draw."""
    rows = timed(rows)
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    labels = sorted({r["label"] for r in rows})
    colors = {label: plt.cm.tab10(i % 10) for i, label in enumerate(labels)}
    first_seed = min(r["seed"] for r in rows)
    for ax, key, xlabel in ((axes[0], "train_s", "training wall-clock seconds (one run alone on the GPU)"),
                            (axes[1], "flops", "counted training FLOPs (mst_hf.flops)")):
        for r in sorted(rows, key=lambda r: (r["label"], r["seed"])):
            pts = [(c[key], c["val"]) for c in r["curve"] if c[key] > 0]
            ax.plot(*zip(*pts), color=colors[r["label"]], linestyle="-" if r["seed"] == first_seed else "--",
                    marker=".", label=f"{r['label']} s{r['seed']}")
        if target is not None:
            ax.axhline(target, color="grey", linewidth=0.8, linestyle=":")
        lows = [c["val"] for r in rows for c in r["curve"][len(r["curve"]) // 3:]]
        ax.set_ylim(min(lows) - 0.05, max(lows) + 0.1)
        ax.set_xscale("log" if key == "flops" else "linear")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss (curve subset)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
