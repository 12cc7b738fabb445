"""A small reader for R's lazy-load data files (``Rdata.rdx``/``Rdata.rdb``) and the janeaustenr extractor.

Format (from R's documented serialization, "R Internals", section 1.8): every object in
``Rdata.rdb`` is a 4-byte big-endian length followed by a zlib stream holding one serialized object (the index,
``Rdata.rdx``, is the same object as a gzip file). The
serialization used here is XDR (big-endian): ``X\\n``, format version, two R versions (and, for version 3, the
native encoding), then objects, each a 32-bit flags word (type in the low 8 bits, bit 9: has attributes, bit 10:
has a tag) and its payload. The index is a list whose ``variables`` element maps each object name to an
(offset, length) pair into ``Rdata.rdb``. Only the types these data files use are read.
"""

import gzip
import os
import struct
import zlib

from .clean import paragraphs

NILVALUE, REF, GLOBALENV, EMPTYENV, BASEENV, MISSINGARG, BASENAMESPACE = 254, 255, 253, 242, 241, 251, 247
SYM, LIST, CHAR, LGL, INT, REAL, STR, VEC = 1, 2, 9, 10, 13, 14, 16, 19


class _Reader:
    def __init__(self, data):
        self.data, self.pos, self.refs = data, 0, []

    def int(self):
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def header(self):
        if self.data[:2] != b"X\n":
            raise ValueError("not an XDR-serialized R object (expected the 'X\\n' header)")
        self.pos = 2
        version = self.int()
        self.int(), self.int()
        if version == 3:
            length = self.int()
            self.pos += length

    def item(self):
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind in (NILVALUE, GLOBALENV, EMPTYENV, BASEENV, MISSINGARG, BASENAMESPACE):
            return None
        if kind == REF:
            return self.refs[(flags >> 8) - 1]
        if kind == SYM:
            name = self.item()
            self.refs.append(name)
            return name
        if kind == LIST:
            attrs = self.item() if has_attr else None
            out = {}
            while True:
                tag = self.item() if has_tag else None
                out[tag if tag is not None else len(out)] = self.item()
                flags = self.int()
                if flags & 0xFF != LIST:
                    self.pos -= 4
                    self.item()  # the terminating NULL
                    return out
                has_attr, has_tag = flags & (1 << 9), flags & (1 << 10)
                if has_attr:
                    self.item()
        if kind == CHAR:
            length = self.int()
            if length == -1:
                return None
            text = self.data[self.pos : self.pos + length].decode("utf-8", errors="replace")
            self.pos += length
            return text
        if kind in (STR, VEC):
            n = self.int()
            value = [self.item() for _ in range(n)]
        elif kind in (LGL, INT):
            n = self.int()
            value = list(struct.unpack_from(f">{n}i", self.data, self.pos))
            self.pos += 4 * n
        elif kind == REAL:
            n = self.int()
            value = list(struct.unpack_from(f">{n}d", self.data, self.pos))
            self.pos += 8 * n
        else:
            raise NotImplementedError(f"R serialization type {kind} is not supported by this reader")
        if has_attr:
            attrs = self.item()
            if isinstance(attrs, dict) and kind == VEC and "names" in attrs:
                return dict(zip(attrs["names"], value))
        return value


def unserialize(blob):
    """One lazy-load record (4-byte length + zlib stream) or a gzip file (the index) to Python values."""
    data = gzip.decompress(blob) if blob[:2] == b"\x1f\x8b" else zlib.decompress(blob[4:])
    reader = _Reader(data)
    reader.header()
    return reader.item()


def read_lazyload(stem):
    """All objects of the lazy-load database ``stem``.rdx/.rdb as a dict name -> value."""
    with open(stem + ".rdx", "rb") as f:
        index = unserialize(f.read())
    with open(stem + ".rdb", "rb") as f:
        db = f.read()
    out = {}
    for name, (offset, length) in index["variables"].items():
        out[name] = unserialize(db[int(offset) : int(offset) + int(length)])
    return out


def janeausten(root):
    """Jane Austen's six novels from janeaustenr's data: one document per novel, its lines joined."""
    folder = os.path.join(root, "usr/lib/R/site-library/janeaustenr/data/Rdata")
    for _name, lines in sorted(read_lazyload(folder).items()):
        if isinstance(lines, list) and lines and all(isinstance(x, str) or x is None for x in lines):
            yield paragraphs("\n".join(x or "" for x in lines)), "\n\n"
