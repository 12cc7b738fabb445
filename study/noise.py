"""The noise floor of a batch of runs: how far apart two runs of the same arm end, so that smaller differences
between arms are printed as ``~`` (within noise) instead of being read as a ranking.

Two kinds of evidence, both on the final validation loss:

* **same-seed repeat**: an arm run twice with the same seed (a run labelled ``ARM#rep``, from ``--repeat ARM``, or
  the same label and seed found again in a later report folder): ``|val - val_repeat|`` (non-deterministic GPU
  kernels; 0 on CPU);
* **seed spread**: ``max - min`` of an arm's final validation loss over its seeds (two or more).

The floor is the largest of these over the reference arms (``--noise_arms``, default the ``--reference`` and
``--compare`` arms; an arm also matches its sweep runs ``ARM@lr=V``), or unknown when none of them has either.
"""

REPEAT_TAG = "#rep"
WITHIN = "~"


def repeat_of(label: str) -> str | None:
    """The label a ``LABEL#rep`` (or ``LABEL#rep2`` ...) run repeats; ``None`` for another label."""
    head, tag, tail = label.rpartition(REPEAT_TAG)
    return head if tag and head and (tail == "" or tail.isdigit()) else None


def arm_name(label: str) -> str:
    """The arm a label belongs to: ``dense`` of ``dense``, ``dense#rep``, ``dense@lr=0.002`` and
    ``dense@lr=0.002#rep``."""
    label = repeat_of(label) or label
    head, tag, _ = label.rpartition("@lr=")
    return head if tag else label


def noise_sources(rows: list[dict], reruns: list[dict] = ()) -> list[dict]:
    """``[{label, kind, seeds, value}]``: every same-seed repeat difference and every seed spread in ``rows``
    (``reruns``: runs whose label and seed ``rows`` already holds)."""
    final = {(r["label"], r["seed"]): r["final"]["val"] for r in rows}
    sources = []
    pairs = [(repeat_of(r["label"]), r) for r in rows] + [(r["label"], r) for r in reruns]
    for original, r in pairs:
        if original is not None and (original, r["seed"]) in final:
            sources.append({"label": original, "kind": "same-seed repeat", "seeds": [r["seed"]],
                            "value": abs(r["final"]["val"] - final[(original, r["seed"])])})
    by_label: dict[str, dict[int, float]] = {}
    for r in rows:
        if repeat_of(r["label"]) is None:
            by_label.setdefault(r["label"], {})[r["seed"]] = r["final"]["val"]
    for label, vals in sorted(by_label.items()):
        if len(vals) >= 2:
            sources.append({"label": label, "kind": "seed spread", "seeds": sorted(vals),
                            "value": max(vals.values()) - min(vals.values())})
    return sources


def noise_floor(sources: list[dict], arms) -> float | None:
    """The largest value of ``sources`` whose label belongs to one of ``arms`` (label or :func:`arm_name`)."""
    values = [s["value"] for s in sources if s["label"] in arms or arm_name(s["label"]) in arms]
    return max(values) if values else None


def diff_text(diff: float | None, floor: float | None, spec: str = "+.4f") -> str:
    """``diff`` formatted, or ``~`` when smaller than the noise floor in size."""
    if diff is None:
        return "-"
    return WITHIN if floor is not None and abs(diff) < floor else format(diff, spec)


def floor_line(floor: float | None, arms) -> str:
    """One line under a table: the floor and what it means for the differences printed."""
    names = ", ".join(f"`{a}`" for a in arms)
    if floor is None:
        return (f"Noise floor: unknown (no two seeds and no same-seed repeat of {names}; run `--repeat ARM` or a "
                "second seed): differences are printed as measured.")
    if floor == 0:
        return (f"Noise floor: 0 (the only evidence for {names} is a bit-identical same-seed repeat: seed noise is "
                "not measured): differences are printed as measured.")
    return (f"Noise floor: {floor:.4f} nats (largest seed spread or same-seed repeat difference of {names}); "
            f"differences smaller than that are printed as `{WITHIN}` (within noise).")


def noise_table(sources: list[dict], floor: float | None, arms) -> list[str]:
    """The evidence behind the floor, one row per repeat or spread."""
    if not sources:
        return ["", floor_line(floor, arms)]
    lines = ["", "Noise (final validation loss):", "", "| arm | kind | seeds | difference | counts toward the floor |",
             "|---|---|---|---|---|"]
    for s in sources:
        counts = s["label"] in arms or arm_name(s["label"]) in arms
        lines.append(f"| {s['label']} | {s['kind']} | {','.join(map(str, s['seeds']))} | {s['value']:.4f} | "
                     f"{'yes' if counts else 'no'} |")
    return lines + ["", floor_line(floor, arms)]
