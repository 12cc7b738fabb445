"""A small reader for compressed SWORD Bible and commentary modules (zText / zCom / zCom4), and their extractors.

Format (from the SWORD project's public module documentation): each testament (``ot``, ``nt``) has three files.
``?.Xzs`` is the block index, 12 bytes per block: little-endian uint32 offset and compressed size in ``?.Xzz``, and
uint32 uncompressed size; each block is zlib-compressed (``CompressType=ZIP``). ``?.Xzv`` is the entry index, one
record per verse slot in versification order: uint32 block number, uint32 offset inside the uncompressed block, and
the entry size, a uint16 for zText/zCom (10-byte records) or a uint32 for the "4" drivers (12-byte records). ``X``
is ``b`` for one block per book and ``c`` for one block per chapter. Entries are OSIS/ThML markup, turned into text
here by dropping tags (line-level elements become line breaks) and decoding entities.
"""

import glob
import html
import os
import re
import struct
import zlib


def read_testament(folder, testament):
    """The (block number, entry text) pairs of one testament, in verse order; empty and repeated slots skipped."""
    found = glob.glob(os.path.join(folder, f"{testament}.?zs"))
    if not found:
        return []
    kind = found[0][-3]
    with open(os.path.join(folder, f"{testament}.{kind}zs"), "rb") as f:
        raw_blocks = f.read()
    with open(os.path.join(folder, f"{testament}.{kind}zz"), "rb") as f:
        data = f.read()
    with open(os.path.join(folder, f"{testament}.{kind}zv"), "rb") as f:
        verse_index = f.read()
    blocks = {}

    def block(number):
        if number not in blocks:
            offset, size, _ = struct.unpack_from("<III", raw_blocks, number * 12)
            blocks[number] = zlib.decompress(data[offset : offset + size])
        return blocks[number]

    n_blocks = len(raw_blocks) // 12
    # 10-byte records (uint16 size) or 12-byte ones (uint32 size): the file length tells which divides it evenly
    # into plausible records; the 4-byte drivers are tried first when both divide it.
    record = 12 if len(verse_index) % 12 == 0 and _plausible(verse_index, 12, n_blocks) else 10
    fmt = "<III" if record == 12 else "<IIH"
    out, seen = [], set()
    for pos in range(0, len(verse_index) - record + 1, record):
        number, offset, size = struct.unpack_from(fmt, verse_index, pos)
        if size == 0 or number >= n_blocks or (number, offset, size) in seen:
            continue  # empty slot, or a verse of a range pointing at the range's shared text
        seen.add((number, offset, size))
        text = block(number)[offset : offset + size].decode("utf-8", errors="replace")
        out.append((number, text))
    return out


def _plausible(index, record, n_blocks):
    fmt = "<III" if record == 12 else "<IIH"
    for pos in range(0, min(len(index), record * 2000) - record + 1, record):
        number, _, size = struct.unpack_from(fmt, index, pos)
        if number >= n_blocks and size:
            return False
    return True


_NOTES = re.compile(r"<note\b[^>]*>.*?</note>", re.S | re.I)
_LINE_TAGS = re.compile(r"</?(?:title|div|lb|br|p|l|lg|list|chapter)\b[^>]*>", re.I)
_TAGS = re.compile(r"<[^>]*>")
_SPACE_BEFORE_PUNCT = re.compile(r" ([.,;:!?)\]”’])|([(\[“‘]) ")


def markup_to_text(entry):
    """OSIS/ThML to text: notes and tags become a space, line-level tags a line break, entities are decoded.

    Spaces are then collapsed, and a space a removed tag left before punctuation or a closing bracket or quote
    (or after an opening one) is taken out.
    """
    text = _LINE_TAGS.sub("\n", _NOTES.sub(" ", entry))
    text = html.unescape(_TAGS.sub(" ", text)).replace("\xa0", " ")
    lines = [_SPACE_BEFORE_PUNCT.sub(r"\1\2", " ".join(line.split())) for line in text.split("\n")]
    return "\n".join(line for line in lines if line)


def module_folder(root):
    found = glob.glob(os.path.join(root, "usr/share/sword/modules/*/*/*/"))
    if len(found) != 1:
        raise ValueError(f"expected one SWORD module under {root}, found {found}")
    return found[0]


def _blocks(root):
    """Per testament and block: the block's entries joined by spaces, as text (line breaks from the markup)."""
    folder = module_folder(root)
    for testament in ("nt", "ot"):
        current, parts = None, []
        for number, entry in read_testament(folder, testament):
            if number != current and parts:
                yield markup_to_text(" ".join(parts))
                parts = []
            current = number
            parts.append(entry)
        if parts:
            yield markup_to_text(" ".join(parts))


def books(root):
    """One unit per block (a book, for BlockType=BOOK modules), the units of both testaments one document."""
    yield [text for text in _blocks(root) if text], "\n\n"


def chapters(root):
    """One document per block (a chapter, for BlockType=CHAPTER modules such as the Treasury of David); its lines
    are the records."""
    for text in _blocks(root):
        if text:
            yield text.split("\n"), "\n"
