"""MST files next to a model or a Trainer checkpoint: masks (bit-packed), config and controller state.

* ``mst_masks.safetensors``: for each target parameter ``name``, the mask bits packed 8 per byte (uint8) under
  ``name`` and the shape (int64) under ``name.__shape__``; metadata: ``format="mst_hf"``, the format version and
  the SHA-256 ``digest`` of the masks (:meth:`MaskState.digest`), which exposes any byte changed on disk.
* ``mst_config.json``: the :class:`MSTConfig` fields plus ``saved_at_step`` (optimizer steps taken),
  ``total_steps``, ``saved_in_phase`` (phase of the last step trained) and ``hsa_active`` (whether the sparse
  attention pattern was on then: a model used for inference runs the pattern of the phase it was saved in).
* ``mst_state.json``: :meth:`MSTController.state_dict` (last update step, update history, FLOP totals), plus the
  digest of the masks it was saved with, ``saved_at_step``, the global ``sparsity`` and the latest logged
  ``metrics`` (FLOP reduction, eval loss), so the files of two different saves are never mixed.

Nothing else is needed to resume. The random growth draws from a generator that is a pure function of
``(seed, step, layer)``, so there is no RNG state to save; the Trainer itself saves the weights, the optimizer
moments, the LR schedule, its RNG states and the data position.

Every file is written under a temporary name and renamed, so a process killed mid-write leaves the previous file or
none, never half of one. Loading validates everything (readable file, format, digest, names and shapes against the
model, masks against the checkpoint's weights, state paired with the masks) before anything is modified.
"""

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import schedule
from .config import MST_CONFIG_NAME, MSTConfig
from .masks import MaskState, unpack_mask
from .targets import unwrap_model

logger = logging.getLogger(__name__)

MASKS_NAME = "mst_masks.safetensors"
STATE_NAME = "mst_state.json"
TRAINER_STATE_NAME = "trainer_state.json"
MASKS_FORMAT = "mst_hf"
FORMAT_VERSION = "1"
SHAPE_SUFFIX = ".__shape__"
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


# ------------------------------------------------------------------------------------------------ writing
def atomic_write(path: str, write) -> None:
    """Call ``write(tmp_path)``, then rename ``tmp_path`` to ``path`` (atomic on POSIX)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str, data: dict) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")

    atomic_write(path, write)


def save_masks(masks: MaskState, directory: str) -> str:
    """Write ``mst_masks.safetensors`` for ``masks`` into ``directory``; returns the file's path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, MASKS_NAME)
    metadata = {"format": MASKS_FORMAT, "version": FORMAT_VERSION, "digest": masks.digest()}
    state = masks.state_dict()
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata))
    return path


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


# ------------------------------------------------------------------------------------------------ reading
def _digest(state: dict[str, torch.Tensor]) -> str:
    """Digest of a packed mask state dict, equal to :meth:`MaskState.digest` of the masks it holds."""
    h = hashlib.sha256()
    for name in sorted(k for k in state if not k.endswith(SHAPE_SUFFIX)):
        h.update(name.encode())
        h.update(state[name].numpy().tobytes())
    return h.hexdigest()


def _mask_file(path: str) -> str:
    if os.path.isdir(path):
        return os.path.join(path, MASKS_NAME)
    return str(path)


def read_mask_file(path: str) -> dict[str, torch.Tensor]:
    """Read and check a mask file (or the ``mst_masks.safetensors`` of a directory); returns its packed state dict.

    Refuses (``ValueError``) a file that is unreadable, truncated, not written by mst_hf, malformed, or whose bytes
    no longer match the digest stored when it was written. Nothing is modified."""
    path = _mask_file(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"No MST mask file at {path!r}. Pass a directory or checkpoint written by MSTTrainer (it holds "
            f"{MASKS_NAME}) or the path of such a file."
        )
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            state = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:  # safetensors raises SafetensorError, OSError or RuntimeError on bad bytes
        raise ValueError(
            f"MST mask file {path!r} is corrupt, truncated or not a safetensors file ({err}). Resume from an "
            "earlier checkpoint, or save the masks again."
        ) from err
    if metadata.get("format") != MASKS_FORMAT:
        raise ValueError(
            f"{path!r} is not an mst_hf mask file (metadata format={metadata.get('format')!r}, expected "
            f"{MASKS_FORMAT!r}). Pass the {MASKS_NAME} written by MSTTrainer or mst_hf.checkpoint.save_masks."
        )
    for name in (k for k in state if not k.endswith(SHAPE_SUFFIX)):
        shape = state.get(name + SHAPE_SUFFIX)
        if shape is None or shape.dtype != torch.int64 or shape.ndim != 1 or bool((shape < 0).any()):
            raise ValueError(f"MST mask file {path!r}: mask `{name}` has no valid int64 shape entry `{name}"
                             f"{SHAPE_SUFFIX}`; the file is malformed. Save the masks again.")
        if state[name].dtype != torch.uint8 or state[name].ndim != 1:
            raise ValueError(f"MST mask file {path!r}: mask `{name}` is {state[name].dtype} of shape "
                             f"{tuple(state[name].shape)}, expected packed 1-D uint8 bits. Save the masks again.")
    orphans = sorted(k for k in state if k.endswith(SHAPE_SUFFIX) and k[: -len(SHAPE_SUFFIX)] not in state)
    if orphans:
        raise ValueError(f"MST mask file {path!r} has shape entries without masks: {orphans[:5]}. Save it again.")
    if "digest" in metadata and _digest(state) != metadata["digest"]:
        raise ValueError(
            f"MST mask file {path!r} is corrupt: its bytes no longer match the digest stored when it was written. "
            "Resume from an earlier checkpoint, or save the masks again."
        )
    return state


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path!r} is corrupt or unreadable ({err}). Resume from an earlier checkpoint.") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path!r} must hold a JSON object, got {type(data).__name__}.")
    return data


def named_base_params(model) -> dict:
    """Parameters by the name the plain model gives them (PEFT wrappers: the base model, ``.base_layer`` removed)."""
    model = unwrap_model(model)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return {name.replace(".base_layer.", "."): p for name, p in model.named_parameters()}


def mask_state_of(target) -> MaskState | None:
    """The MaskState of an MSTTrainer, an MSTController or a MaskState; ``None`` for a model."""
    if isinstance(target, MaskState):
        return target
    controller = getattr(target, "mst", target)
    masks = getattr(controller, "masks", None)
    return masks if isinstance(masks, MaskState) else None


def read_any_masks(path: str) -> dict[str, torch.Tensor]:
    """Packed masks from a directory, an ``mst_masks.safetensors`` file or a compact ``save_sparse`` file."""
    from .hub import SPARSE_FORMAT, SPARSE_NAME, read_sparse_masks

    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, MASKS_NAME)):
        if os.path.isfile(os.path.join(path, SPARSE_NAME)):
            return read_sparse_masks(os.path.join(path, SPARSE_NAME))
    elif os.path.isfile(path):
        try:
            with safe_open(path, framework="pt") as f:
                fmt = (f.metadata() or {}).get("format")
        except Exception:  # read_mask_file reports it
            fmt = None
        if fmt == SPARSE_FORMAT:
            return read_sparse_masks(path)
    return read_mask_file(path)


def load_masks(target, path: str, apply: bool = True) -> MaskState:
    """Reattach saved masks to ``target`` and return them.

    ``target``: a model (e.g. from ``from_pretrained`` of an MST checkpoint, or a ``PeftModel`` wrapping one): a new
    :class:`MaskState` over its parameters named in the file; or an ``MSTTrainer`` / ``MSTController`` /
    ``MaskState``: its masks are replaced (to continue MST training from a saved model, without ``resume``).
    ``path``: a directory holding ``mst_masks.safetensors``, such a file, or a compact file of ``save_sparse``.
    ``apply``: zero the weights the masks prune (a no-op on the model the masks were saved with).
    The file is validated against the model (names and shapes) before anything is modified.
    """
    state = read_any_masks(str(path))
    masks = mask_state_of(target)
    if masks is None:
        params = named_base_params(target)
        names = [k for k in state if not k.endswith(SHAPE_SUFFIX)]
        missing = sorted(n for n in names if n not in params)
        if missing:
            raise ValueError(
                f"Masks in {path!r} name parameters this {type(target).__name__} does not have: {missing[:5]}. "
                "Load masks saved from the same model architecture."
            )
        masks = MaskState({n: params[n] for n in names})
    try:
        masks.load_state_dict(state, apply=apply)
    except ValueError as err:
        raise ValueError(f"{path!r}: {err}") from None
    flops = getattr(getattr(target, "mst", target), "flops", None)
    if flops is not None and hasattr(flops, "invalidate"):
        flops.invalidate()
    return masks


# ------------------------------------------------------------------------------------------------ resume
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
        weight_map = _read_json(index).get("weight_map", {})
        return {k: os.path.join(checkpoint_dir, v) for k, v in weight_map.items()}
    if os.path.isfile(single):
        with safe_open(single, framework="pt") as f:
            return dict.fromkeys(f.keys(), single)
    return {}


def check_masks_fit(packed: dict[str, torch.Tensor], params: dict, where: str) -> None:
    """Refuse packed masks whose names or shapes are not those of ``params`` (without unpacking them)."""
    names = {k for k in packed if not k.endswith(SHAPE_SUFFIX)}
    if names != set(params):
        raise ValueError(
            f"{where}: the mask file does not match the model: missing masks for {sorted(set(params) - names)[:5]}, "
            f"unexpected masks {sorted(names - set(params))[:5]}. Load masks saved from the same model architecture "
            "and MST target modules."
        )
    for name, param in params.items():
        shape = tuple(int(x) for x in packed[name + SHAPE_SUFFIX].tolist())
        if shape != tuple(param.shape):
            raise ValueError(f"{where}: mask `{name}` has shape {shape} but the model's parameter has shape "
                             f"{tuple(param.shape)}: the mask file belongs to another model.")
        if packed[name].numel() != (param.numel() + 7) // 8:
            raise ValueError(f"{where}: mask `{name}` has {packed[name].numel()} bytes, a {shape} mask needs "
                             f"{(param.numel() + 7) // 8}: the file is malformed.")


def _check_weights_agree(checkpoint_dir: str, packed: dict[str, torch.Tensor], where: str) -> None:
    """Refuse masks that prune weights the checkpoint holds as non-zero (masks of another run of the same model)."""
    locations = _weight_locations(checkpoint_dir)
    by_file: dict[str, list[str]] = {}
    for name in (k for k in packed if not k.endswith(SHAPE_SUFFIX)):
        if name in locations:
            by_file.setdefault(locations[name], []).append(name)
    for file, names in by_file.items():
        with safe_open(file, framework="pt") as f:
            for name in names:  # one mask unpacked at a time: 1 byte per weight, briefly
                shape = tuple(int(x) for x in packed[name + SHAPE_SUFFIX].tolist())
                weight, mask = f.get_tensor(name), unpack_mask(packed[name], shape)
                if tuple(weight.shape) != tuple(mask.shape):
                    raise ValueError(f"{where}: mask `{name}` has shape {tuple(mask.shape)} but the checkpoint's "
                                     f"weight has shape {tuple(weight.shape)}; the files come from different models.")
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
    check_masks_fit(packed, controller.masks.params, repr(masks_path))
    _check_weights_agree(checkpoint_dir, packed, repr(masks_path))

    state_path = os.path.join(checkpoint_dir, STATE_NAME)
    if not os.path.isfile(state_path):
        raise FileNotFoundError(f"Checkpoint {checkpoint_dir!r} has {MASKS_NAME} but no {STATE_NAME}; the save was "
                                "interrupted. Resume from an earlier checkpoint.")
    state = _read_json(state_path)
    saved_digest = state.get("masks_digest")
    if saved_digest is not None and saved_digest != _digest(packed):
        raise ValueError(f"{state_path!r} was saved with other masks than {masks_path!r}: the files come from "
                         "different saves. Restore both from the same checkpoint.")
    trainer_state_path = os.path.join(checkpoint_dir, TRAINER_STATE_NAME)
    if os.path.isfile(trainer_state_path) and state.get("saved_at_step") is not None:
        global_step = _read_json(trainer_state_path).get("global_step")
        if global_step != state["saved_at_step"]:
            raise ValueError(f"{state_path!r} was saved at step {state['saved_at_step']} but {TRAINER_STATE_NAME} "
                             f"is at step {global_step}: the files come from different saves.")
    _warn_config_changes(checkpoint_dir, controller.config)
    return MSTCheckpoint(checkpoint_dir, packed, state)


def _warn_config_changes(checkpoint_dir: str, mst_config) -> None:
    path = os.path.join(checkpoint_dir, MST_CONFIG_NAME)
    if not os.path.isfile(path) or not isinstance(mst_config, MSTConfig):
        return
    saved, current = _read_json(path), mst_config.mst_dict()
    changed = sorted(k for k in current if k in saved and saved[k] != current[k])
    if changed:
        logger.warning("Resuming with an MST config that differs from the checkpoint's in %s: the schedule after the "
                       "resume follows the new values.", changed)


def restore_mst_checkpoint(controller, checkpoint: MSTCheckpoint) -> None:
    """Apply a checkpoint validated by :func:`check_mst_checkpoint`: masks (replacing any initial random masks),
    controller state, and a reset of the attention cache so the next step re-applies the HSA on/off state."""
    controller.masks.load_state_dict(checkpoint.masks, apply=True)
    controller.load_state_dict(checkpoint.state)
    controller.hsa_on = None  # the model's attention state is not in the checkpoint's controller state
    flops = getattr(controller, "flops", None)
    if flops is not None and hasattr(flops, "invalidate"):
        flops.invalidate()


def load_mst_files(checkpoint_dir: str, controller) -> dict:
    """Validate, then restore masks and controller state from ``checkpoint_dir``; returns the saved state dict.
    (For custom loops; ``MSTTrainer`` validates before the Trainer loads the weights and restores after.)"""
    checkpoint = check_mst_checkpoint(checkpoint_dir, controller)
    restore_mst_checkpoint(controller, checkpoint)
    return checkpoint.state


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest ``checkpoint-N`` folder of ``output_dir`` whose save finished (Trainer writes
    ``trainer_state.json`` last) and that holds the MST files; ``None`` if there is none. Use it instead of
    ``resume_from_checkpoint=True`` after a crash, which picks the newest folder even if its save was cut short."""
    if not os.path.isdir(output_dir):
        return None
    found = []
    for name in os.listdir(output_dir):
        match = re.fullmatch(r"checkpoint-(\d+)", name)
        path = os.path.join(output_dir, name)
        if match and all(os.path.isfile(os.path.join(path, f)) for f in (TRAINER_STATE_NAME, MASKS_NAME, STATE_NAME)):
            found.append((int(match.group(1)), path))
    return max(found)[1] if found else None


def read_saved_info(directory: str) -> dict:
    """What a saved MST directory says about itself: ``mst_config.json`` (fields and save info) merged with the
    ``sparsity`` and ``metrics`` of ``mst_state.json``; ``{}`` when neither exists."""
    info = {}
    config_path, state_path = os.path.join(directory, MST_CONFIG_NAME), os.path.join(directory, STATE_NAME)
    if os.path.isfile(config_path):
        info.update(_read_json(config_path))
    if os.path.isfile(state_path):
        state = _read_json(state_path)
        info.update({k: state[k] for k in ("sparsity", "metrics", "flops") if k in state})
    return info


def mask_tensors(packed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Unpack a packed mask state dict into ``{name: bool tensor}``."""
    return {
        name: unpack_mask(bits, tuple(int(x) for x in packed[name + SHAPE_SUFFIX].tolist()))
        for name, bits in packed.items()
        if not name.endswith(SHAPE_SUFFIX)
    }
