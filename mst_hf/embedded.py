"""The tokenizer and the corpus shipped inside the package, for runs with no network (see ``mst_hf/data/README.md``).

* :func:`embedded_tokenizer`: GPT-2's byte-level BPE (vocabulary 50257, ``<|endoftext|>`` = 50256), with the pad
  token set to the end-of-text token, as causal-LM training needs one and GPT-2 has none.
* :func:`embedded_corpus_path`: Herman Melville's *Moby Dick* (public domain), one UTF-8 text file.
* :func:`load_embedded_dataset`: the book as a ``datasets.DatasetDict`` with ``train`` and ``validation`` splits,
  one line per row in a ``text`` column: the input format of ``run_clm.py``-style tokenize-then-group pipelines.
* :func:`load_embedded_lm_dataset`: the same splits tokenized and cut into blocks of ``block_size`` tokens with
  ``labels = input_ids``, ready for a causal-LM ``Trainer``.
"""

import os
from itertools import chain

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
TOKENIZER_DIR = os.path.join(DATA_DIR, "gpt2-tokenizer")
CORPORA = {"moby-dick": os.path.join(DATA_DIR, "moby-dick", "moby-dick.txt")}
DEFAULT_CORPUS = "moby-dick"
GPT2_MAX_POSITIONS = 1024


def embedded_tokenizer():
    """GPT-2's tokenizer from the shipped ``vocab.json`` + ``merges.txt``, with ``pad_token = eos_token``.

    Loaded with ``GPT2TokenizerFast.from_pretrained(folder)``: building it as ``GPT2TokenizerFast(vocab_file=...)``
    gives, in transformers 5.x, a tokenizer that silently encodes everything as ``[]``.
    """
    from transformers import GPT2TokenizerFast

    tokenizer = GPT2TokenizerFast.from_pretrained(TOKENIZER_DIR, model_max_length=GPT2_MAX_POSITIONS)
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def embedded_corpus_path(name: str = DEFAULT_CORPUS) -> str:
    """Path of a shipped corpus (a single ``.txt`` file)."""
    if name not in CORPORA:
        raise ValueError(f"Unknown embedded corpus {name!r}; the package ships {sorted(CORPORA)}.")
    return CORPORA[name]


def split_text(text: str, validation_fraction: float) -> tuple[str, str]:
    """Cut ``text`` at the first line break after ``1 - validation_fraction`` of its characters.

    Returns ``(train_text, validation_text)``; the validation part is the end of the text, never seen in training.
    """
    if not isinstance(validation_fraction, (int, float)) or not 0.0 < validation_fraction < 1.0:
        raise ValueError(
            f"`validation_fraction` must be a fraction in (0, 1), e.g. 0.05 for the last 5% of the text, "
            f"got {validation_fraction!r}."
        )
    cut = text.find("\n", int(len(text) * (1.0 - validation_fraction)))
    if cut < 0:
        cut = int(len(text) * (1.0 - validation_fraction))
    return text[:cut], text[cut:].lstrip("\n")


def load_embedded_dataset(name: str = DEFAULT_CORPUS, validation_fraction: float = 0.05):
    """The shipped corpus as a ``DatasetDict`` with ``train`` and ``validation`` splits (a ``text`` column, one line
    per row, empty lines kept as the text has them). ``validation_fraction`` is the share of characters, taken
    from the end of the book, held out for validation."""
    try:
        from datasets import Dataset, DatasetDict
    except ImportError as err:
        raise ImportError(
            'load_embedded_dataset builds a `datasets.DatasetDict` and needs `datasets`: pip install -e ".[example]" '
            '(or pip install "mst_hf[example]").'
        ) from err

    with open(embedded_corpus_path(name), encoding="utf-8") as f:
        text = f.read()
    train_text, validation_text = split_text(text, validation_fraction)
    return DatasetDict(
        train=Dataset.from_dict({"text": train_text.splitlines(keepends=True)}),
        validation=Dataset.from_dict({"text": validation_text.splitlines(keepends=True)}),
    )


def group_texts(examples: dict, block_size: int) -> dict:
    """Concatenate tokenized texts and cut them into ``block_size`` blocks (the remainder is dropped); the labels are
    the inputs (the model shifts them). For ``Dataset.map(..., batched=True)``."""
    ids = list(chain.from_iterable(examples["input_ids"]))
    n = len(ids) // block_size * block_size
    blocks = [ids[i : i + block_size] for i in range(0, n, block_size)]
    return {"input_ids": blocks, "labels": [list(b) for b in blocks]}


def load_embedded_lm_dataset(tokenizer=None, block_size: int = 128, validation_fraction: float = 0.05,
                             name: str = DEFAULT_CORPUS):
    """The shipped corpus, tokenized (``tokenizer``, default :func:`embedded_tokenizer`) and cut into blocks of
    ``block_size`` tokens: a ``DatasetDict`` with ``train`` and ``validation`` splits of ``input_ids`` and
    ``labels``. Every block of the train split comes before every block of the validation split in the book."""
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 2:
        raise ValueError(f"`block_size` must be an int >= 2 (tokens per training sequence), got {block_size!r}.")
    tokenizer = embedded_tokenizer() if tokenizer is None else tokenizer
    raw = load_embedded_dataset(name, validation_fraction)
    tokenized = raw.map(lambda batch: tokenizer(list(batch["text"])), batched=True, remove_columns=["text"])
    columns = tokenized["train"].column_names
    return tokenized.map(group_texts, batched=True, remove_columns=columns, fn_kwargs={"block_size": block_size})
