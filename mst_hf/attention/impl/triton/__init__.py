"""The ``triton`` kernel: block-sparse flash attention for the HSA patterns (`launch` plans and launches it and
counts the tiles it visits, `kernels` holds the device code, imported only when the kernel first runs)."""

from .launch import (
    LAUNCH,
    TRITON_PATTERNS,
    plan_parts,
    triton_attention,
    triton_available,
    triton_installed,
    triton_tile_pairs,
)

__all__ = [
    "LAUNCH",
    "TRITON_PATTERNS",
    "plan_parts",
    "triton_attention",
    "triton_available",
    "triton_installed",
    "triton_tile_pairs",
]
