"""Pre-tokenise the public-domain State of the Union corpus for GPU runs (the GPU machine has no `datasets`).

    python bench/prepare_data.py --sotu ../shared/data/sotu --tokenizer ../shared/data/gpt2-tokenizer --out .gpu/data

Writes ``train.bin`` (addresses before 2011) and ``val.bin`` (2011 on: 11 held-out addresses) as uint16 GPT-2 token
ids, each address followed by ``<|endoftext|>``, plus ``meta.json`` with the counts.
"""

import argparse
import json
import os

import numpy as np
from transformers import GPT2TokenizerFast


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sotu", required=True, help="folder of YEAR_NAME_PARTY.txt files")
    parser.add_argument("--tokenizer", required=True, help="folder holding vocab.json and merges.txt")
    parser.add_argument("--out", required=True)
    parser.add_argument("--first_val_year", type=int, default=2011)
    args = parser.parse_args()
    tok = GPT2TokenizerFast.from_pretrained(args.tokenizer)
    splits = {"train": [], "val": []}
    files = sorted(f for f in os.listdir(args.sotu) if f.endswith(".txt") and f[:4].isdigit())
    for name in files:
        with open(os.path.join(args.sotu, name), encoding="utf-8") as f:
            ids = tok(f.read())["input_ids"] + [tok.eos_token_id]
        splits["val" if int(name[:4]) >= args.first_val_year else "train"].extend(ids)
    os.makedirs(args.out, exist_ok=True)
    meta = {"files": len(files), "first_val_year": args.first_val_year}
    for split, ids in splits.items():
        np.asarray(ids, dtype=np.uint16).tofile(os.path.join(args.out, f"{split}.bin"))
        meta[f"{split}_tokens"] = len(ids)
    with open(os.path.join(args.out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
