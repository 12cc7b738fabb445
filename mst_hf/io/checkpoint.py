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

import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field

from safetensors import safe_open
from transformers.trainer import OPTIMIZER_NAME, OPTIMIZER_NAME_BIN, SCHEDULER_NAME, TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import (
    CONFIG_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    logging,
)

from .. import schedule
from ..attention.interface import HSA_NAME, validate_hsa_state
from ..config import MST_CONFIG_NAME, MSTConfig
from ..masks import check_shapes, unpack_mask
from .attach import invalidate_flops
from .files import check_regular_file, read_json, write_json
from .formats import MASKS_NAME, STATE_NAME, packed_digest, packed_shapes, read_mask_file, save_masks
from .records import mst_config_fields, read_mst_config, read_mst_state

logger = logging.get_logger(__name__)

_WEIGHT_FILES = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)
_FSDP_WEIGHTS = "pytorch_model_fsdp"  # Trainer's FSDP checkpoints: a file or folder whose name starts with it


def _has_weights(checkpoint_dir: str) -> bool:
    """Whether the checkpoint holds model weights in a form Trainer loads (plain, sharded or FSDP)."""
    if any(os.path.isfile(os.path.join(checkpoint_dir, n)) for n in _WEIGHT_FILES):
        return True
    return any(name.startswith(_FSDP_WEIGHTS) for name in os.listdir(checkpoint_dir))


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


def weights_info(checkpoint: "MSTCheckpoint", trained_to_step: int | None) -> dict:
    """The save information of a model whose weights and masks were loaded back from ``checkpoint``
    (``load_best_model_at_end``) by a run that trained on to ``trained_to_step``: the checkpoint's step, run length,
    phase and attention state (what the weights were trained with), plus ``trained_to_step``."""
    info = {k: checkpoint.config.get(k) for k in ("saved_at_step", "total_steps", "saved_in_phase", "hsa_active")}
    info["saved_at_step"] = checkpoint.state.get("saved_at_step", info["saved_at_step"])
    return {**info, "trained_to_step": trained_to_step}


def saved_attention(directory: str) -> dict | None:
    """The attention state a saved model was trained with: ``mst_hsa`` of its ``config.json`` (validated), or
    ``None`` when it has none."""
    path = os.path.join(directory, CONFIG_NAME)
    state = read_json(path).get(HSA_NAME) if os.path.isfile(path) else None
    if state is None:
        return None
    try:
        return validate_hsa_state(dict(state))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path!r}: `{HSA_NAME}` is invalid ({err}). Restore the file from the same save.") from None


def save_mst_files(output_dir: str, controller, step: int | None = None, total_steps: int | None = None,
                   metrics: dict | None = None, write: bool = True, weights_from=None) -> None:
    """Write ``mst_masks.safetensors``, ``mst_state.json`` and ``mst_config.json`` of ``controller`` into
    ``output_dir`` (``metrics``: latest logged values worth keeping, e.g. ``mst/flop_reduction``). With
    FSDP2-sharded masks, call it on every rank (the full masks are gathered), with ``write`` true on one.
    ``weights_from``: the checkpoint the model's weights and masks were loaded back from (``load_best_model_at_end``):
    the files then describe it (its step, phase, attention state, FLOP totals and metrics; see :func:`weights_info`),
    not the run's last step ``step``."""
    save_masks(controller.masks, output_dir, write=write)
    digest = controller.masks.digest()
    if not write:
        return
    if weights_from is None:
        info = saved_phase(step, total_steps, controller.config)
        state = controller.state_dict()
        state.update(saved_at_step=step, metrics=dict(metrics or {}))
    else:
        info, state = weights_info(weights_from, step), dict(weights_from.state)
    state.update(masks_digest=digest, sparsity=controller.masks.sparsity())
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
        info.update(read_mst_config(config_path))
    if os.path.isfile(state_path):
        state = read_mst_state(state_path)
        info.update({k: state[k] for k in ("sparsity", "metrics", "flops") if k in state})
    return info


# ------------------------------------------------------------------------------------------------ checking
@dataclass
class MSTCheckpoint:
    """The validated content of a checkpoint, not yet applied (see :func:`check_mst_checkpoint`)."""

    path: str
    masks: dict  # packed state dict, names and shapes checked against the controller
    state: dict  # mst_state.json
    config: dict = field(default_factory=dict)  # mst_config.json ({} when absent)
    trainer_state: dict | None = None  # trainer_state.json (None when not read)


@contextmanager
def _open_weights(file: str):
    check_regular_file(file, "Weights file of the checkpoint", "Resume from an earlier checkpoint "
                       "(mst_hf.last_complete_checkpoint(output_dir) finds the newest complete one).")
    try:
        handle = safe_open(file, framework="pt")
    except Exception as err:  # SafetensorError, OSError: name the file, which safetensors does not
        raise ValueError(f"{file!r}, weights of the checkpoint, is corrupt, truncated or not a safetensors file "
                         f"({err}). Resume from an earlier checkpoint (mst_hf.last_complete_checkpoint(output_dir) "
                         "finds the newest complete one).") from err
    with handle as f:
        yield f


def _weight_locations(checkpoint_dir: str) -> dict[str, str]:
    """Parameter name -> safetensors file holding it, for the checkpoint's (possibly sharded) weights; every file's
    header is read, so a corrupt or truncated one is refused here by name."""
    single, index = (os.path.join(checkpoint_dir, n) for n in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME))
    if os.path.isfile(index):
        locations = _index_locations(index, checkpoint_dir)
        for file in sorted(set(locations.values())):
            with _open_weights(file):
                pass
        return locations
    if os.path.isfile(single):
        with _open_weights(single) as f:
            return dict.fromkeys(f.keys(), single)
    return {}


def _index_locations(index: str, checkpoint_dir: str) -> dict[str, str]:
    """The weight index's ``weight_map`` as parameter name -> file path, each file confined to the checkpoint folder:
    an absolute path, a ``..`` path or a symlink leading out of it is refused (``ValueError`` naming it), so a crafted
    folder cannot make a resume read files elsewhere."""
    weight_map = read_json(index).get("weight_map", {})
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index!r}: `weight_map` is {type(weight_map).__name__}, expected an object parameter name "
                         "-> file name. The index is damaged: resume from an earlier checkpoint.")
    root = os.path.realpath(checkpoint_dir)
    locations = {}
    for name, file in weight_map.items():
        path = os.path.realpath(os.path.join(root, file)) if isinstance(file, str) and "\0" not in file else None
        if path is None or os.path.isabs(file) or os.path.commonpath([root, path]) != root or path == root:
            raise ValueError(f"{index!r}: `weight_map` names {file!r} for `{name}`, outside the checkpoint folder "
                             f"{checkpoint_dir!r} (or not a file name); only files inside it are read. Resume from "
                             "a checkpoint written by Trainer, or fix the index.")
        locations[name] = path
    return locations


def _check_weights_agree(checkpoint_dir: str, packed: dict, where: str) -> None:
    """Refuse masks that prune weights the checkpoint holds as non-zero (masks of another run of the same model)."""
    locations, shapes = _weight_locations(checkpoint_dir), packed_shapes(packed)
    by_file: dict[str, list[str]] = {}
    for name in (n for n in shapes if n in locations):
        by_file.setdefault(locations[name], []).append(name)
    for file, names in by_file.items():
        with _open_weights(file) as f:
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


def _previous(checkpoint_dir: str, suggest: bool = True) -> str:
    """A sentence naming the newest complete checkpoint beside ``checkpoint_dir`` (other than it), if any."""
    if not suggest:  # while searching for that checkpoint
        return ""
    parent = os.path.dirname(os.path.abspath(checkpoint_dir))
    previous = last_complete_checkpoint(parent, quiet=True) if os.path.isdir(parent) else None
    if previous is not None and os.path.abspath(previous) != os.path.abspath(checkpoint_dir):
        return f"Resume from {previous!r}, the newest complete checkpoint there."
    return "mst_hf.last_complete_checkpoint(output_dir) finds the newest complete checkpoint of a run."


def _read_trainer_state(checkpoint_dir: str, suggest: bool = True) -> dict:
    """``trainer_state.json`` and the weights a Trainer resume needs, checked to be there and readable."""
    path = os.path.join(checkpoint_dir, TRAINER_STATE_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint {checkpoint_dir!r} has no {TRAINER_STATE_NAME}: its save was cut short "
                                "(Trainer writes that file last), so it cannot be resumed; nothing was loaded. "
                                + _previous(checkpoint_dir, suggest))
    try:
        trainer_state = read_json(path)
    except ValueError as err:
        raise ValueError(f"{err} Nothing was loaded. {_previous(checkpoint_dir, suggest)}") from None
    step = trainer_state.get("global_step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"{path!r}: `global_step` is {step!r}, expected an integer >= 0; the file is damaged. "
                         + _previous(checkpoint_dir, suggest))
    if not _has_weights(checkpoint_dir):
        raise FileNotFoundError(f"Checkpoint {checkpoint_dir!r} has no model weights ({SAFE_WEIGHTS_NAME}); nothing "
                                "was loaded. " + _previous(checkpoint_dir, suggest))
    return trainer_state


def read_checkpoint(checkpoint_dir: str, trainer_files: bool = True, suggest: bool = True,
                    params: dict | None = None) -> MSTCheckpoint:
    """Read and validate the files of a checkpoint: the MST files (format, digest, values, paired with each other)
    and, with ``trainer_files``, ``trainer_state.json`` and the weights' headers; with ``params`` (the model's
    target parameters by name), also the masks' names and shapes and the masks against the saved weights.
    Raises ``FileNotFoundError`` for a missing folder or file and ``ValueError`` for a damaged one, naming it (and,
    with ``suggest``, the newest complete checkpoint beside it)."""
    checkpoint_dir = str(checkpoint_dir)
    if not os.path.isdir(checkpoint_dir):
        raise FileNotFoundError(f"Checkpoint folder {checkpoint_dir!r} does not exist. Check the path; "
                                + _previous(checkpoint_dir, suggest))
    trainer_state = None
    if trainer_files:
        trainer_state = _read_trainer_state(checkpoint_dir, suggest)
        _weight_locations(checkpoint_dir)  # reads every weight file's header: a damaged one is refused by name
    masks_path = os.path.join(checkpoint_dir, MASKS_NAME)
    if not os.path.isfile(masks_path):
        raise FileNotFoundError(
            f"Checkpoint {checkpoint_dir!r} has no {MASKS_NAME}: it was not written by MSTTrainer (or the save was "
            "interrupted), so the sparse topology cannot be restored. Resume from a complete MSTTrainer checkpoint "
            "(mst_hf.last_complete_checkpoint(output_dir) finds one); to start MST from dense weights, load them "
            "with from_pretrained and train without `resume_from_checkpoint`."
        )
    packed = read_mask_file(masks_path)
    if params is not None:
        check_shapes(packed_shapes(packed), params, repr(masks_path))
        _check_weights_agree(checkpoint_dir, packed, repr(masks_path))
    state_path = os.path.join(checkpoint_dir, STATE_NAME)
    if not os.path.isfile(state_path):
        raise FileNotFoundError(f"Checkpoint {checkpoint_dir!r} has {MASKS_NAME} but no {STATE_NAME}; the save was "
                                "interrupted. " + _previous(checkpoint_dir, suggest))
    state = read_mst_state(state_path)
    saved_digest = state.get("masks_digest")
    if saved_digest is not None and saved_digest != packed_digest(packed):
        raise ValueError(f"{state_path!r} was saved with other masks than {masks_path!r}: the files come from "
                         "different saves. Restore both from the same checkpoint.")
    config_path = os.path.join(checkpoint_dir, MST_CONFIG_NAME)
    config = read_mst_config(config_path) if os.path.isfile(config_path) else {}
    if trainer_state is not None and state.get("saved_at_step") is not None:
        if trainer_state["global_step"] != state["saved_at_step"]:
            raise ValueError(f"{state_path!r} was saved at step {state['saved_at_step']} but {TRAINER_STATE_NAME} "
                             f"is at step {trainer_state['global_step']}: the files come from different saves.")
    return MSTCheckpoint(checkpoint_dir, packed, state, config, trainer_state)


def check_mst_checkpoint(checkpoint_dir: str, controller, args=None) -> MSTCheckpoint:
    """Read and validate a checkpoint against ``controller``'s model (names and shapes of the masks, masks against
    the checkpoint's weights); modifies nothing.

    ``args``: the ``TrainingArguments`` of a Trainer resuming from it: then the Trainer's own files must be there
    too (checked before anything is loaded), and a resume that would silently differ from the saved run warns:
    another run length (the MST schedule is a function of it) or a missing ``optimizer.pt`` / ``scheduler.pt``.
    Raises ``ValueError`` (``FileNotFoundError`` for a missing folder or file) naming the file and the problem."""
    checkpoint = read_checkpoint(checkpoint_dir, trainer_files=args is not None, params=controller.masks.params)
    _warn_config_changes(checkpoint, controller.config)
    if args is not None:
        _warn_resume_changes(checkpoint, args)
    return checkpoint


def _warn_config_changes(checkpoint: MSTCheckpoint, mst_config) -> None:
    if not checkpoint.config or not isinstance(mst_config, MSTConfig):
        return
    current = mst_config.mst_dict()
    changed = sorted(k for k in mst_config_fields() if k in checkpoint.config and checkpoint.config[k] != current[k])
    if changed:
        logger.warning("Resuming with an MST config that differs from the checkpoint's in %s: the schedule after the "
                       "resume follows the new values.", changed)


def _warn_resume_changes(checkpoint: MSTCheckpoint, args) -> None:
    """What Trainer itself resumes without a word, though the run then differs from the saved one."""
    trainer_state = checkpoint.trainer_state or {}
    saved_total = checkpoint.config.get("total_steps") or trainer_state.get("max_steps")
    if getattr(args, "max_steps", -1) > 0 and saved_total and args.max_steps != saved_total:
        logger.warning(
            "Resuming %r with max_steps=%d, but it was saved by a run of max_steps=%d: the MST schedule (phase "
            "boundaries, target sparsity, update steps) is a function of the run length, so the rest of the run "
            "follows a re-timed schedule. Resume with max_steps=%d to continue the saved schedule.",
            checkpoint.path, args.max_steps, saved_total, saved_total)
    saved_epochs = trainer_state.get("num_train_epochs")
    if getattr(args, "max_steps", -1) <= 0 and saved_epochs and args.num_train_epochs != saved_epochs:
        logger.warning(
            "Resuming %r with num_train_epochs=%s, but it was saved by a run of num_train_epochs=%s (max_steps=%s): "
            "the MST schedule is a function of the run length, so the rest of the run follows a re-timed schedule. "
            "Resume with num_train_epochs=%s to continue the saved schedule.",
            checkpoint.path, args.num_train_epochs, saved_epochs, saved_total, saved_epochs)
    has = {n: os.path.isfile(os.path.join(checkpoint.path, n)) for n in (OPTIMIZER_NAME, OPTIMIZER_NAME_BIN,
                                                                          SCHEDULER_NAME)}
    missing = [n for n, ok in ((OPTIMIZER_NAME, has[OPTIMIZER_NAME] or has[OPTIMIZER_NAME_BIN]),
                               (SCHEDULER_NAME, has[SCHEDULER_NAME])) if not ok]
    if missing:
        logger.warning(
            "Checkpoint %r has no %s: Trainer then restores neither the optimizer nor the learning-rate schedule, so "
            "the resumed run starts with fresh optimizer state (Adam moments at zero) and the LR schedule from its "
            "first step. Resume from a checkpoint saved without `save_only_model` to continue exactly.",
            checkpoint.path, " or ".join(missing))


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


def last_complete_checkpoint(output_dir: str, quiet: bool = False) -> str | None:
    """The newest ``checkpoint-N`` folder of ``output_dir`` whose files are all there and valid: the Trainer's
    ``trainer_state.json`` (written last) parses and the weights' headers read, the MST files validate and belong
    to the same save; ``None`` if there is none. Use it instead of ``resume_from_checkpoint=True`` after a crash:
    that picks the newest folder (``get_last_checkpoint``) even if its save was cut short. Each newer folder that
    is skipped is logged with the reason (``quiet=True``: not logged)."""
    if not os.path.isdir(output_dir):
        return None
    found = []
    for name in os.listdir(output_dir):
        match = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    for _, path in sorted(found, reverse=True):
        try:
            read_checkpoint(path, trainer_files=True, suggest=False)
        except (OSError, ValueError) as err:
            if not quiet:
                logger.warning("Skipping %r, not a complete checkpoint: %s", path, err)
            continue
        return path
    return None
