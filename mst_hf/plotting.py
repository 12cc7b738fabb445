"""One figure of an MST run: sparsity, attention density and cumulative FLOPs against the optimizer step.

:func:`plot_schedule` draws a planned run (``mst_hf.plan.plan_run(...).trace()``) or a real one (arrays collected
from the ``mst/*`` logs). It uses matplotlib's object API with the Agg canvas, so it never touches pyplot's global
state or needs a display.
"""

import numpy as np

_SPARSITY_KEYS = (("target_sparsity", "target sparsity s(t)"), ("sparsity", "sparsity (counted)"))
_FLOP_KEYS = (("mst_cumulative_flops", "MST"), ("dense_cumulative_flops", "dense"))
MAX_POINTS = 4000  # longer traces are subsampled (phase boundaries kept): a 1M-point line takes a minute to draw


def _subsample(steps: np.ndarray, bounds) -> np.ndarray:
    """Indices of at most about ``MAX_POINTS`` evenly spaced points, plus the points around each phase boundary."""
    n = len(steps)
    if n <= MAX_POINTS:
        return np.arange(n)
    around = np.searchsorted(steps, np.asarray(list(bounds), dtype=float))
    keep = [np.linspace(0, n - 1, MAX_POINTS).astype(np.int64), around, around - 1]
    idx = np.unique(np.concatenate(keep))
    return idx[(idx >= 0) & (idx < n)]


def plot_schedule(trace: dict, path: str, title: str | None = None) -> str:
    """Write a PNG of a run's schedule to ``path`` and return ``path``.

    ``trace`` holds equally long per-step (or per-logged-step) sequences:

    * ``step`` (required): the x axis;
    * ``target_sparsity`` and/or ``sparsity``: global weight sparsity (top panel);
    * ``attention_density``: attended pairs over causal pairs, 1.0 = dense (middle panel);
    * ``mst_cumulative_flops`` and/or ``dense_cumulative_flops``: cumulative training FLOPs (bottom panel);
    * ``phase_bounds`` (optional): ``(ultra_start, restoration_start)``, drawn as dashed lines on every panel.

    Panels whose keys are missing are left out; at least one must be present. Traces longer than ``MAX_POINTS``
    are drawn from evenly spaced samples (and the steps around each phase boundary).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            'plot_schedule needs matplotlib, which comes with the example extra: pip install -e ".[example]" (or '
            "pip install matplotlib)."
        ) from err
    if not isinstance(trace, dict) or "step" not in trace:
        raise ValueError(f"`trace` must be a dict with a 'step' sequence, got keys {sorted(trace)!r}.")
    steps = np.asarray(trace["step"])
    for key, value in trace.items():
        if key != "phase_bounds" and len(value) != len(steps):
            raise ValueError(f"`trace[{key!r}]` has {len(value)} values but `trace['step']` has {len(steps)}; "
                             "give one value per logged step.")
    panels = [
        ([k for k in _SPARSITY_KEYS if k[0] in trace], "sparsity", 1.0),
        ([("attention_density", "attention density")] if "attention_density" in trace else [], "attention density",
         1.0),
        ([k for k in _FLOP_KEYS if k[0] in trace], "cumulative FLOPs", None),
    ]
    panels = [p for p in panels if p[0]]
    if not panels:
        raise ValueError("`trace` has nothing to plot: give 'target_sparsity'/'sparsity', 'attention_density' or "
                         "'mst_cumulative_flops'/'dense_cumulative_flops'.")

    fig = Figure(figsize=(8, 2.6 * len(panels)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    bounds = trace.get("phase_bounds") or ()
    idx = _subsample(steps, bounds)
    for ax, (series, ylabel, top) in zip(axes, panels):
        for key, label in series:
            ax.plot(steps[idx], np.asarray(trace[key], dtype=float)[idx], label=label, drawstyle="steps-post")
        for i, bound in enumerate(bounds):
            ax.axvline(bound, color="gray", linestyle="--", linewidth=0.8,
                       label=("ultra-sparse / restoration starts" if i == 0 else None))
        ax.set_ylabel(ylabel)
        if top is not None:
            ax.set_ylim(-0.02, top + 0.02)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    if "mst_cumulative_flops" in trace and "dense_cumulative_flops" in trace and len(steps):
        mst, dense = float(trace["mst_cumulative_flops"][-1]), float(trace["dense_cumulative_flops"][-1])
        if mst > 0:
            axes[-1].set_title(f"counted reduction {dense / mst:.2f}x", fontsize="small")
    axes[-1].set_xlabel("optimizer step")
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=110)
    return path
