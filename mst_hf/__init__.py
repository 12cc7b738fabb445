"""Mixed Sparsity Training (MST) for HuggingFace Transformers."""

from . import schedule
from .checkpoint import last_complete_checkpoint, load_masks, save_masks
from .config import MST_CONFIG_NAME, PRESETS, MSTConfig
from .controller import MSTController
from .hub import load_sparse, push_sparse_to_hub, save_sparse
from .masks import MaskState
from .peft_utils import merge_lora_sparse, pruned_nonzeros
from .targets import find_targets, layer_sparsities
from .trainer import MSTTrainer

try:  # registers the "mst_hsa" attention implementation
    from . import attention as _attention  # noqa: F401
except ImportError:  # pragma: no cover - attention module not available
    _attention = None

__version__ = "0.1.0"

__all__ = [
    "MST_CONFIG_NAME",
    "MSTConfig",
    "MSTController",
    "MSTTrainer",
    "MaskState",
    "PRESETS",
    "find_targets",
    "last_complete_checkpoint",
    "layer_sparsities",
    "load_masks",
    "load_sparse",
    "merge_lora_sparse",
    "pruned_nonzeros",
    "push_sparse_to_hub",
    "save_masks",
    "save_sparse",
    "schedule",
]
