"""Files of an MST run: the two formats, resuming a Trainer checkpoint, and what goes to the Hub.

``files`` (atomic, reproducible writes; regular files only) <- ``formats`` (mask file and compact file: write, read,
validate) <- ``records`` (``mst_config.json`` and ``mst_state.json``, validated) <- ``attach`` (saved masks onto live
models) <- ``checkpoint`` (resume: everything checked before anything is loaded) <- ``hub`` (compact save/load of a
model, model card, push). Nothing here imports the trainer.
"""

from .attach import load_masks
from .checkpoint import (
    TRAINER_STATE_NAME,
    check_mst_checkpoint,
    last_complete_checkpoint,
    load_mst_files,
    restore_mst_checkpoint,
    save_mst_files,
)
from .formats import MASKS_NAME, SPARSE_NAME, STATE_NAME, read_mask_file, read_sparse, save_masks
from .hub import MST_TAGS, load_sparse, push_sparse_to_hub, save_sparse, write_model_card

__all__ = [
    "MASKS_NAME",
    "MST_TAGS",
    "SPARSE_NAME",
    "STATE_NAME",
    "TRAINER_STATE_NAME",
    "check_mst_checkpoint",
    "last_complete_checkpoint",
    "load_masks",
    "load_mst_files",
    "load_sparse",
    "push_sparse_to_hub",
    "read_mask_file",
    "read_sparse",
    "restore_mst_checkpoint",
    "save_masks",
    "save_mst_files",
    "save_sparse",
    "write_model_card",
]
