"""Saved masks meet live models: reattach a mask file to a model, trainer or controller (:func:`load_masks`), and
read any "masks" argument (a MaskState, a trainer, a dict, a saved path) as ``{name: bool tensor}``.

Masks are named as in the plain model: a PEFT wrapper's base model is used with ``.base_layer`` removed from the
names, so masks saved from an MST run fit the same model wrapped for LoRA.
"""

import os
import re

import torch
from transformers.utils import logging

from .. import sharding
from ..config import MST_CONFIG_NAME, MSTConfig
from ..masks import MaskState, check_shapes
from ..regex_safety import check_pattern
from ..targets import find_targets, unwrap_model
from .formats import mask_tensors, packed_shapes, read_any_masks
from .records import mst_config_fields, read_mst_config

logger = logging.get_logger(__name__)


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


def as_mask_dict(masks) -> dict[str, torch.Tensor] | None:
    """``{name: bool tensor}`` from a MaskState, MSTController, MSTTrainer, dict or saved masks path."""
    if masks is None:
        return None
    if isinstance(masks, (str, os.PathLike)):
        return mask_tensors(read_any_masks(str(masks)))
    state = mask_state_of(masks)
    if state is not None:
        return {n: m.cpu() for n, m in state.masks.items()}
    if isinstance(masks, dict) and all(torch.is_tensor(m) and m.dtype == torch.bool for m in masks.values()):
        return {n: m.cpu() for n, m in masks.items()}
    raise TypeError(f"`masks` must be a MaskState, an MSTController/MSTTrainer, a dict name -> bool tensor or the "
                    f"path of saved masks, got {type(masks).__name__}.")


def invalidate_flops(target) -> None:
    """Tell the FLOP meter of a trainer or controller (if any) that its masks changed."""
    flops = getattr(getattr(target, "mst", target), "flops", None)
    if flops is not None and hasattr(flops, "invalidate"):
        flops.invalidate()


def unmasked_targets(model, path: str, masked) -> tuple[list[str], str]:
    """The weights MST targets in ``model`` (under the MST config saved beside the masks; the default
    :class:`MSTConfig` without one) that have no mask in ``masked`` though they are further layers of a kind it
    masks: the sign of a model larger than the one the masks were saved from. Also returns a phrase naming the
    config."""
    directory = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    config_path = os.path.join(directory, MST_CONFIG_NAME)
    if os.path.isfile(config_path):
        saved = read_mst_config(config_path)
        for field in ("target_modules", "exclude_modules"):  # a downloaded folder's regex: matched only when safe
            if isinstance(saved.get(field), str):
                try:
                    check_pattern(field, saved[field])
                except ValueError as err:
                    raise ValueError(f"{config_path!r}, beside the masks: {err} Edit that file, or load the masks "
                                     "from a folder without it (the default targets are then used).") from None
        config, source = MSTConfig(**{k: saved[k] for k in mst_config_fields() if k in saved}), repr(config_path)
    else:
        config, source = MSTConfig(), f"the default MSTConfig (no {MST_CONFIG_NAME} beside the masks)"
    base = unwrap_model(model)
    base = base.get_base_model() if hasattr(base, "get_base_model") else base
    targets = {name.replace(".base_layer.", ".") for name in find_targets(base, config)}
    kinds = {_kind(name) for name in masked}  # only more layers of a masked kind (not weights left dense on purpose)
    return sorted(n for n in targets - set(masked) if _kind(n) in kinds), source


def _kind(name: str) -> str:
    """A parameter name without its layer indices: ``h.3.mlp.c_fc.weight`` -> ``h.#.mlp.c_fc.weight``."""
    return re.sub(r"\.\d+\.", ".#.", name)


def load_masks(target, path: str, apply: bool = True, strict: bool = True,
               allow_unverified: bool = False) -> MaskState:
    """Reattach saved masks to ``target`` and return them.

    ``target``: a model (e.g. from ``from_pretrained`` of an MST checkpoint, or a ``PeftModel`` wrapping one): a new
    :class:`MaskState` over its parameters named in the file; or an ``MSTTrainer`` / ``MSTController`` /
    ``MaskState``: its masks are replaced (to continue MST training from a saved model, without ``resume``).
    ``path``: a directory holding ``mst_masks.safetensors``, such a file, or a compact file of ``save_sparse``.
    ``apply``: zero the weights the masks prune (a no-op on the model the masks were saved with).
    The file is validated against the model (names and shapes) before anything is modified. A model with target
    weights the file has no mask for (a larger model; targets under the ``mst_config.json`` beside the masks) is
    refused; ``strict=False`` masks only the weights the file names, with a warning listing the others. A mask file
    without its digest is refused; ``allow_unverified=True`` reads it as it is. A ``target_modules`` /
    ``exclude_modules`` regex in that ``mst_config.json`` that could take exponential time to match is refused
    before any name is matched (:func:`mst_hf.regex_safety.check_pattern`).
    """
    state = read_any_masks(str(path), allow_unverified)
    masks = mask_state_of(target)
    where = f"Masks in {str(path)!r}"
    if masks is None:
        params = named_base_params(target)
        shapes = packed_shapes(state)
        check_shapes(shapes, params, where, exact=False)
        unmatched, source = unmasked_targets(target, str(path), shapes)
        if unmatched:
            message = (f"{where} cover {len(shapes)} weights of this {type(target).__name__}, but {len(unmatched)} "
                       f"more that MST targets under {source} have no mask: {unmatched[:5]}; the model is larger "
                       "than the one the masks were saved from, so those weights would stay dense.")
            if strict:
                raise ValueError(f"{message} Load masks saved from this model, or pass strict=False to mask only the "
                                 "parameters the file names.")
            logger.warning("%s strict=False: only the parameters the file names are masked.", message)
        masks = MaskState({n: params[n] for n in shapes}, layout=sharding)  # FSDP2 models: masks as shards
    try:
        masks.load_state_dict(state, apply=apply)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    invalidate_flops(target)
    return masks
