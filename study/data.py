"""Derive the study's data from a study-corpus build: a small byte-level BPE, re-encoded splits, a held-out domain.

    python -m study.data --corpus PATH/study-corpus --out .gpu/study

``--corpus`` is a folder with ``train.bin`` (or ``train.bin.xz``), ``val.bin`` and ``manifest.json``, as
``tools/corpus/prepare_corpus.py`` writes them (GPT-2 ids, uint16, every document followed by ``<|endoftext|>``;
both files hold the sources in manifest order). Why a new tokenizer: with GPT-2's 50k vocabulary the LM head of a
model small enough to see >= 20 tokens per parameter in ~50M tokens holds most of its weights and FLOPs; a
4096-token BPE keeps the head near 30% of the training FLOPs (``python -m study`` prints the shares).

Steps, all deterministic:

1. slice both files by source with the manifest's per-source token counts (refusing files not in manifest order);
2. ``--heldout`` sources leave training entirely (their train and validation text together form the second-domain
   split ``heldout``); the other sources' validation pieces form ``val``;
3. training documents are cut at line breaks into pieces of at most ``--piece_tokens`` GPT-2 tokens, and a piece is
   kept when a hash of its ids falls below ``--train_fraction`` (an even subsample across sources, so the
   compressed files stay small enough to carry to a GPU machine);
4. the pieces are decoded with the GPT-2 tokenizer, a byte-level BPE of ``--vocab_size`` tokens is trained on the
   kept training text only, and every split is re-encoded with it (``<|endoftext|>`` is id 0, after every piece);
5. ``train.bin.xz``, ``val.bin.xz``, ``heldout.bin.xz`` (uint16), ``tokenizer.json`` and ``manifest.json``
   (per-source counts, sha256 of every decompressed file and of the inputs) are written to ``--out``.
"""

import argparse
import hashlib
import json
import lzma
import os
import time

import numpy as np

GPT2_EOT = 50256
GPT2_NEWLINES = (628, 198)  # "\n\n", "\n": safe cut points for byte-level BPE (never inside a character)
EOT = "<|endoftext|>"
DEFAULT_HELDOUT = ("hansard-sample", "jargon-file", "postgresql-doc")
FROZEN_TRAIN_SHA256 = "f63cf72dddf41229d4019118f88d61d14ace4cbe7919774437ab414a19144d9e"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_tokens(path: str) -> np.ndarray:
    """A uint16 token file (``.bin``, or ``.bin.xz`` decompressed in memory) as a numpy array."""
    if path.endswith(".xz"):
        with lzma.open(path, "rb") as f:
            return np.frombuffer(f.read(), dtype=np.uint16)
    if not os.path.isfile(path) and os.path.isfile(path + ".xz"):
        return load_tokens(path + ".xz")
    return np.fromfile(path, dtype=np.uint16)


def read_ids(folder: str, split: str) -> np.ndarray:
    """``split.bin`` or ``split.bin.xz`` of ``folder`` as uint16 ids."""
    path = os.path.join(folder, f"{split}.bin")
    if os.path.isfile(path):
        with open(path, "rb") as f:
            data = f.read()
    elif os.path.isfile(path + ".xz"):
        with lzma.open(path + ".xz", "rb") as f:
            data = f.read()
    else:
        raise ValueError(f"`--corpus` {folder!r} has neither {split}.bin nor {split}.bin.xz; point it at a "
                         "study-corpus build (tools/corpus/prepare_corpus.py's output folder).")
    return np.frombuffer(data, dtype=np.uint16)


def slice_sources(ids: np.ndarray, manifest: dict, key: str, split: str) -> dict[str, np.ndarray]:
    """Cut ``ids`` into per-source runs using ``manifest[source][key]`` (the files hold sources in manifest order)."""
    sources = [name for name in manifest if not name.startswith("_")]
    total = sum(int(manifest[s][key]) for s in sources)
    if total != len(ids):
        raise ValueError(f"{split}.bin holds {len(ids):,} tokens but the manifest's `{key}` counts add up to "
                         f"{total:,}: the files are not from the same build.")
    out, start = {}, 0
    for s in sources:
        end = start + int(manifest[s][key])
        if end > start and ids[end - 1] != GPT2_EOT:
            raise ValueError(f"{split}.bin: source {s!r} does not end with <|endoftext|> at token {end - 1:,}; the "
                             "file is not in manifest order, so sources cannot be sliced from it.")
        out[s] = ids[start:end]
        start = end
    return out


def documents(run: np.ndarray) -> list[np.ndarray]:
    """The documents of a run of ids (each ended by <|endoftext|>), without their <|endoftext|>."""
    ends = np.flatnonzero(run == GPT2_EOT)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [run[a:b] for a, b in zip(starts, ends) if b > a]


def pieces(doc: np.ndarray, max_tokens: int) -> list[np.ndarray]:
    """Cut a document into pieces of at most ``max_tokens`` ids, each ending at a line break where one exists."""
    out, start = [], 0
    while len(doc) - start > max_tokens:
        window = doc[start : start + max_tokens]
        cut = 0
        for nl in GPT2_NEWLINES:
            hits = np.flatnonzero(window == nl)
            if len(hits) and hits[-1] >= max_tokens // 2:
                cut = int(hits[-1]) + 1
                break
        if cut == 0:  # no line break in the second half: look for any one, else a hard cut
            hits = np.flatnonzero(np.isin(window, GPT2_NEWLINES))
            cut = int(hits[-1]) + 1 if len(hits) else max_tokens
        out.append(doc[start : start + cut])
        start += cut
    out.append(doc[start:])
    return out


def keep(piece: np.ndarray, fraction: float) -> bool:
    """Deterministic content hash in [0, 1) below ``fraction``."""
    h = int.from_bytes(hashlib.blake2b(piece.tobytes(), digest_size=8).digest(), "little")
    return h / 2**64 < fraction


def decode_all(gpt2, runs: list[np.ndarray], batch: int = 512) -> list[str]:
    texts = []
    for i in range(0, len(runs), batch):
        texts.extend(gpt2.decode_batch([r.tolist() for r in runs[i : i + batch]], skip_special_tokens=False))
    return texts


def encode_all(tok, texts: list[str], eot_id: int, batch: int = 512) -> np.ndarray:
    parts = []
    for i in range(0, len(texts), batch):
        for enc in tok.encode_batch(texts[i : i + batch], add_special_tokens=False):
            parts.append(np.asarray(enc.ids + [eot_id], dtype=np.uint16))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


def train_bpe(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer, length=len(texts))
    return tok


def write_xz(path: str, ids: np.ndarray) -> dict:
    data = ids.astype(np.uint16).tobytes()
    with lzma.open(path, "wb", preset=6) as f:
        f.write(data)
    return {"file": os.path.basename(path), "tokens": int(len(ids)), "sha256": sha256_bytes(data),
            "xz_bytes": os.path.getsize(path)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", required=True, help="folder with train.bin[.xz], val.bin and manifest.json")
    p.add_argument("--gpt2_tokenizer", default=os.path.join(os.path.dirname(__file__), "..", "mst_hf", "data",
                                                            "gpt2-tokenizer"))
    p.add_argument("--out", required=True)
    p.add_argument("--vocab_size", type=int, default=4096)
    p.add_argument("--heldout", default=",".join(DEFAULT_HELDOUT), help="comma-separated sources held out")
    p.add_argument("--train_fraction", type=float, default=1.0, help="share of training pieces kept (by hash)")
    p.add_argument("--piece_tokens", type=int, default=4096, help="longest training piece, in GPT-2 tokens")
    p.add_argument("--expect_train_sha256", default=FROZEN_TRAIN_SHA256,
                   help="refuse a train.bin with another digest ('' to skip the check)")
    args = p.parse_args(argv)
    if not 0.0 < args.train_fraction <= 1.0:
        raise ValueError(f"`--train_fraction` must be in (0, 1], got {args.train_fraction!r}.")
    if not 256 < args.vocab_size <= 65535:
        raise ValueError(f"`--vocab_size` must be in (256, 65535] (uint16 ids above the 256 bytes), got "
                         f"{args.vocab_size!r}.")
    t0 = time.time()
    with open(os.path.join(args.corpus, "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    train_ids, val_ids = read_ids(args.corpus, "train"), read_ids(args.corpus, "val")
    train_sha = sha256_bytes(train_ids.tobytes())
    if args.expect_train_sha256 and train_sha != args.expect_train_sha256:
        raise ValueError(f"train.bin has sha256 {train_sha}, expected {args.expect_train_sha256} (the frozen "
                         "build); pass --expect_train_sha256 '' to derive the study data from another build.")
    heldout = [s for s in args.heldout.split(",") if s]
    unknown = [s for s in heldout if s not in manifest]
    if unknown:
        raise ValueError(f"`--heldout` names sources {unknown} that the manifest does not list; choose from "
                         f"{[s for s in manifest if not s.startswith('_')]}.")
    train_runs = slice_sources(train_ids, manifest, "train_tokens", "train")
    val_runs = slice_sources(val_ids, manifest, "val_tokens", "val")

    split_pieces: dict[str, list[np.ndarray]] = {"train": [], "val": [], "heldout": []}
    sources: dict[str, dict] = {}
    for s in train_runs:
        row = {"tier": manifest[s].get("tier"), "split": "heldout" if s in heldout else "train"}
        if s in heldout:
            docs = documents(train_runs[s]) + documents(val_runs[s])
            split_pieces["heldout"].extend(docs)
            row["heldout_gpt2_tokens"] = int(sum(len(d) for d in docs))
        else:
            kept = [pc for d in documents(train_runs[s]) for pc in pieces(d, args.piece_tokens)
                    if keep(pc, args.train_fraction)]
            split_pieces["train"].extend(kept)
            val_docs = documents(val_runs[s])
            split_pieces["val"].extend(val_docs)
            row["train_gpt2_tokens_kept"] = int(sum(len(pc) for pc in kept))
            row["train_gpt2_tokens_available"] = int(manifest[s]["train_tokens"])
            row["val_gpt2_tokens"] = int(sum(len(d) for d in val_docs))
        sources[s] = row
    print(f"sliced {len(sources)} sources in {time.time() - t0:.0f}s: "
          + ", ".join(f"{k} {len(v)} pieces" for k, v in split_pieces.items()), flush=True)

    from transformers import GPT2TokenizerFast

    gpt2 = GPT2TokenizerFast.from_pretrained(args.gpt2_tokenizer).backend_tokenizer
    texts = {k: decode_all(gpt2, v) for k, v in split_pieces.items()}
    print(f"decoded in {time.time() - t0:.0f}s ({sum(len(t) for t in texts['train']):,} training characters)",
          flush=True)
    tok = train_bpe(texts["train"], args.vocab_size)
    eot_id = tok.token_to_id(EOT)
    print(f"trained a {tok.get_vocab_size()}-token BPE in {time.time() - t0:.0f}s", flush=True)

    os.makedirs(args.out, exist_ok=True)
    tok_path = os.path.join(args.out, "tokenizer.json")
    tok.save(tok_path)
    with open(tok_path, "rb") as f:
        tok_sha = sha256_bytes(f.read())
    files = {}
    for split, split_texts in texts.items():
        ids = encode_all(tok, split_texts, eot_id)
        files[split] = write_xz(os.path.join(args.out, f"{split}.bin.xz"), ids)
        files[split]["characters"] = int(sum(len(t) for t in split_texts))
        files[split]["pieces"] = len(split_texts)
        print(f"{split}: {len(ids):,} tokens, {files[split]['xz_bytes'] / 2**20:.1f} MiB xz "
              f"({time.time() - t0:.0f}s)", flush=True)
    out = {
        "description": "study data: GPT-2-tokenised study corpus decoded and re-encoded with its own byte-level BPE",
        "command": "python -m study.data " + " ".join(
            f"--{k} {v}" for k, v in vars(args).items() if k not in ("corpus", "out", "gpt2_tokenizer")),
        "input": {"train_sha256": train_sha, "val_sha256": sha256_bytes(val_ids.tobytes()),
                  "train_tokens": int(len(train_ids)), "val_tokens": int(len(val_ids))},
        "tokenizer": {"file": "tokenizer.json", "sha256": tok_sha, "vocab_size": tok.get_vocab_size(),
                      "eot_id": eot_id, "trained_on": "the kept training pieces only"},
        "heldout_sources": heldout,
        "train_fraction": args.train_fraction,
        "piece_tokens": args.piece_tokens,
        "splits": files,
        "sources": sources,
    }
    with open(os.path.join(args.out, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
    print(json.dumps({k: {kk: v[kk] for kk in ("tokens", "xz_bytes")} for k, v in files.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
