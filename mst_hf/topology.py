"""Pure tensor functions of dynamic sparse training: layer allocation, drop and grow.

No transformers import. Masks are boolean tensors shaped like their weight; ``True`` means active.
"""

import math

import torch

# --------------------------------------------------------------------------- layer-wise allocation


def erdos_renyi_densities(shapes: list[tuple[int, int]], sparsity: float) -> list[float]:
    """Per-layer densities whose weighted mean is ``1 - sparsity``, with density proportional to
    ``(n_in + n_out) / (n_in * n_out)`` (Erdős–Rényi, Mocanu et al. 2018; Evci et al. 2020).

    A layer whose density would exceed 1 is made dense and the scale recomputed over the others.
    """
    numels = [n_in * n_out for n_in, n_out in shapes]
    raw = [(n_in + n_out) / (n_in * n_out) for n_in, n_out in shapes]
    dense: set[int] = set()
    budget = (1.0 - sparsity) * sum(numels)
    while True:
        free = [i for i in range(len(shapes)) if i not in dense]
        remaining = budget - sum(numels[i] for i in dense)
        denominator = sum(raw[i] * numels[i] for i in free)
        scale = remaining / denominator if denominator > 0 else 0.0
        over = [i for i in free if scale * raw[i] > 1.0]
        if not over:
            break
        dense.update(over)
    return [1.0 if i in dense else scale * raw[i] for i in range(len(shapes))]


def uniform_densities(shapes: list[tuple[int, int]], sparsity: float) -> list[float]:
    """Every layer at the global density ``1 - sparsity``."""
    return [1.0 - sparsity for _ in shapes]


ALLOCATIONS = {"erdos_renyi": erdos_renyi_densities, "uniform": uniform_densities}


def allocate(shapes: list[tuple[int, int]], sparsity: float, distribution: str,
             max_sparsity: list[float | None] | None = None) -> list[float]:
    """Per-layer densities for a global ``sparsity`` under the named distribution.

    ``max_sparsity`` (optional, one entry per layer, ``None`` = no cap) caps layer sparsities, e.g. the LM head's
    (``lm_head_max_sparsity``). With caps, layer ``i`` of ``N_i`` weights gets density
    ``d_i = clip(c * r_i, 1 - m_i, 1)``, where ``r_i`` is the distribution's raw density (Erdős–Rényi:
    ``(n_in + n_out) / (n_in n_out)``; uniform: 1), ``m_i`` the cap, and the one scale ``c`` is chosen so that
    ``sum_i d_i N_i = (1 - sparsity) sum_i N_i``: the weights a capped layer keeps above its share come out of the
    other layers, in proportion to their raw densities, and the global sparsity is unchanged. A cap no layer
    reaches changes nothing. Raises ``ValueError`` when the caps alone need more active weights than the budget.
    """
    if distribution not in ALLOCATIONS:
        raise ValueError(f"Unknown sparsity distribution {distribution!r}; choose one of {sorted(ALLOCATIONS)}.")
    if sparsity <= 0.0:
        return [1.0 for _ in shapes]
    if max_sparsity is None or all(m is None for m in max_sparsity):
        return ALLOCATIONS[distribution](shapes, sparsity)
    if len(max_sparsity) != len(shapes):
        raise ValueError(f"`max_sparsity` has {len(max_sparsity)} entries for {len(shapes)} layers; give one per "
                         "layer (None for no cap).")
    floors = [0.0 if m is None else 1.0 - m for m in max_sparsity]
    raw = [(n_in + n_out) / (n_in * n_out) if distribution == "erdos_renyi" else 1.0 for n_in, n_out in shapes]
    return _capped_densities([n_in * n_out for n_in, n_out in shapes], raw, floors, sparsity)


def _capped_densities(numels: list[int], raw: list[float], floors: list[float], sparsity: float) -> list[float]:
    """``d_i = clip(c * raw_i, floors_i, 1)`` with the scale ``c`` that meets the budget (see :func:`allocate`).

    Layers are fixed at 1 or at their floor as the scale falls (fixing either only lowers the scale left for the
    others), so the loop ends after at most one pass per layer."""
    budget = (1.0 - sparsity) * sum(numels)
    need = sum(f * n for f, n in zip(floors, numels))
    if need > budget * (1 + 1e-12):
        raise ValueError(
            f"The sparsity caps need {need / sum(numels):.4f} of the targeted weights active, more than the "
            f"{1.0 - sparsity:.4f} a global sparsity of {sparsity} leaves: raise the cap (`lm_head_max_sparsity`) or "
            "lower the sparsity."
        )
    fixed: dict[int, float] = {}
    while True:
        free = [i for i in range(len(numels)) if i not in fixed]
        remaining = budget - sum(fixed[i] * numels[i] for i in fixed)
        denominator = sum(raw[i] * numels[i] for i in free)
        scale = remaining / denominator if denominator > 0 else 0.0
        over = {i: 1.0 for i in free if scale * raw[i] > 1.0}
        under = {i: floors[i] for i in free if scale * raw[i] < floors[i]}
        if not over and not under:
            break
        fixed.update(over if over else under)
    return [fixed[i] if i in fixed else scale * raw[i] for i in range(len(numels))]


def active_count(numel: int, density: float) -> int:
    """Number of active connections of a layer of ``numel`` weights at ``density`` (round half up, clipped)."""
    return min(numel, max(0, int(math.floor(density * numel + 0.5))))


# --------------------------------------------------------------------------- drop and grow


def drop_by_magnitude(weight: torch.Tensor, mask: torch.Tensor, n_drop: int) -> torch.Tensor:
    """Return ``mask`` with its ``n_drop`` active entries of smallest ``|weight|`` switched off."""
    if n_drop <= 0:
        return mask.clone()
    score = weight.detach().abs().float().flatten()
    score = score.masked_fill(~mask.flatten(), float("inf"))
    idx = torch.topk(score, n_drop, largest=False, sorted=False).indices
    new = mask.clone().flatten()
    new[idx] = False
    return new.view_as(mask)


def _grow_top(scores: torch.Tensor, candidates: torch.Tensor, n: int) -> torch.Tensor:
    """Indices (flat) of the ``n`` candidate positions with the largest score."""
    if n <= 0:
        return torch.empty(0, dtype=torch.long, device=scores.device)
    s = scores.float().flatten().masked_fill(~candidates.flatten(), float("-inf"))
    return torch.topk(s, n, largest=True, sorted=False).indices


def _random_scores(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(like.numel(), generator=generator, device=generator.device).to(like.device)


def grow_by_gradient(mask, grad, n_grow, generator=None, **_):
    """RigL: grow the ``n_grow`` inactive positions with the largest ``|dense gradient|``."""
    new = mask.clone().flatten()
    new[_grow_top(grad.detach().abs(), ~mask, n_grow)] = True
    return new.view_as(mask)


def grow_random(mask, grad, n_grow, generator=None, **_):
    """SET: grow ``n_grow`` inactive positions uniformly at random (from ``generator``)."""
    new = mask.clone().flatten()
    new[_grow_top(_random_scores(mask, generator), ~mask, n_grow)] = True
    return new.view_as(mask)


def grow_mixed(mask, grad, n_grow, generator=None, gradient_fraction: float = 0.75, **_):
    """MG (mixed growing): ``round(gradient_fraction * n_grow)`` by gradient, the rest uniformly at random."""
    n_gradient = int(math.floor(gradient_fraction * n_grow + 0.5))
    by_gradient = grow_by_gradient(mask, grad, n_gradient)
    return grow_random(by_gradient, grad, n_grow - n_gradient, generator=generator)


GROW_FUNCTIONS = {"gradient": grow_by_gradient, "random": grow_random, "mixed": grow_mixed}


def evolve(
    mask: torch.Tensor,
    weight: torch.Tensor,
    grad: torch.Tensor | None,
    target_active: int,
    drop_fraction: float,
    grow_method: str,
    generator: torch.Generator | None = None,
    gradient_fraction: float = 0.75,
    n_active: int | None = None,
) -> tuple[torch.Tensor, int, int]:
    """One topology update of one layer. Returns ``(new_mask, n_drop, n_grow)``. ``n_active``: the mask's active
    count when the caller knows it (saves counting it, a host sync).

    1. ``n_needed = n_active - target_active`` (positive when sparsity must rise);
    2. ``n_drop = max(floor(zeta * n_active), n_needed)``, ``n_grow = n_drop - n_needed``;
    3. drop the ``n_drop`` active weights of smallest ``|w|``;
    4. grow ``n_grow`` among the inactive positions (just-dropped ones included) by ``grow_method``.
    The new mask has exactly ``target_active`` active entries.
    """
    if grow_method not in GROW_FUNCTIONS:
        raise ValueError(f"Unknown grow method {grow_method!r}; choose one of {sorted(GROW_FUNCTIONS)}.")
    if grad is None and grow_method != "random":
        raise ValueError(f"Grow method {grow_method!r} needs the dense gradient, but the weight has no `.grad`.")
    n_active = int(mask.sum().item()) if n_active is None else n_active
    n_needed = n_active - target_active
    n_drop = max(int(math.floor(drop_fraction * n_active)), n_needed)
    n_grow = n_drop - n_needed
    dropped = drop_by_magnitude(weight, mask, n_drop)
    grown = GROW_FUNCTIONS[grow_method](
        dropped, grad, n_grow, generator=generator, gradient_fraction=gradient_fraction
    )
    return grown, n_drop, n_grow


def random_mask(shape: tuple[int, ...], n_active: int, generator: torch.Generator, device=None) -> torch.Tensor:
    """A mask with exactly ``n_active`` active entries placed uniformly at random."""
    empty = torch.zeros(shape, dtype=torch.bool, device=device)
    return grow_random(empty, None, n_active, generator=generator)


# --------------------------------------------------------------------------- block structure
# With ``sparsity_structure="block"`` a mask is constant on square ``block x block`` tiles of the stored weight
# (edge tiles may be partial), so a block-sparse kernel can skip whole tiles. Drop and grow then run the same
# functions as above on one score per tile: the tile's L2 norm of |w| (drop the weakest tiles) and of the dense
# gradient (grow where a gradient step would lower the loss fastest: a step of size eta on tile B lowers the loss by
# about eta * ||g_B||^2). With ``block=1`` both reduce to the element rules.


def block_grid(shape: tuple[int, int], block: int) -> tuple[int, int]:
    """Number of tiles along each dimension (edge tiles partial)."""
    return -(-shape[0] // block), -(-shape[1] // block)


def block_norms(t: torch.Tensor, block: int) -> torch.Tensor:
    """L2 norm of every ``block x block`` tile of a 2-D tensor: ``(R, C) -> (ceil(R/b), ceil(C/b))`` (float32)."""
    rows, cols = block_grid(tuple(t.shape), block)
    padded = torch.nn.functional.pad(t.detach().float(), (0, cols * block - t.shape[1], 0, rows * block - t.shape[0]))
    return padded.view(rows, block, cols, block).square().sum(dim=(1, 3)).sqrt()


def expand_blocks(block_mask: torch.Tensor, block: int, shape: tuple[int, int]) -> torch.Tensor:
    """The element mask of a tile mask, cropped to ``shape``."""
    full = block_mask.repeat_interleave(block, dim=0).repeat_interleave(block, dim=1)
    return full[: shape[0], : shape[1]].contiguous()


def tile_mask(mask: torch.Tensor, block: int) -> torch.Tensor:
    """The tile mask of a block-constant element mask (reads each tile's first element)."""
    return mask[::block, ::block].contiguous()


def active_tiles(shape: tuple[int, int], block: int, density: float) -> int:
    """Tiles to keep active for a layer at ``density`` (counted in tiles; exact for full tiles)."""
    rows, cols = block_grid(shape, block)
    return active_count(rows * cols, density)


def evolve_blocks(mask, weight, grad, target_tiles, drop_fraction, grow_method, block, generator=None,
                  gradient_fraction: float = 0.75) -> tuple[torch.Tensor, int, int]:
    """:func:`evolve` on tiles: returns ``(new element mask, tiles dropped, tiles grown)``; the new mask has
    exactly ``target_tiles`` active tiles."""
    shape = tuple(mask.shape)
    tiles, dropped, grown = evolve(
        tile_mask(mask, block), block_norms(weight, block), None if grad is None else block_norms(grad, block),
        target_tiles, drop_fraction, grow_method, generator=generator, gradient_fraction=gradient_fraction,
    )
    return expand_blocks(tiles, block, shape), dropped, grown


def random_block_mask(shape: tuple[int, int], n_tiles: int, block: int, generator: torch.Generator,
                      device=None) -> torch.Tensor:
    """An element mask with exactly ``n_tiles`` active tiles placed uniformly at random."""
    tiles = random_mask(block_grid(shape, block), n_tiles, generator, device)
    return expand_blocks(tiles, block, shape)
