"""Write the attention time table shipped with mst_hf (``mst_hf/attention/times.json``) from the committed results.

    python tools/attention_table.py                      # the committed sources -> mst_hf/attention/times.json
    python tools/attention_table.py A.md B.md --out T.json

Each source is the Markdown ``bench/attention.py`` writes; its ``auto -> KERNEL`` rows become the GPU's rows
(`mst_hf.attention.timing.parse_benchmark`). The committed sources are the H200 run of the Triton kernel and the H100
re-timing of the current code at 1024 tokens (the other H100 file, ``attention_h100_premove_1024.md``, timed the
code before the attention package moved, and the older H200 files timed earlier kernels). One source per GPU.
"""

import argparse
import os
import sys

from mst_hf.attention.timing import DEFAULT_TIMES, dump_times, parse_benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("docs/results/attention_triton.md", "docs/results/attention_h100_head_1024.md")


def build(sources=SOURCES, root=ROOT) -> str:
    """The table's JSON text from ``sources`` (paths relative to ``root``, recorded as given)."""
    devices = {}
    for source in sources:
        with open(os.path.join(root, source), encoding="utf-8") as f:
            gpu, entry = parse_benchmark(f.read(), source)
        if gpu in devices:
            raise SystemExit(f"{source}: a second table for {gpu} (after {devices[gpu]['source']}); give one per GPU.")
        devices[gpu] = entry
    return dump_times(devices)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sources", nargs="*", default=list(SOURCES), help="bench/attention.py Markdown outputs")
    parser.add_argument("--out", default=DEFAULT_TIMES, help="the JSON to write (default: the shipped table)")
    args = parser.parse_args(argv)
    text = build(args.sources)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
