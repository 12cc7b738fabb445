"""Mixed Sparsity Training (MST) for HuggingFace Transformers."""

from . import schedule
from .config import MST_CONFIG_NAME, PRESETS, MSTConfig
from .controller import MSTController
from .masks import MaskState
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
    "layer_sparsities",
    "schedule",
]
