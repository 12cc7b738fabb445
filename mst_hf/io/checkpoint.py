"""Resume: the MST files of a Trainer checkpoint, written with it, checked before anything is loaded, restored after.

Next to the Trainer's files a checkpoint holds:

* ``mst_masks.safetensors``: the masks (format in :mod:`mst_hf.io.formats`);
* ``mst_config.json``: the :class:`MSTConfig` fields plus ``saved_at_step`` (optimizer steps taken),
  ``total_steps``, ``saved_in_phase`` (phase of the last step trained) and ``hsa_active`` (whether the sparse
  attention pattern was on then: a model used for inference runs the pattern of the phase it was saved in);
* ``mst_state.json``: :meth:`MSTController.state_dict` (last update step, update history, FLOP totals), plus the
  digest of the masks it was saved with, ``saved_at_step``, the global ``sparsity`` and the latest logged
  ``metrics`` (FLOP reduction, eval loss), so the files of two different saves are never mixed.

Nothing else is needed to resume. The random growth draws from a generator that is a pure function of
``(seed, step, layer)``, so there is no RNG state to save; the Trainer itself saves the weights, the optimizer
moments, the LR schedule, its RNG states and the data position. :func:`check_mst_checkpoint` validates everything
(readable files, format, digest, names and shapes against the model, masks against the checkpoint's weights, state
paired with the masks) before anything is modified; :func:`restore_mst_checkpoint` applies it.
"""

import logging
import os
import re
from dataclasses import dataclass

from safetensors import safe_open
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .. import schedule
from ..config import MST_CONFIG_NAME, MSTConfig
from ..masks import check_shapes, unpack_mask
from .attach import invalidate_flops
from .formats import (
    MASKS_NAME,
    STATE_NAME,
    packed_digest,
    packed_shapes,
    read_json,
    read_mask_file,
    save_masks,
    write_json,
)

logger = logging.getLogger(__name__)

TRAINER_STATE_NAME = "trainer_state.json"
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


# ------------------------------------------------------------------------------------------------ saving
def saved_phase(step: int | None, total_steps: int | None, mst_config) -> dict:
    """``saved_at_step``, ``total_steps``, ``saved_in_phase`` and ``hsa_active`` for a save after ``step`` optimizer
    steps of a ``total_steps`` run (phase and HSA of the last step trained; ``None`` when the run length is unknown).
    """
    info = {"saved_at_step": step, "total_steps": total_steps or None, "saved_in_phase": None, "hsa_active": None}
    if step is not None and total_steps:
        last = min(max(step - 1, 0), total_steps - 1)
        info["saved_in_phase"] = schedule.phase(last, total_steps, mst_config)
        info["hsa_active"] = schedule.hsa_active(last, total_steps, mst_config)
    return info


def save_mst_files(output_dir: str, controller, step: int | None = None, total_steps: int | None = None,
                   metrics: dict | None = None) -> None:
    """Write ``mst_masks.safetensors``, ``mst_state.json`` and ``mst_config.json`` of ``controller`` into
    ``output_dir`` (``metrics``: latest logged values worth keeping, e.g. ``mst/flop_reduction``)."""
    save_masks(controller.masks, output_dir)
    info = saved_phase(step, total_steps, controller.config)
    state = controller.state_dict()
    state.update(masks_digest=controller.masks.digest(), saved_at_step=step, sparsity=controller.masks.sparsity(),
                 metrics=dict(metrics or {}))
    write_json(os.path.join(output_dir, STATE_NAME), state)
    data = controller.config.mst_dict()
    data.update(info)
    write_json(os.path.join(output_dir, MST_CONFIG_NAME), data)


def read_saved_info(directory: str) -> dict:
    """What a saved MST directory says about itself: ``mst_config.json`` (fields and save info) merged with the
    ``sparsity`` and ``metrics`` of ``mst_state.json``; ``{}`` when neither exists."""
    info = {}
    config_path, state_path = os.path.join(directory, MST_CONFIG_NAME), os.path.join(directory, STATE_NAME)
    if os.path.isfile(config_path):
        info.update(read_json(config_path))
    if os.path.isfile(state_path):
        state = read_json(state_path)
        info.update({k: state[k] for k in ("sparsity", "metrics", "flops") if k in state})
    return info


# ------------------------------------------------------------------------------------------------ checking
@dataclass
class MSTCheckpoint:
    """The validated MST content of a checkpoint, not yet applied (see :func:`check_mst_checkpoint`)."""

    path: str
    masks: dict  # packed state dict, names and shapes checked against the controller
    state: dict  # mst_state.json


def _weight_locations(checkpoint_dir: str) -> dict[str, str]:
    """Parameter name -> safetensors file holding it, for the checkpoint's (possibly sharded) weights."""
    single, index = (os.path.join(checkpoint_dir, n) for n in _WEIGHT_FILES)
    if os.path.isfile(index):
        weight_map = read_json(index).get("weight_map", {})
        return {k: os.path.join(checkpoint_dir, v) for k, v in weight_map.items()}
    if os.path.isfile(single):
        with safe_open(single, framework="pt") as f:
            return dict.fromkeys(f.keys(), single)
    return {}


def _check_weights_agree(checkpoint_dir: str, packed: dict, where: str) -> None:
    """Refuse masks that prune weights the checkpoint holds as non-zero (masks of another run of the same model)."""
    locations, shapes = _weight_locations(checkpoint_dir), packed_shapes(packed)
    by_file: dict[str, list[str]] = {}
    for name in (n for n in shapes if n in locations):
        by_file.setdefault(locations[name], []).append(name)
    for file, names in by_file.items():
        with safe_open(file, framework="pt") as f:
            check_shapes({n: shapes[n] for n in names}, {n: tuple(f.get_slice(n).get_shape()) for n in names},
                         f"{where} (against the weights of {os.path.basename(file)})")
            for name in names:  # one mask unpacked at a time: 1 byte per weight, briefly
                weight, mask = f.get_tensor(name), unpack_mask(packed[name], shapes[name])
                n_bad = int(((weight != 0) & ~mask).sum())
                if n_bad:
                    raise ValueError(
                        f"{where}: {n_bad} weights of `{name}` are non-zero in {os.path.basename(file)} where the "
                        "mask prunes them: the mask file belongs to another run. Restore the checkpoint's own "
                        f"{MASKS_NAME}."
                    )


def check_mst_checkpoint(checkpoint_dir: str, controller) -> MSTCheckpoint:
    """Read and validate the MST files of a checkpoint against ``controller``'s model; modifies nothing.

    Raises ``ValueError`` (``FileNotFoundError`` when the mask file is missing) naming the file and the problem."""
    checkpoint_dir = str(checkpoint_dir)
    masks_path = os.path.join(checkpoint_dir, MASKS_NAME)
    if not os.path.isfile(masks_path):
        raise FileNotFoundError(
            f"Checkpoint {checkpoint_dir!r} has no {MASKS_NAME}: it was not written by MSTTrainer (or the save was "
            "interrupted), so the sparse topology cannot be restored. Resume from a complete MSTTrainer checkpoint "
            "(mst_hf.last_complete_checkpoint(output_dir) finds one); to start MST from dense weights, load them "
            "with from_pretrained and train without `resume_from_checkpoint`."
        )
    packed = read_mask_file(masks_path)
    check_shapes(packed_shapes(packed), controller.masks.params, repr(masks_path))
    _check_weights_agree(checkpoint_dir, packed, repr(masks_path))

    state_path = os.path.join(checkpoint_dir, STATE_NAME)
    if not os.path.isfile(state_path):
        raise FileNotFoundError(f"Checkpoint {checkpoint_dir!r} has {MASKS_NAME} but no {STATE_NAME}; the save was "
                                "interrupted. Resume from an earlier checkpoint.")
    state = read_json(state_path)
    saved_digest = state.get("masks_digest")
    if saved_digest is not None and saved_digest != packed_digest(packed):
        raise ValueError(f"{state_path!r} was saved with other masks than {masks_path!r}: the files come from "
                         "different saves. Restore both from the same checkpoint.")
    trainer_state_path = os.path.join(checkpoint_dir, TRAINER_STATE_NAME)
    if os.path.isfile(trainer_state_path) and state.get("saved_at_step") is not None:
        global_step = read_json(trainer_state_path).get("global_step")
        if global_step != state["saved_at_step"]:
            raise ValueError(f"{state_path!r} was saved at step {state['saved_at_step']} but {TRAINER_STATE_NAME} "
                             f"is at step {global_step}: the files come from different saves.")
    _warn_config_changes(checkpoint_dir, controller.config)
    return MSTCheckpoint(checkpoint_dir, packed, state)


def _warn_config_changes(checkpoint_dir: str, mst_config) -> None:
    path = os.path.join(checkpoint_dir, MST_CONFIG_NAME)
    if not os.path.isfile(path) or not isinstance(mst_config, MSTConfig):
        return
    saved, current = read_json(path), mst_config.mst_dict()
    changed = sorted(k for k in current if k in saved and saved[k] != current[k])
    if changed:
        logger.warning("Resuming with an MST config that differs from the checkpoint's in %s: the schedule after the "
                       "resume follows the new values.", changed)


# ------------------------------------------------------------------------------------------------ restoring
def restore_mst_checkpoint(controller, checkpoint: MSTCheckpoint) -> None:
    """Apply a checkpoint validated by :func:`check_mst_checkpoint`: masks (replacing any initial random masks),
    controller state, and a reset of the attention cache so the next step re-applies the HSA on/off state."""
    controller.masks.load_state_dict(checkpoint.masks, apply=True)
    controller.load_state_dict(checkpoint.state)
    controller.hsa_on = None  # the model's attention state is not in the checkpoint's controller state
    invalidate_flops(controller)


def load_mst_files(checkpoint_dir: str, controller) -> dict:
    """Validate, then restore masks and controller state from ``checkpoint_dir``; returns the saved state dict.
    (For custom loops; ``MSTTrainer`` validates before the Trainer loads the weights and restores after.)"""
    checkpoint = check_mst_checkpoint(checkpoint_dir, controller)
    restore_mst_checkpoint(controller, checkpoint)
    return checkpoint.state


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest ``checkpoint-N`` folder of ``output_dir`` whose save finished (Trainer writes
    ``trainer_state.json`` last) and that holds the MST files; ``None`` if there is none. Use it instead of
    ``resume_from_checkpoint=True`` after a crash: that picks the newest folder (``get_last_checkpoint``) even if
    its save was cut short."""
    if not os.path.isdir(output_dir):
        return None
    found = []
    for name in os.listdir(output_dir):
        match = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", name)
        path = os.path.join(output_dir, name)
        if match and all(os.path.isfile(os.path.join(path, f)) for f in (TRAINER_STATE_NAME, MASKS_NAME, STATE_NAME)):
            found.append((int(match.group(1)), path))
    return max(found)[1] if found else None
