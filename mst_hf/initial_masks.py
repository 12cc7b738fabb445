"""The masks a run starts from when ``initial_sparsity > 0``: ``MSTConfig.initial_mask``.

* ``"random"``: every target at its allocated density (the layer-wise allocation at ``initial_sparsity``), the
  active positions drawn uniformly at random from a generator seeded by ``(seed, layer)``: the same masks on every
  rank and in every run (the masks of fresh weights, as in RigL and the MST paper);
* ``"magnitude"``: the same counts, keeping the weights of largest ``|w|`` (the tiles of largest L2 norm with
  ``sparsity_structure="block"``): weights that were trained keep what they learnt;
* ``"auto"`` (default), the rule:

  1. the model was loaded from a folder (``from_pretrained``: ``model.name_or_path``) that holds MST masks
     (``mst_masks.safetensors``, e.g. a model saved by ``MSTTrainer``), the masks cover exactly the model's targets
     and every weight they prune is zero in the model (they were saved with these weights): those masks, as saved;
  2. otherwise, per target: ``"magnitude"`` for a matrix whose weights are not freshly initialised, that is one
     ``from_pretrained`` loaded from its checkpoint (transformers marks every weight it loads with
     ``_is_hf_initialized``; ``name_or_path`` alone does not tell, ``from_config`` of a loaded config sets it too),
     or one that already holds no more non-zeros than its mask keeps (weights pruned before, loaded another way);
  3. ``"random"`` for the rest (a model built with ``from_config``: bit for bit the masks of earlier versions).
"""

import os

import torch
from transformers.utils import logging

from . import sharding, topology
from .recipe import INITIAL_MASKS  # noqa: F401 (the names of the rules)
from .targets import unwrap_model

logger = logging.get_logger(__name__)

_MASKS_FILE = "mst_masks.safetensors"  # mst_hf.io.formats.MASKS_NAME (io is imported only when a folder has one)


def saved_masks(model, targets) -> tuple[dict[str, torch.Tensor], str] | None:
    """Rule 1: the masks saved beside the weights ``model`` was loaded from, with their file; ``None`` when there is
    no such file or the masks do not belong to these weights."""
    folder = getattr(unwrap_model(model), "name_or_path", None) or ""
    file = os.path.join(str(folder), _MASKS_FILE)
    if not folder or not os.path.isfile(file):
        return None
    from .io.formats import mask_tensors, read_mask_file

    try:
        masks = mask_tensors(read_mask_file(file))
    except (OSError, ValueError) as err:
        logger.warning("MST initial masks: %r cannot be read (%s); the masks are chosen as if it were absent.", file,
                       err)
        return None
    if set(masks) != set(targets) or any(tuple(masks[n].shape) != tuple(sharding.full(t.param).shape)
                                         for n, t in targets.items()):
        logger.info("MST initial masks: %r covers other weights than this run's targets; not used.", file)
        return None
    for name, t in targets.items():
        weight = sharding.full(t.param).detach()
        if bool((weight[~masks[name].to(weight.device)] != 0).any()):
            logger.info("MST initial masks: %r prunes weights that are non-zero in this model (another model's "
                        "masks, or fresh weights of the same shapes); not used.", file)
            return None
    return masks, file


def holds_trained_weights(param, n_active: int) -> bool:
    """Rule 2: ``param`` was loaded by ``from_pretrained``, or it already has at most ``n_active`` non-zeros (and
    some: an all-zero matrix has nothing to keep)."""
    if getattr(param, "_is_hf_initialized", False):
        return True
    nonzero = int(torch.count_nonzero(sharding.full(param).detach()))
    return 0 < nonzero <= n_active


def magnitude_mask(weight: torch.Tensor, density: float, block: int | None = None) -> torch.Tensor:
    """The mask keeping the ``active_count(numel, density)`` weights of largest ``|w|`` (with ``block``: the
    ``active_tiles`` tiles of largest L2 norm)."""
    shape = tuple(weight.shape)
    if block is None:
        everything = torch.ones(shape, dtype=torch.bool, device=weight.device)
        return topology.drop_by_magnitude(weight, everything, weight.numel() - topology.active_count(weight.numel(),
                                                                                                      density))
    norms = topology.block_norms(weight, block)
    tiles = torch.ones(norms.shape, dtype=torch.bool, device=weight.device)
    keep = topology.active_tiles(shape, block, density)
    return topology.expand_blocks(topology.drop_by_magnitude(norms, tiles, norms.numel() - keep), block, shape)


def random_mask(param, density: float, block: int | None, generator: torch.Generator) -> torch.Tensor:
    """Rule 3: ``active_count`` (or ``active_tiles``) positions drawn from ``generator``."""
    shape = tuple(param.shape)
    if block is not None:
        return topology.random_block_mask(shape, topology.active_tiles(shape, block, density), block, generator,
                                          param.device)
    return topology.random_mask(shape, topology.active_count(param.numel(), density), generator, param.device)


def initial_masks(model, targets, densities: dict[str, float], rule: str, block: int | None,
                  generator) -> tuple[dict[str, torch.Tensor], str]:
    """The step-0 masks of every target by ``rule`` (see the module docstring), and a sentence saying how they were
    chosen. ``densities``: the allocation at ``initial_sparsity``; ``generator(layer_index, device)``: the seeded
    generator of a layer's random mask."""
    if rule == "auto" and (found := saved_masks(model, targets)) is not None:
        return found[0], f"the masks saved with the model's weights ({found[1]})"
    masks, by_magnitude = {}, []
    for i, (name, density) in enumerate(densities.items()):
        param = targets[name].param
        n_active = topology.active_count(param.numel(), density)
        if rule == "magnitude" or (rule == "auto" and holds_trained_weights(param, n_active)):
            masks[name] = magnitude_mask(sharding.full(param).detach(), density, block)
            by_magnitude.append(name)
        else:
            masks[name] = random_mask(param, density, block, generator(i, param.device))
    if not by_magnitude:
        return masks, "random (seeded)"
    if len(by_magnitude) == len(masks):
        return masks, "by weight magnitude (trained weights)"
    return masks, (f"by weight magnitude for {len(by_magnitude)} of {len(masks)} targets (trained weights), random "
                   "for the rest")


@torch.no_grad()
def set_initial_masks(controller, sparsity: float, generator) -> None:
    """Give ``controller`` (an :class:`~mst_hf.MSTController`) its step-0 masks at global ``sparsity`` by its
    config's ``initial_mask`` and zero the weights they prune; ``generator(layer_index, device)`` as above."""
    masks, how = initial_masks(controller.model, controller.targets, controller.target_densities(sparsity),
                               controller.config.initial_mask, controller.block, generator)
    for name, mask in masks.items():
        controller.masks.set_mask(name, mask)
    controller.masks.apply_to_weights()
    logger.info("MST initial masks at sparsity %s: %s.", sparsity, how)
