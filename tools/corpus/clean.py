"""Text cleaning shared by every source: paragraphs, the prose filter, de-duplication, pieces, the split.

The pipeline per extracted document is: split into paragraphs (blank-line separated, each stripped, internal line
breaks kept), keep only prose paragraphs for technical docs (``is_prose``), drop paragraphs already seen anywhere
earlier in the corpus (``Deduper``), join the rest with a blank line into pieces of about ``limit`` characters
(``pieces``: a piece is closed as soon as it reaches the limit, at a paragraph boundary), drop pieces shorter than
``MIN_PIECE`` characters, and send each piece to validation when a hash of its text falls in the lowest 2%
(``is_validation``), so the split does not depend on order or on which other sources are built.
"""

import hashlib
import re

MIN_PIECE = 200
VAL_PERCENT = 2
DEDUP_MIN_CHARS = 40

_BLANK = re.compile(r"\n[ \t\r\f\v]*\n")
_SPACES = re.compile(r"\s+")


def paragraphs(text):
    """Blank-line separated paragraphs of stripped ``text`` (no-break spaces made plain); lines right-stripped."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\xa0", " ").strip()
    out = []
    for block in _BLANK.split(text):
        block = "\n".join(line.rstrip() for line in block.split("\n")).strip("\n")
        if block.strip():
            out.append(block)
    return out


# A small English function-word list: prose has many of these, code, tables and option lists have few.
STOP_WORDS = frozenset(
    """a about above after again against all also am an and any are as at be because been before being below
    between both but by can could did do does doing down during each few for from further had has have having he
    her here hers him his how i if in into is it its itself just may me might more most must my no nor not now of
    off on once only or other our ours out over own same shall she should so some such than that the their theirs
    them then there these they this those through to too under until up upon very was we were what when where which
    while who whom why will with would you your""".split()
)

_WORD = re.compile(r"[A-Za-z]+")
_DOT_LEADER = re.compile(r"\.{5,}|(?:\. ){4,}")
_CODE_CHARS = frozenset("\\{}_")


def prose_stats(par):
    """The measures the prose filter thresholds: length, letter share, words, stop-word ratio, code characters.

    The letter share counts letters and whitespace over all characters; words are runs of ASCII letters.
    """
    words = _WORD.findall(par)
    n = max(1, len(par))
    return {
        "chars": len(par),
        "letter_share": sum(c.isalpha() or c.isspace() for c in par) / n,
        "words": len(words),
        "stop_ratio": sum(w.lower() in STOP_WORDS for w in words) / max(1, len(words)),
        "code_chars": sum(c in _CODE_CHARS for c in par),
    }


def is_prose(par):
    """True for a paragraph of running English prose.

    Thresholds: at least 80 characters, at least 80% letters or spaces, at least 12 words, at least 12% of the words
    stop words, at most 2 + chars/200 of the characters ``\\ { } _`` (a stray one is fine, identifiers are not),
    and no dot leaders (five dots in a row: tables
    of contents). These keep sentences and drop code, tables, option lists and indexes from technical documentation.
    """
    s = prose_stats(par)
    if s["chars"] < 80 or s["words"] < 12:
        return False
    if s["letter_share"] < 0.8 or s["stop_ratio"] < 0.12:
        return False
    if s["code_chars"] > 2 + s["chars"] / 200:
        return False
    return not _DOT_LEADER.search(par)


def flat(par):
    """One paragraph on one line: every run of whitespace becomes one space."""
    return " ".join(par.split())


class Deduper:
    """Exact-paragraph de-duplication across the whole corpus: the first occurrence of a paragraph wins.

    Paragraphs are compared lower-cased with each run of whitespace collapsed to one space (a re-wrapped or
    re-capitalised copy is still a copy; an indented heading and a flush one stay distinct).
    Every paragraph is remembered, but one shorter than ``DEDUP_MIN_CHARS`` (a heading, "Chapter I", a table
    cell) is never dropped: such lines repeat by nature. Keeps 16-byte digests, so memory stays small.
    """

    def __init__(self):
        self._seen = set()

    def keep(self, par):
        key = hashlib.blake2b(_SPACES.sub(" ", par.lower()).encode("utf-8"), digest_size=16).digest()
        seen = key in self._seen
        self._seen.add(key)
        return not seen or len(par) < DEDUP_MIN_CHARS


def pieces(pars, limit, sep="\n\n"):
    """Join units with ``sep`` into pieces; a piece closes once it reaches ``limit`` characters.

    ``limit=None`` keeps one piece per document. Pieces shorter than ``MIN_PIECE`` are dropped.
    """
    out, cur, size = [], [], 0
    for par in pars:
        cur.append(par)
        size += len(par) + len(sep)  # every unit counts its separator, the last one's included
        if limit is not None and size >= limit:
            out.append(sep.join(cur))
            cur, size = [], 0
    if cur:
        out.append(sep.join(cur))
    return [p for p in out if len(p) >= MIN_PIECE]


def is_validation(piece):
    """The 2% hash split: a piece is validation when its SHA-256 (first 8 bytes, big-endian) mod 100 is below 2."""
    value = int.from_bytes(hashlib.sha256(piece.encode("utf-8")).digest()[:8], "big")
    return value % 100 < VAL_PERCENT
