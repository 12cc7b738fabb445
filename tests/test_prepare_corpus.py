"""Unit tests of the corpus builder's pure pieces (no network, no archives): cleaning, de-duplication, pieces, the
hash split, the markup strippers and the small binary-format readers, on inline inputs."""

import hashlib
import os
import struct
import sys
import zlib

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))

from corpus import clean, dicts, markup, prose, rdata, sword  # noqa: E402
from corpus.sources import PINS, REFERENCE  # noqa: E402

PROSE = (
    "The quick brown fox jumps over the lazy dog, and then it runs into the forest where it is hidden from all of "
    "the hunters who are looking for it."
)


def test_paragraphs_split_on_blank_lines_and_keep_indentation():
    text = "  Title\r\n\r\nfirst line   \nsecond line\n \t\n\n    indented para\n"
    assert clean.paragraphs(text) == ["Title", "first line\nsecond line", "    indented para"]


@pytest.mark.parametrize(
    "par, expected",
    [
        (PROSE, True),
        (PROSE[:70], False),  # under 80 characters
        ("def f(x): return {k_v: x[k_v] for k_v in x} " * 3, False),  # code characters
        ("Introduction " + "." * 40 + " 12 and more words here to pass the count of the words ok", False),
        ("Xylophone zebra quokka " * 6, False),  # no stop words
        ("1234 5678 9012 3456 7890 " * 6 + "the a of", False),  # too few letters
    ],
)
def test_is_prose(par, expected):
    assert clean.is_prose(par) is expected


def test_is_prose_allows_a_stray_code_character_but_not_identifiers():
    assert clean.is_prose(PROSE + " It uses the file_name.")
    assert not clean.is_prose(PROSE.replace(" ", "_", 6))


def test_deduper_drops_second_copy_ignoring_case_and_wrapping_but_keeps_short_lines():
    dd = clean.Deduper()
    assert dd.keep(PROSE)
    assert not dd.keep(PROSE.upper().replace(" ", "\n", 3))
    assert dd.keep("Chapter I") and dd.keep("Chapter I")  # short paragraphs always stay


def test_deduper_keeps_indented_and_flush_headings_apart():
    dd = clean.Deduper()
    heading = "A heading that is long enough to be de-duplicated ok"
    assert dd.keep("   " + heading)
    assert dd.keep(heading)
    assert not dd.keep("         " + heading)


def test_pieces_close_at_the_limit_counting_every_separator():
    units = ["a" * 48, "b" * 48, "c" * 48]
    # 48 + 2 = 50 reaches the limit after one unit; each unit is then its own piece (all >= MIN_PIECE? no: dropped)
    assert clean.pieces(units, 50) == []
    long_units = ["x" * 150, "y" * 150, "z" * 150]
    got = clean.pieces(long_units, 300)
    assert got == ["x" * 150 + "\n\n" + "y" * 150]  # 152 + 152 >= 300 closes; "z" alone is under 200 chars
    assert clean.pieces(long_units, None, sep="\n") == ["\n".join(long_units)]


def test_is_validation_is_the_sha256_rule():
    texts = [f"piece number {i}" for i in range(300)]
    expected = [int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "big") % 100 < 2 for t in texts]
    assert [clean.is_validation(t) for t in texts] == expected
    assert 0 < sum(expected) < 20


def test_html_to_text_breaks_blocks_and_drops_scripts():
    page = (
        "<html><head><title>T</title><script>var x=1;</script></head><body><p>One <b>bold</b> word.</p>"
        "<ul><li>item</li></ul></body></html>"
    )
    assert clean.paragraphs(markup.html_to_text(page)) == ["One bold word.", "item"]


def test_roff_to_text_keeps_headings_with_their_paragraph():
    page = (
        '.\\" comment\n.TH LS 1\n.SH NAME\nls \\- list\n.SH DESCRIPTION\nList \\fBfiles\\fR in\n.I dir\n.PP\nMore.\n'
    )
    pars = [clean.flat(p) for p in clean.paragraphs(markup.roff_to_text(page))]
    assert pars == ["NAME ls - list", "DESCRIPTION List files in dir", "More."]


def test_roff_alternating_font_macros_join_their_arguments():
    text = markup.roff_to_text('.SH SEE ALSO\n.BR epoll_wait (2),\n.B "two words" x\n')
    assert clean.flat(text) == "SEE ALSO epoll_wait(2), two words x"


def test_brown_sentence_removes_tags_and_attaches_punctuation():
    line = "\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ,/, he/pps said/vbd ./."
    assert prose.brown_sentence(line) == 'The jury said " no evidence ", he said.'


def test_dictd_number_and_entry_cleaners():
    assert dicts.dictd_number("A") == 0 and dicts.dictd_number("BA") == 64 and dicts.dictd_number("5I") == 57 * 64 + 8
    gcide = 'Absolute \\Ab"so*lute\\, n. (Geom.)\n   In a {plane}, the two\n   points. [R.]\n   [1913 Webster]\n'
    assert dicts.gcide_entry(gcide) == "Absolute, n. (Geom.) In a plane, the two points. R"
    wn = "hood\n    n 1: (slang) a neighborhood [syn: {nbhd}]\n"
    assert dicts.wordnet_entry(wn) == "hood: n 1: (slang) a neighborhood"
    foldoc = "adjacency\nadjacent\n\n   <networking> A {relationship}.\n\n   (1998-03-10)\n"
    assert dicts.foldoc_entry(foldoc) == "adjacent (networking) A relationship. (1998-03-10)"


def test_sword_markup_to_text():
    entry = (
        '<title type="main">Matthew</title> <w lemma="x">Jesus</w> <w>Christ</w>,<note>a note</note><w>the</w> son.'
    )
    assert sword.markup_to_text(entry) == "Matthew\nJesus Christ, the son."


def _sword_module(folder, entries, record=10):
    """A one-block zText testament holding ``entries`` (verse slots; None = empty)."""
    texts = [e.encode() if e else b"" for e in entries]
    block = b"".join(texts)
    packed = zlib.compress(block)
    with open(os.path.join(folder, "nt.bzz"), "wb") as f:
        f.write(packed)
    with open(os.path.join(folder, "nt.bzs"), "wb") as f:
        f.write(struct.pack("<III", 0, len(packed), len(block)))
    fmt = "<III" if record == 12 else "<IIH"
    with open(os.path.join(folder, "nt.bzv"), "wb") as f:
        pos = 0
        for t in texts:
            f.write(struct.pack(fmt, 0, pos, len(t)))
            pos += len(t)


@pytest.mark.parametrize("record", [10, 12])
def test_sword_reader_reads_entries_in_order(tmp_path, record):
    _sword_module(str(tmp_path), ["In the beginning", None, "was the Word"], record)
    assert [t for _, t in sword.read_testament(str(tmp_path), "nt")] == ["In the beginning", "was the Word"]


def _xdr_string_vector(values):
    out = struct.pack(">i", 16) + struct.pack(">i", len(values))
    for v in values:
        raw = v.encode()
        out += struct.pack(">i", 9 | (1 << 15)) + struct.pack(">i", len(raw)) + raw  # CHARSXP, UTF-8 flag
    return out


def test_rdata_unserializes_a_character_vector():
    header = b"X\n" + struct.pack(">iii", 3, 0x40201, 0x30500) + struct.pack(">i", 5) + b"UTF-8"
    blob = zlib.compress(header + _xdr_string_vector(["EMMA", "", "By Jane Austen"]))
    assert rdata.unserialize(struct.pack(">i", len(blob)) + blob) == ["EMMA", "", "By Jane Austen"]


def test_pins_and_reference_cover_the_same_sources():
    assert [p.key for p in PINS] == [k for k in REFERENCE if k != "_total"]
    assert sum(REFERENCE[p.key][2] for p in PINS) == REFERENCE["_total"][2] == 51189119
    assert all(len(p.sha256) == 64 for p in PINS)
