"""Block-sparse linear layers: the dense masked reference, Triton kernels that touch only active blocks, autograd
ops that work under ``torch.compile`` and autocast, and the per-layer switch between block and dense kernels.

Importing this package registers the ``mst_hf::block_sparse_linear`` ops; triton itself is imported only when a
kernel first runs. Nothing here imports the controller or the trainer.
"""

from .dispatch import (
    block_sparse_layout,
    break_even_density,
    choose_kernel,
    disable_block_sparse,
    enable_block_sparse,
    load_table,
    set_kernels,
)
from .layout import BLOCK_SIZES, BlockLayout, block_mask_from_weight, build_index
from .ops import block_sparse_linear
from .reference import expand_block_mask, reference_grads, reference_linear

__all__ = [
    "BLOCK_SIZES",
    "BlockLayout",
    "block_mask_from_weight",
    "block_sparse_layout",
    "block_sparse_linear",
    "break_even_density",
    "build_index",
    "choose_kernel",
    "disable_block_sparse",
    "enable_block_sparse",
    "expand_block_mask",
    "load_table",
    "reference_grads",
    "reference_linear",
    "set_kernels",
]
