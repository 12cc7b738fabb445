"""Saved masks meet live models: reattach a mask file to a model, trainer or controller (:func:`load_masks`), and
read any "masks" argument (a MaskState, a trainer, a dict, a saved path) as ``{name: bool tensor}``.

Masks are named as in the plain model: a PEFT wrapper's base model is used with ``.base_layer`` removed from the
names, so masks saved from an MST run fit the same model wrapped for LoRA.
"""

import os

import torch

from ..masks import SHAPE_SUFFIX, MaskState, check_shapes
from ..targets import unwrap_model
from .formats import mask_tensors, packed_shapes, read_any_masks


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
    where = f"Masks in {str(path)!r}"
    if masks is None:
        params = named_base_params(target)
        check_shapes(packed_shapes(state), params, where, exact=False)
        masks = MaskState({n: params[n] for n in state if not n.endswith(SHAPE_SUFFIX)})
    try:
        masks.load_state_dict(state, apply=apply)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    invalidate_flops(target)
    return masks
