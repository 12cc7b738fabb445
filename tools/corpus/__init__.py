"""The study-corpus builder behind ``tools/corpus/prepare_corpus.py``: pins, fetching, extractors, cleaning."""
