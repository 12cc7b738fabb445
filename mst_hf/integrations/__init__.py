"""Optional integrations with other libraries; the core never imports this package.

``peft``: LoRA on a sparse MST checkpoint and a merge that keeps the base sparsity (:func:`merge_lora_sparse`).
"""

from .peft import merge_lora_sparse, pruned_nonzeros

__all__ = ["merge_lora_sparse", "pruned_nonzeros"]
