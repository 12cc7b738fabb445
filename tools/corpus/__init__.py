"""The study-corpus builder behind ``bench/prepare_corpus.py``: pins, fetching, extractors, cleaning."""
