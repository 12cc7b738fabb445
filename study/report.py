"""The study's report: ``study.md`` (tables) and ``study.png`` (loss against counted FLOPs) from the per-run JSONs.

The reductions are those each record carries (its FLOPs under each convention of :mod:`mst_hf.conventions`, priced
by :mod:`study.pricing`); records written before the conventions took the library's names are read under those
names (``tiles`` -> ``attention_tiles``, ``dense_head`` -> ``dense_lm_head``) with the values they hold. Every table
comes with the noise floor (:mod:`study.noise`: differences below it print as ``~``); unstable runs
(:mod:`study.spikes`) are marked ``(unstable)``; a sweep adds its arm x LR table and confirm command
(:mod:`study.sweep`), ``frontier=True`` the dense frontier (:mod:`study.frontier`); runs that carry training seconds
add the wall-clock table and ``study_time.png`` (:mod:`study.timing`).
"""

import json
import os
import sys

import numpy as np

from mst_hf.conventions import CONVENTIONS

from .frontier import DEFAULT_TOLERANCE, flops_to_reach, frontier_lines
from .noise import arm_name, diff_text, floor_line, noise_floor, noise_sources, noise_table
from .spikes import DEFAULT_THRESHOLD, record_spikes
from .sweep import is_sweep_command, sweep_lines
from .timing import plot_time, timing_lines

RENAMED = {"tiles": "attention_tiles", "dense_head": "dense_lm_head"}  # names of records before the library's


def _load_rows(folder: str, spike_threshold: float = DEFAULT_THRESHOLD) -> list[dict]:
    rows = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".json") and "-s" in name and name not in ("args.json", "study_plan.json"):
            path = os.path.join(folder, name)
            try:
                with open(path) as f:
                    row = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"Study record {path!r} is not complete JSON ({err}): the run was cut off while "
                                 "writing it. Rerun that arm, or move the file out of the folder.") from None
            for key in ("reduction", "conventions_flops"):
                row[key] = {RENAMED.get(k, k): v for k, v in row[key].items()}
            if not row.get("complete", True):  # stopped early: its last curve point stands in for the final loss
                row["stopped"] = f"stopped at step {row['steps']}/{row['planned_steps']}"
                row["final"] = {"val": row["curve"][-1]["val"], "heldout": row["curve"][-1]["heldout"]}
                print(f"warning: {name} was {row['stopped']}; its last evaluation stands in for its final loss "
                      "(marked in the tables).", file=sys.stderr)
            rows.append(record_spikes(row, spike_threshold))
    return rows


def _val(r: dict) -> str:
    """A final validation loss, marked when the run had a loss spike."""
    return (f"{r['final']['val']:.4f}" + (" (unstable)" if r.get("unstable") else "")
            + (f" ({r['stopped']})" if r.get("stopped") else ""))


def _argv(folder: str) -> list[str] | None:
    """The arguments of the command that wrote ``folder`` (``args.json``), or ``None``."""
    path = os.path.join(folder, "args.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        saved = json.load(f)
    return saved.get("argv") or saved.get("command", "python -m study").split()[3:]


def _fmt(x, spec=".4f") -> str:
    return "-" if x is None else format(x, spec)


def study_report(folder: str, out: str | None = None, reference: str = "dense", compare: str = "mst",
                 frontier: bool = False, noise_arms: list[str] | None = None, tolerance: float = DEFAULT_TOLERANCE,
                 spike_threshold: float = DEFAULT_THRESHOLD) -> str:
    """``study.md`` (tables) and ``study.png`` (validation loss against counted FLOPs) from the per-run JSONs.

    ``folder`` may list several folders (comma-separated) of runs of the same rung: a run (label, seed) found again
    in a later folder is a rerun, reported in a note instead of a second row. Output goes to ``out`` (default: the
    first folder). ``reference`` is the dense arm that the gaps and "FLOPs to reach its final loss" are measured
    against (e.g. ``dense_wsd`` when the best sparse arms use that schedule); ``compare`` the arm of the
    "val - ..." column. ``noise_arms`` (default: ``reference`` and ``compare``) set the noise floor; ``frontier``
    adds the dense-frontier tables (budgets grouped within ``tolerance``); runs are judged unstable by
    ``spike_threshold`` where their record does not say."""
    folders = [f for f in folder.split(",") if f]
    rows, seen, reruns = [], set(), []
    for f in folders:
        for r in _load_rows(f, spike_threshold):
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
    names = labels | {arm_name(x) for x in labels}  # a sweep's ARM@lr=V runs belong to ARM
    for name, label, default in (("reference", reference, "dense"), ("compare", compare, "mst")):
        if label not in names and label != default:  # the defaults may be absent (a batch of other arms)
            raise ValueError(f"{name}={label!r}: no such arm in {folder!r}; arms: {sorted(labels)}.")
    noise_arms = noise_arms or [reference, compare]
    sources = noise_sources(rows, reruns)
    floor = noise_floor(sources, noise_arms)
    under = floor_line(floor, noise_arms)
    dense = [r for r in rows if r["label"] == reference]
    dense_final = {r["seed"]: r["final"]["val"] for r in dense}
    dense_curve_final = float(np.mean([r["curve"][-1]["val"] for r in dense])) if dense else None
    dense_flops = float(np.mean([r["counted_flops"] for r in dense])) if dense else None
    extra = sorted({k for r in rows for k in r["final"] if k not in ("val", "heldout")})
    r0 = rows[0]
    per_pass, step_tokens = r0.get("steps_per_pass", r0["steps"]), r0["tokens"] // r0["steps"]
    multi = ", ".join(sorted({f"{r['label']} {r['passes']}" for r in rows if r.get("passes", 1) > 1}))
    lines = [
        f"Command: `{args.get('command', 'python -m study ...')}`",
        f"Date: {max(r['date'] for r in rows)}; hardware: {r0['hardware']}; {r0['versions']}",
        f"Rung {r0['rung']}: {per_pass} steps x {step_tokens:,} tokens = {per_pass * step_tokens:,} training "
        f"tokens per pass; passes: {multi or '1 (every run)'}.",
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
        gap_txt = "-" if gap is None else "~" if diff_text(fin["val"] - ref, floor) == "~" else f"{gap:+.2f}%"
        curve = [(c["flops"], c["val"]) for c in r["curve"]]
        reach = flops_to_reach(curve, dense_curve_final) if dense_curve_final is not None else None
        reach_txt = "not reached" if reach is None else f"{reach:.3e} ({reach / dense_flops:.3f}x)"
        red = r["reduction"]
        lines.append(
            f"| {r['label']} | {r['seed']} | {m['n_layer']} x {m['n_embd']} | {m['non_embedding_params']:,} | "
            f"{r['tokens'] / m['non_embedding_params']:.1f} | {_val(r)} | {fin['heldout']:.4f} | "
            + "".join(f"{_fmt(fin.get(e))} | " for e in extra)
            + f"{gap_txt} | {r['counted_flops']:.3e} | "
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
    lines += ["", target_note, "", under, "",
              f"Per arm, over seeds (spread = max - min; differences from `{compare}` use the means):",
              "", f"| arm | changes | seeds | val loss (each seed) | mean | spread | val - {compare} "
              "| held-out loss (each seed) | mean | spread | reduction (headline) | strictest |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for label in sorted({r["label"] for r in rows}, key=lambda x: (x != reference, x != compare, x)):
        rs = sorted((r for r in rows if r["label"] == label), key=lambda r: r["seed"])
        v = [r["final"]["val"] for r in rs]
        h = [r["final"]["heldout"] for r in rs]
        change = ", ".join(f"{k}={val}" for k, val in rs[0].get("overrides", {}).items()) or rs[0]["arm"]
        delta = "-" if compare_mean is None else diff_text(np.mean(v) - compare_mean, floor)
        lines.append(f"| {label} | {change} | {','.join(str(r['seed']) for r in rs)} | "
                     f"{', '.join(_val(r) for r in rs)} | {np.mean(v):.4f} | {max(v) - min(v):.4f} | {delta} | "
                     f"{', '.join(f'{x:.4f}' for x in h)} | {np.mean(h):.4f} | {max(h) - min(h):.4f} | "
                     f"{rs[0]['reduction']['headline']:.2f}x | {rs[0]['reduction']['strictest']:.2f}x |")
    lines += ["", under]
    sweep = sweep_lines(rows, floor, next((a for a in map(_argv, folders) if is_sweep_command(a)), None))
    lines += sweep + (["", under] if sweep else [])
    lines += (frontier_lines(rows, floor, tolerance) + ["", under]) if frontier else []
    lines += timing_lines(rows, reference, floor)
    lines += noise_table(sources, floor, noise_arms)
    unstable = [r for r in rows + reruns if r.get("unstable")]
    if unstable:
        rule = unstable[0]["spike_rule"]
        lines += ["", f"Unstable runs (a loss spike: the training loss, EMA over {rule['ema_logs']} logs, rose more "
                      f"than {rule['threshold_nats']} nats above its running minimum after "
                      f"{rule['after_fraction']:.0%} of the steps); never ranked as the best of anything:"]
        lines += [f"- {r['label']} seed {r['seed']}: " + ", ".join(
            f"step {s['step']} (loss {s['loss']:.3f}, min so far {_fmt(s['min_so_far'], '.3f')})" for s in r["spikes"])
            for r in unstable]
    shares = r0["model"]["flop_shares"]
    lines += ["", f"Dense FLOP shares of the rung (per token, mst_hf.flops): LM head {shares['head']:.1%}, other "
                  f"matmuls {shares['blocks']:.1%}, attention {shares['attention']:.1%}."]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(folder, "study.md"), "w") as f:
        f.write(text)
    try:
        _plot(rows, os.path.join(folder, "study.png"), dense_curve_final)
        plot_time(rows, os.path.join(folder, "study_time.png"), dense_curve_final)
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
