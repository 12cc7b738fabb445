"""Mixed Sparsity Training (MST) for HuggingFace Transformers."""

from . import attention, schedule  # importing attention registers the "mst_hsa" implementation
from .attention import configure_hsa, get_hsa_state, set_hsa_active
from .config import MST_CONFIG_NAME, PRESETS, MSTConfig
from .controller import MSTController
from .flops import FlopMeter, model_flop_shapes
from .integrations.peft import merge_lora_sparse, pruned_nonzeros
from .io import last_complete_checkpoint, load_masks, load_sparse, push_sparse_to_hub, save_masks, save_sparse
from .masks import MaskState
from .targets import find_targets, layer_sparsities
from .trainer import MSTTrainer

__version__ = "0.1.0"


def __getattr__(name):
    # `plan_run` is imported on first use: importing mst_hf.plan here would put it in sys.modules before
    # `python -m mst_hf.plan` runs it as __main__, and runpy warns about that on every call.
    if name == "plan_run":
        from .plan import plan_run

        return plan_run
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "FlopMeter",
    "MSTConfig",
    "MSTController",
    "MSTTrainer",
    "MST_CONFIG_NAME",
    "MaskState",
    "PRESETS",
    "attention",
    "configure_hsa",
    "find_targets",
    "get_hsa_state",
    "last_complete_checkpoint",
    "layer_sparsities",
    "load_masks",
    "load_sparse",
    "merge_lora_sparse",
    "model_flop_shapes",
    "plan_run",
    "pruned_nonzeros",
    "push_sparse_to_hub",
    "save_masks",
    "save_sparse",
    "schedule",
    "set_hsa_active",
]
