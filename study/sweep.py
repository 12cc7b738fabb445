"""Learning-rate sweeps: every arm at every learning rate with one seed (``ARM@lr=V``), then each arm's best LR on
the validation split, and the command that confirms it with every seed.

    python -m study ... --arms dense,mst --sweep_lrs 1e-3,2e-3,4e-3         # or --sweep_factor 2 --sweep_points 3
    python -m study --report OUT                                           # the arm x LR table, the confirm command

The best LR of an arm is the one of lowest final validation loss among its stable runs (:mod:`study.spikes`); an
arm whose best LR is at the edge of the grid is flagged (the optimum may lie outside it), and so is a runner-up
within the noise floor of the best (:mod:`study.noise`).
"""

import json
import shlex

import numpy as np

from .noise import diff_text

SWEEP_TAG = "@lr="
# options of the sweep command that the confirm command replaces (each takes one value)
_REPLACED = ("--sweep_lrs", "--sweep_factor", "--sweep_points", "--arms", "--arm", "--out", "--two_seed_arms",
             "--repeat")


def _positive(name: str, value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a positive number, got {value!r}.") from None
    if not value > 0:
        raise ValueError(f"`{name}` must be a positive number, got {value!r}.")
    return value


def sweep_lrs(args) -> list[float]:
    """The learning rates of a sweep: ``--sweep_lrs`` as listed, or ``--sweep_points`` LRs spaced by
    ``--sweep_factor`` around ``--lr`` (``lr * factor**i`` for ``i`` from ``-((points - 1) // 2)``: 4 points of
    factor 2 around 2e-3 are 1e-3, 2e-3, 4e-3, 8e-3); ``[]`` when no sweep is asked for."""
    listed, factor = getattr(args, "sweep_lrs", ""), float(getattr(args, "sweep_factor", 0.0) or 0.0)
    points = int(getattr(args, "sweep_points", 3))
    if listed and factor:
        raise ValueError(f"`--sweep_lrs {listed}` and `--sweep_factor {factor}` both name the sweep's learning rates: "
                         "give one of them.")
    if listed:
        lrs = [_positive("--sweep_lrs", x) for x in listed.split(",") if x]
    elif factor:
        if factor <= 1 or points < 2:
            raise ValueError(f"`--sweep_factor` must be > 1 and `--sweep_points` >= 2, got {factor!r} and {points!r}.")
        first = -((points - 1) // 2)
        lrs = [float(f"{args.lr * factor**i:.6g}") for i in range(first, first + points)]
    else:
        return []
    if len(set(lrs)) != len(lrs):
        raise ValueError(f"`--sweep_lrs` lists a learning rate twice: {lrs}.")
    return sorted(lrs)


def is_sweep_command(argv: list[str] | None) -> bool:
    return bool(argv) and any(a.split("=", 1)[0] in ("--sweep_lrs", "--sweep_factor") for a in argv)


def sweep_label(label: str, lr: float) -> str:
    return f"{label}{SWEEP_TAG}{lr:g}"


def split_label(label: str) -> tuple[str, float | None]:
    """``("dense", 0.002)`` of ``"dense@lr=0.002"``; ``(label, None)`` of a label outside a sweep."""
    arm, tag, value = label.rpartition(SWEEP_TAG)
    if not tag:
        return label, None
    try:
        return arm, float(value)
    except ValueError:
        return label, None


def sweep_cells(rows: list[dict]) -> dict[str, dict[float, dict]]:
    """``arm -> lr -> {val, unstable, base, overrides}`` of the sweep runs in ``rows`` (mean over seeds)."""
    cells: dict[str, dict[float, dict]] = {}
    for r in rows:
        arm, lr = split_label(r["label"])
        if lr is None:
            continue
        cell = cells.setdefault(arm, {}).setdefault(lr, {"vals": [], "unstable": False, "base": r["arm"],
                                                         "overrides": r.get("overrides", {})})
        cell["vals"].append(r["final"]["val"])
        cell["unstable"] |= bool(r.get("unstable"))
    for per_lr in cells.values():
        for cell in per_lr.values():
            cell["val"] = float(np.mean(cell.pop("vals")))
    return cells


def best_lrs(cells: dict[str, dict[float, dict]]) -> dict[str, float | None]:
    """Each arm's LR of lowest validation loss among its stable runs (``None`` when every run was unstable)."""
    best = {}
    for arm, per_lr in cells.items():
        stable = {lr: c["val"] for lr, c in per_lr.items() if not c["unstable"]}
        best[arm] = min(stable, key=stable.get) if stable else None
    return best


def _value(v) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def arm_spec(arm: str, base: str, overrides: dict, lr: float) -> str:
    """``--arm`` value that runs ``arm`` (base arm and overrides of its sweep runs) at ``lr``."""
    pairs = [f"{k}={_value(v)}" for k, v in overrides.items() if k != "lr"] + [f"lr={lr:g}"]
    return f"{arm}={base}:" + ":".join(pairs)


def confirm_command(argv: list[str], specs: list[str]) -> str:
    """The sweep command (its arguments ``argv``) turned into the confirm command: the sweep's own options
    (``--sweep_*``, ``--arms``, ``--arm``, ``--repeat``, ``--two_seed_arms``) replaced by one ``--arm`` per arm at
    its best LR run with every seed of ``--seeds``, written to the sweep's ``--out`` + ``_confirm``."""
    kept, out, i = [], "results/study", 0
    while i < len(argv):
        name = argv[i].split("=", 1)[0]
        if name in _REPLACED:
            value = argv[i].split("=", 1)[1] if "=" in argv[i] else (argv[i + 1] if i + 1 < len(argv) else "")
            out = value if name == "--out" else out
            i += 1 if "=" in argv[i] else 2
            continue
        kept.append(argv[i])
        i += 1
    tail = ["--arms", "", "--two_seed_arms", "all"] + [x for s in specs for x in ("--arm", s)]
    return shlex.join(["python", "-m", "study", *kept, *tail, "--out", out.rstrip("/") + "_confirm"])


def sweep_lines(rows: list[dict], floor: float | None, argv: list[str] | None) -> list[str]:
    """The arm x LR table of the sweep runs in ``rows`` (validation loss; ``**`` the best LR of the arm), its notes
    and the confirm command; ``[]`` when ``rows`` holds no sweep run."""
    cells = sweep_cells(rows)
    if not cells:
        return []
    best = best_lrs(cells)
    lrs = sorted({lr for per_lr in cells.values() for lr in per_lr})
    lines = ["", "LR sweep (final validation loss, one seed; **best** = lowest among stable runs; `(unstable)`: a "
                 "loss spike, never picked):", "",
             "| arm | " + " | ".join(f"lr={lr:g}" for lr in lrs) + " | best LR | note |",
             "|---|" + "---|" * (len(lrs) + 2)]
    specs = []
    for arm in sorted(cells):
        per_lr, b = cells[arm], best[arm]
        row = []
        for lr in lrs:
            c = per_lr.get(lr)
            text = "-" if c is None else f"{c['val']:.4f}" + (" (unstable)" if c["unstable"] else "")
            row.append(f"**{text}**" if lr == b else text)
        notes = []
        if b is None:
            notes.append("every run unstable: no LR picked")
        else:
            if b in (min(per_lr), max(per_lr)) and len(per_lr) > 1:
                notes.append("best at the edge of the grid: extend the sweep")
            runner = sorted((c["val"], lr) for lr, c in per_lr.items() if lr != b and not c["unstable"])
            if runner and diff_text(runner[0][0] - per_lr[b]["val"], floor) == "~":
                notes.append(f"lr={runner[0][1]:g} within noise of the best")
            specs.append(arm_spec(arm, per_lr[b]["base"], per_lr[b]["overrides"], b))
        lines.append(f"| {arm} | " + " | ".join(row) + f" | {'-' if b is None else f'{b:g}'} | {'; '.join(notes)} |")
    if specs and argv is not None:
        lines += ["", "Confirm each arm's best LR with every seed of `--seeds` (then `--report` the confirm folder, "
                      "with `--frontier`):", "", "```", confirm_command(argv, specs), "```"]
    return lines
