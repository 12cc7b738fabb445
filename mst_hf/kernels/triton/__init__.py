"""Triton implementation of the block-sparse linear: ``device`` holds the kernels, ``launch`` calls them.

Nothing here imports triton at package import; ``launch`` imports ``device`` on first use.
"""
