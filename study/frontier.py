"""The dense frontier: at each counted-FLOP budget of a batch of runs, the best dense run that fits it (any width,
any number of passes, any learning rate) against the sparse arms at that budget, and the counted FLOPs each arm
needs to reach each dense arm's final loss.

Budgets are the runs' counted FLOP totals (the library's headline convention, each record's ``counted_flops``, mean
over seeds), grouped when within ``tolerance`` of the smallest of a group (default 10%: the iso-FLOP small dense
model is matched to MST's planned FLOPs only as closely as a width step allows); a group's budget is its largest
total. An arm is the mean over its seeds; a same-seed repeat (``ARM#rep``) is noise evidence, not an arm; an
unstable arm (a loss spike, :mod:`study.spikes`) is shown as such and never chosen as the best dense run.
"""

import numpy as np

from .noise import diff_text, repeat_of

DEFAULT_TOLERANCE = 0.1


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


def arm_summaries(rows: list[dict]) -> list[dict]:
    """One entry per label (repeats left out): mean counted FLOPs and final validation loss over its seeds, whether
    it is dense (no masks) or unstable, its passes, model size and evaluation curves, in FLOP order."""
    by_label: dict[str, list[dict]] = {}
    for r in rows:
        if repeat_of(r["label"]) is None:
            by_label.setdefault(r["label"], []).append(r)
    out = []
    for label, rs in by_label.items():
        m = rs[0]["model"]
        out.append({
            "label": label, "dense": rs[0].get("mst_config") is None,
            "flops": float(np.mean([r["counted_flops"] for r in rs])),
            "val": float(np.mean([r["final"]["val"] for r in rs])),
            "curve_final": float(np.mean([r["curve"][-1]["val"] for r in rs])),
            "unstable": any(r.get("unstable") for r in rs), "passes": rs[0].get("passes", 1), "lr": rs[0].get("lr"),
            "model": f"{m['n_layer']} x {m['n_embd']}", "seeds": sorted(r["seed"] for r in rs),
            "curves": [[(c["flops"], c["val"]) for c in r["curve"]] for r in rs],
        })
    return sorted(out, key=lambda s: (s["flops"], s["label"]))


def budget_groups(summaries: list[dict], tolerance: float = DEFAULT_TOLERANCE) -> list[list[dict]]:
    """``summaries`` (in FLOP order) cut into groups whose totals lie within ``tolerance`` of the group's first."""
    groups: list[list[dict]] = []
    for s in summaries:
        if groups and s["flops"] <= groups[-1][0]["flops"] * (1 + tolerance):
            groups[-1].append(s)
        else:
            groups.append([s])
    return groups


def frontier(summaries: list[dict], tolerance: float = DEFAULT_TOLERANCE) -> list[dict]:
    """Per budget: ``{budget, best_dense, skipped_unstable, sparse}``: the stable dense arm of lowest validation loss
    among those whose counted FLOPs fit the budget (``None`` if none), the unstable dense arms that fit, and the
    sparse arms of the budget's group."""
    dense = [s for s in summaries if s["dense"]]
    out = []
    for group in budget_groups(summaries, tolerance):
        budget = max(s["flops"] for s in group)
        fits = [s for s in dense if s["flops"] <= budget]
        stable = [s for s in fits if not s["unstable"]]
        out.append({"budget": budget, "best_dense": min(stable, key=lambda s: s["val"]) if stable else None,
                    "skipped_unstable": [s["label"] for s in fits if s["unstable"]],
                    "sparse": [s for s in group if not s["dense"]]})
    return out


def reach(summary: dict, target: float) -> float | None:
    """Counted FLOPs at which ``summary``'s mean curve (over seeds, point by point: the seeds of an arm are evaluated
    at the same steps) reaches ``target``, or ``None``."""
    n = min(len(c) for c in summary["curves"])
    points = np.array([c[:n] for c in summary["curves"]], dtype=float)  # (seeds, evaluations, 2)
    return flops_to_reach([tuple(p) for p in points.mean(axis=0)], target)


def _name(s: dict) -> str:
    return f"{s['label']} (unstable)" if s["unstable"] else s["label"]


def frontier_lines(rows: list[dict], floor: float | None, tolerance: float = DEFAULT_TOLERANCE) -> list[str]:
    """The frontier table and the FLOPs-to-reach table of ``rows``."""
    summaries = arm_summaries(rows)
    lines = ["", f"Dense frontier (counted FLOPs, headline convention; budgets grouped within {tolerance:.0%}; "
                 "mean over seeds; the best dense run of a budget is the stable dense run of lowest val loss whose "
                 "counted FLOPs fit it, any width, passes or LR):", "",
             "| budget (counted FLOPs) | best dense within it | L x d, passes, LR | its FLOPs | its val | arm at this "
             "budget | its FLOPs | its val | val - best dense |", "|---|---|---|---|---|---|---|---|---|"]
    for b in frontier(summaries, tolerance):
        d = b["best_dense"]
        cells = ["none fits", "-", "-", "-"] if d is None else [
            d["label"], f"{d['model']}, {d['passes']}, {'-' if d['lr'] is None else format(d['lr'], 'g')}",
            f"{d['flops']:.3e}", f"{d['val']:.4f}"]
        if b["skipped_unstable"]:
            cells[0] += f" (not picked, unstable: {', '.join(b['skipped_unstable'])})"
        dense = " | ".join(cells)
        for s in b["sparse"] or [None]:
            arm = "- | - | - | -" if s is None else (
                f"{_name(s)} | {s['flops']:.3e} | {s['val']:.4f} | "
                f"{diff_text(None if d is None else s['val'] - d['val'], floor)}")
            lines.append(f"| {b['budget']:.3e} | {dense} | {arm} |")
    targets = [s for s in summaries if s["dense"]]
    if targets:
        lines += ["", "Counted FLOPs to reach each dense arm's final validation loss (curve subset, interpolated "
                      "between evaluations; x that dense arm's FLOPs):", "",
                  "| arm | its FLOPs | " + " | ".join(f"to {t['label']}'s {t['curve_final']:.4f}" for t in targets)
                  + " |", "|---|---|" + "---|" * len(targets)]
        for s in summaries:
            cells = []
            for t in targets:
                f = reach(s, t["curve_final"])
                cells.append("not reached" if f is None else f"{f:.3e} ({f / t['flops']:.2f}x)")
            lines.append(f"| {_name(s)} | {s['flops']:.3e} | " + " | ".join(cells) + " |")
    return lines
