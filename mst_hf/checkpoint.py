"""MST files next to a model or a Trainer checkpoint: masks (bit-packed), config, and controller state.

* ``mst_masks.safetensors``: for each target parameter ``name``, the packed bits under ``name`` and the shape under
  ``name.__shape__``; metadata holds the format version and a digest of the masks.
* ``mst_config.json``: the :class:`MSTConfig` fields plus ``saved_at_step`` and ``saved_in_phase``.
* ``mst_state.json``: the controller state (last update step, update history).
"""

import json
import os

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

MASKS_NAME = "mst_masks.safetensors"
STATE_NAME = "mst_state.json"
FORMAT_VERSION = "1"


def save_mst_files(output_dir: str, controller, step: int | None = None, phase: str | None = None,
                   extra_state: dict | None = None) -> None:
    """Write the three MST files of ``controller`` into ``output_dir``."""
    os.makedirs(output_dir, exist_ok=True)
    metadata = {"format": "mst_hf", "version": FORMAT_VERSION, "digest": controller.masks.digest()}
    save_file(controller.masks.state_dict(), os.path.join(output_dir, MASKS_NAME), metadata=metadata)
    controller.config.save_pretrained(output_dir, extra={"saved_at_step": step, "saved_in_phase": phase})
    state = controller.state_dict()
    state.update(extra_state or {})
    with open(os.path.join(output_dir, STATE_NAME), "w", encoding="utf-8") as f:
        json.dump(state, f, indent=2)


def load_masks_file(path: str) -> dict:
    """Read a mask file, refusing anything that is not a readable ``mst_hf`` mask file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No MST mask file at {path!r}.")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"MST mask file {path!r} is corrupt or not a safetensors file ({err}).") from err


def load_mst_files(checkpoint_dir: str, controller) -> dict:
    """Restore masks and controller state from ``checkpoint_dir``; returns the saved state dict.

    The masks are validated against the model (names and shapes) before anything is changed."""
    state_dict = load_masks_file(os.path.join(checkpoint_dir, MASKS_NAME))
    controller.masks.load_state_dict(state_dict)
    state = {}
    state_path = os.path.join(checkpoint_dir, STATE_NAME)
    if os.path.isfile(state_path):
        with open(state_path, encoding="utf-8") as f:
            state = json.load(f)
        controller.load_state_dict(state)
    return state
