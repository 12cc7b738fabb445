"""Tier C: technical documentation. Each source is a set of file patterns inside its unpacked archive and a
format; every file is one document whose paragraphs are flattened to one line each (the builder then keeps only the
prose paragraphs). The kernel's ``Documentation/`` is read straight out of the source tarball in the package.
"""

import glob
import gzip
import os
import tarfile

from .clean import flat, paragraphs
from .markup import html_to_text, roff_to_text

# key: (format, patterns relative to the unpacked root, path fragments to leave out)
SOURCES = {
    "python-doc": ("raw", ["usr/share/doc/python3.11/html/_sources/**/*.txt"], []),
    "perl-doc": ("raw", ["usr/share/perl/5.36.0/pod/*.pod"], []),
    "manpages": ("roff", ["usr/share/man/man*/*.gz"], []),
    "manpages-dev": ("roff", ["usr/share/man/man*/*.gz"], []),
    "vim-help": ("raw", ["usr/share/vim/vim90/doc/*.txt"], []),
    "git-doc": ("raw", ["usr/share/doc/git-doc/**/*.txt"], []),
    "openjdk-doc": ("html", ["usr/share/doc/openjdk-17-jre-headless/api/**/*.html"], ["/class-use/", "-tree.html"]),
    "rust-books": (
        "html",
        ["usr/share/doc/rust-doc/html/*/**/*.html"],
        ["/std/", "/core/", "/alloc/", "/proc_macro/", "/test/", "/src/"],
    ),
    "rust-std": ("html", ["usr/share/doc/rust-doc/html/std/**/*.html"], []),
    "qt5-doc": ("html", ["usr/share/qt5/doc/**/*.html"], []),
    "erlang-doc": ("html", ["usr/share/doc/erlang-doc/**/*.html"], []),
    "postgresql-doc": ("html", ["usr/share/doc/postgresql-doc-15/html/*.html"], []),
    "django-doc": ("html", ["usr/share/doc/python-django-doc/html/**/*.html"], []),
    "libreoffice-help": ("html", ["usr/share/libreoffice/help/en-US/**/*.html"], []),
    "apache2-doc": ("html", ["usr/share/doc/apache2-doc/manual/en/**/*.html"], []),
    "octave-doc": ("html", ["usr/share/doc/octave/octave.html/*.html"], []),
    "r-doc": ("html", ["usr/share/R/doc/manual/*.html"], []),
    "gimp-help": ("html", ["usr/share/gimp/2.0/help/en/*.html"], []),
    "debian-handbook": ("html", ["usr/share/doc/debian-handbook/html/en-US/*.html"], []),
    "debian-policy": ("raw", ["usr/share/doc/debian-policy/*.txt.gz"], []),
    "debian-reference": ("html", ["usr/share/debian-reference/*.html"], []),
    "developers-reference": ("raw", ["usr/share/developers-reference/_sources/*.txt"], []),
    "bash-doc": ("html", ["usr/share/doc/bash/*.html"], []),
}

_CONVERT = {"raw": lambda text: text, "html": html_to_text, "roff": roff_to_text}


def _read(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        return f.read().decode("utf-8", errors="replace")


def _document(text, fmt):
    pars = [flat(p) for p in paragraphs(_CONVERT[fmt](text))]
    return [p for p in pars if p], "\n\n"


def files(root, patterns, exclude):
    """The files matching ``patterns`` under ``root``, sorted, without those whose path contains an ``exclude``."""
    found = set()
    for pattern in patterns:
        found.update(p for p in glob.glob(os.path.join(root, pattern), recursive=True) if os.path.isfile(p))
    return sorted(p for p in found if not any(x in p for x in exclude))


def extractor(key):
    """The extractor of technical-docs source ``key`` (a function of the unpacked root)."""
    fmt, patterns, exclude = SOURCES[key]

    def extract(root):
        for path in files(root, patterns, exclude):
            yield _document(_read(path), fmt)

    extract.__name__ = f"extract_{key.replace('-', '_')}"
    return extract


def kernel_doc(root):
    """The kernel's ``Documentation/`` tree (reStructuredText and text files), read from the source tarball."""
    found = glob.glob(os.path.join(root, "usr/src/linux-source-*.tar.*"))
    if not found:
        raise ValueError(f"no linux-source tarball under {root}/usr/src")
    with tarfile.open(found[0]) as tar:
        for member in tar:
            name = member.name
            if member.isfile() and "/Documentation/" in name and name.endswith((".rst", ".txt")):
                data = tar.extractfile(member).read().decode("utf-8", errors="replace")
                yield _document(data, "raw")
