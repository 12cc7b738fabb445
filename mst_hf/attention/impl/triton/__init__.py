"""The ``triton`` kernel: block-sparse flash attention for the HSA patterns (`launch` plans and launches it,
`kernels` holds the device code, imported only when the kernel first runs)."""

from .launch import LAUNCH, TRITON_PATTERNS, plan_parts, triton_attention, triton_available, triton_installed

__all__ = ["LAUNCH", "TRITON_PATTERNS", "plan_parts", "triton_attention", "triton_available", "triton_installed"]
