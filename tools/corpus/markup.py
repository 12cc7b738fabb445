"""Markup to plain text: HTML and roff (man pages). reStructuredText, POD, AsciiDoc and Vim help are read as they
are: the prose filter drops their directive, code and table paragraphs, and their inline markup is light.

Both converters mark paragraph boundaries with a blank line, so ``clean.paragraphs`` can split their output.
"""

import re
from html.parser import HTMLParser

_BLOCK = frozenset(
    "address article aside blockquote body br caption dd details div dl dt fieldset figcaption figure footer form "
    "h1 h2 h3 h4 h5 h6 header hr li main nav ol p pre section summary table tbody td tfoot th thead tr ul".split()
)
_SKIP = frozenset("script style head title noscript svg math".split())


class _TextParser(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts, self.skip = [], 0

    def handle_starttag(self, tag, attrs):
        if tag in _SKIP:
            self.skip += 1
        elif tag in _BLOCK:
            self.parts.append("\n\n")

    def handle_endtag(self, tag):
        if tag in _SKIP:
            self.skip = max(0, self.skip - 1)
        elif tag in _BLOCK:
            self.parts.append("\n\n")

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data)


def html_to_text(markup):
    """Visible text of an HTML page; block-level elements become paragraph breaks, scripts and styles go."""
    parser = _TextParser()
    parser.feed(markup)
    parser.close()
    return "".join(parser.parts)


_ROFF_BREAK = re.compile(r"^\.(?:SH|SS|PP|LP|P|TP|IP|HP|sp|br|RS|RE|nf|fi|EX|EE|TH|in)\b\s*(.*)$")
_ROFF_FONT_MACRO = re.compile(r"^\.(B|I|BI|BR|IB|IR|RB|RI|SM|SB|UR|MT)\b\s*(.*)$")
_ROFF_ARG = re.compile(r'"((?:[^"]|"")*)"|(\S+)')
_ROFF_ESCAPE = re.compile(r"\\f(?:\[[^\]]*\]|\(..|.)|\\s[+-]?\d|\\\*(?:\(..|\[[^\]]*\]|.)|\\[&|^%]")
_ROFF_SPECIAL = {
    "\\-": "-",
    "\\(em": "\u2014",
    "\\(en": "\u2013",
    "\\(aq": "'",
    "\\(dq": '"',
    "\\(lq": "\u201c",
    "\\(rq": "\u201d",
    "\\(bu": "\u2022",
    "\\e": "\\",
    "\\ ": " ",
    "\\~": " ",
    "\\(cq": "'",
    "\\(oq": "'",
}


def _roff_inline(line):
    for escape, char in _ROFF_SPECIAL.items():
        line = line.replace(escape, char)
    return _ROFF_ESCAPE.sub("", line)


def roff_to_text(source):
    """Text of a man page: section and paragraph macros break paragraphs (a heading starts the next paragraph),
    font macros keep their words (alternating-font macros such as .BR join them), other requests and comments are
    dropped, escapes resolved."""
    out = []
    for line in source.split("\n"):
        if line.startswith(('.\\"', "'\\\"", '\\"')):
            continue
        broken = _ROFF_BREAK.match(line)
        if broken:
            out.append("\n\n")
            if line.startswith((".SH", ".SS")) and broken.group(1):
                out.append(_roff_inline(broken.group(1).replace('"', "")) + "\n")
            continue
        font = _ROFF_FONT_MACRO.match(line)
        if font:
            args = [bare or quoted for quoted, bare in _ROFF_ARG.findall(font.group(2))]
            # alternating-font macros (.BR, .IR, ...) set their arguments side by side; .B/.I keep the spaces
            joiner = "" if len(font.group(1)) == 2 and font.group(1) not in ("SM", "SB", "UR", "MT") else " "
            out.append(_roff_inline(joiner.join(a for a in args if a)) + "\n")
        elif line.startswith((".", "'")):
            continue
        else:
            out.append(_roff_inline(line) + "\n")
    return "".join(out)
