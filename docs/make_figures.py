"""Draw the figures of docs/concepts.md into docs/img/ from the library's own functions.

    python docs/make_figures.py

* ``hsa_patterns.png``: the boolean masks of the HSA patterns (``mst_hf.attention.patterns``), query rows x key
  columns, on a 64-token sequence with window = stride = block = 16 (the ratios of the paper's 128 at context 1024 are
  1/8; 16 at 64 keeps the cells visible);
* ``hsa_head_split.png``: the per-head split of ``local_strided`` (first half of the heads local, second strided);
* ``schedule.png``: the sparsity schedule, attention density and counted cumulative FLOPs of the ``gpt2-4x``
  preset for GPT-2 124M, 10,000 steps of 512 x 1024 tokens (``mst_hf.plan.plan_run`` + ``plot_schedule``).
"""

import os

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mst_hf import MSTConfig
from mst_hf.attention.patterns import attention_density, pattern_mask_fn

IMG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "img")
SEQ_LEN, WINDOW, STRIDE, BLOCK = 64, 16, 16, 16


def dense_mask(mask_fn, seq_len: int, head: int = 0) -> torch.Tensor:
    """Evaluate a ``(b, h, q_idx, kv_idx) -> bool`` pattern on every (query, key) pair: ``(seq_len, seq_len)``."""
    q = torch.arange(seq_len).view(-1, 1)  # (T, 1)
    k = torch.arange(seq_len).view(1, -1)  # (1, T)
    return mask_fn(torch.tensor(0), torch.tensor(head), q, k).expand(seq_len, seq_len)


def draw_masks(panels: list[tuple[str, torch.Tensor]], path: str, suptitle: str) -> None:
    fig = Figure(figsize=(3.1 * len(panels), 3.9), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, mask) in zip(axes, panels):
        ax.imshow(mask.numpy(), cmap="Blues", vmin=0, vmax=1.25, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("key position")
        ax.set_xticks([0, 16, 32, 48, 63])
        ax.set_yticks([0, 16, 32, 48, 63])
    axes[0].set_ylabel("query position")
    fig.suptitle(suptitle, fontsize=10)
    fig.savefig(path, dpi=100)


def pattern_figure() -> str:
    panels = []
    for pattern in ("dense", "local", "strided", "local_strided", "fixed"):
        fn = pattern_mask_fn(pattern, window=WINDOW, stride=STRIDE, block=BLOCK)
        density = attention_density(pattern, SEQ_LEN, window=WINDOW, stride=STRIDE, block=BLOCK)
        panels.append((f"{pattern}\ndensity {density:.3f}", dense_mask(fn, SEQ_LEN)))
    path = os.path.join(IMG_DIR, "hsa_patterns.png")
    draw_masks(panels, path, f"HSA patterns, T={SEQ_LEN}, window = stride = block = {WINDOW} (blue: attended)")
    return path


def head_split_figure() -> str:
    fn = pattern_mask_fn("local_strided", window=WINDOW, stride=STRIDE, head_split=True, num_heads=4)
    panels = [(f"head {h} ({'local' if h < 2 else 'strided'})", dense_mask(fn, SEQ_LEN, head=h)) for h in (0, 3)]
    path = os.path.join(IMG_DIR, "hsa_head_split.png")
    draw_masks(panels, path, "local_strided with hsa_head_split=True, 4 heads")
    return path


def schedule_figure() -> str:
    from mst_hf.plan import plan_run
    from mst_hf.plotting import plot_schedule

    plan = plan_run("gpt2-124m", MSTConfig.from_preset("gpt2-4x"), total_steps=10_000, tokens_per_step=512 * 1024,
                    seq_len=1024)
    path = os.path.join(IMG_DIR, "schedule.png")
    plot_schedule(plan.trace(), path, title="gpt2-4x preset, GPT-2 124M, 10,000 steps (planned, counted FLOPs)")
    print(f"planned counted FLOP reduction: {plan.flop_reduction:.3f}x")
    return path


def main() -> None:
    os.makedirs(IMG_DIR, exist_ok=True)
    for path in (pattern_figure(), head_split_figure(), schedule_figure()):
        print(f"wrote {os.path.relpath(path)}")


if __name__ == "__main__":
    main()
