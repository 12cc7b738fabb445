"""HSA implementations on a plain causal sequence: `reference` (the oracle), `sdpa`, `flex` and `triton`.

Each computes ``(B, H, T, D)`` attention under an `HSASpec`'s pattern. They share `common` (mask caches, masked
math) and never import each other; `mst_hf.attention.dispatch` chooses among them.
"""
