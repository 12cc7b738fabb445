"""Tier B: the dictd dictionaries (GCIDE, WordNet, FOLDOC, The Devil's Dictionary), markup stripped.

A dictd database is an ``.index`` (one line per headword: word, TAB, offset, TAB, length, the numbers in dictd's
base-64 digits ``A-Za-z0-9+/``) and a ``.dict.dz`` (a gzip stream, random-accessible but readable straight
through). Each distinct (offset, length) is one entry; entries are read in index order, the ``00-database-*``
header entries skipped. An entry becomes one line of running text: indented continuation lines and blank lines
join with a space, cross-reference braces ``{...}`` go, and each dictionary's own markup (pronunciations and
source tags in GCIDE, ``[syn: ...]`` lists in WordNet, ``<subject>`` tags in FOLDOC) is removed.
"""

import gzip
import os
import re

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def dictd_number(digits):
    """Decode one dictd base-64 number (most significant digit first)."""
    value = 0
    for ch in digits:
        value = value * 64 + _B64.index(ch)
    return value


def read_dictd(stem):
    """The entries of the dictd database ``stem``.index/``stem``.dict.dz as text, in index (headword) order."""
    with gzip.open(stem + ".dict.dz", "rb") as f:
        data = f.read()
    spans, seen = [], set()
    with open(stem + ".index", encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.rstrip("\n").split("\t")
            if len(fields) < 3 or fields[0].startswith(("00-database", "00database")):
                continue
            span = (dictd_number(fields[1]), dictd_number(fields[2]))
            if span not in seen:
                seen.add(span)
                spans.append(span)
    for offset, length in spans:
        yield data[offset : offset + length].decode("utf-8", errors="replace")


_JOIN = re.compile(r"[ \t]*\n(?:[ \t]*\n)+[ \t]*|[ \t]*\n[ \t]+")
_RUNS = re.compile(r"[ \t]{2,}")


def flatten(entry):
    """Join indented continuation lines and paragraphs with one space; keep flush-left line breaks."""
    entry = entry.replace("{", "").replace("}", "").strip()
    entry = _JOIN.sub(" ", entry)
    return _RUNS.sub(" ", entry).strip()


_GCIDE_PRON = re.compile(r" \\[^\\\n]*\\")
_GCIDE_SOURCE = re.compile(r"\s*\[(?:[^\]\n]*(?:Webster|WordNet|PJC|Century|Chambers|RP|MW10|Pres\.)[^\]\n]*)\]")


_GCIDE_PRON_PAREN = re.compile(r" ?\((?=[^()\n]*\[[a-z^=`~\"-]+\])[^()\n]*\)")
_GCIDE_LABEL = re.compile(r"\[([A-Z][a-z]*)\.\]")


def gcide_entry(entry):
    entry = _GCIDE_PRON.sub("", entry)
    entry = _GCIDE_PRON_PAREN.sub("", entry)
    entry = _GCIDE_LABEL.sub(r"\1", entry)
    return flatten(_GCIDE_SOURCE.sub("", entry))


_WN_TAG = re.compile(r"\s*\[(?:syn|ant|also|see|rel|pos|attr|sim|der|hyper|hypo):[^\]]*\]")


def wordnet_entry(entry):
    head, _, body = entry.partition("\n")
    return f"{head.strip()}: {flatten(_WN_TAG.sub('', body))}"


_FOLDOC_SUBJECT = re.compile(r"<([^<>\n]+)>")


def foldoc_entry(entry):
    head, _, body = entry.strip("\n").partition("\n\n")
    word = head.split("\n")[-1].strip()
    body = flatten(_FOLDOC_SUBJECT.sub(r"(\1)", body))
    return f"{word} {body}"


def _dictionary(root, name, clean):
    entries = (clean(e) for e in read_dictd(os.path.join(root, "usr/share/dictd", name)))
    yield [e for e in entries if e], "\n"


def gcide(root):
    yield from _dictionary(root, "gcide", gcide_entry)


def wordnet(root):
    yield from _dictionary(root, "wn", wordnet_entry)


def foldoc(root):
    yield from _dictionary(root, "foldoc", foldoc_entry)


def devil(root):
    yield from _dictionary(root, "devil", flatten)
