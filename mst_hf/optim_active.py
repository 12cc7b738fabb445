"""`ActiveTileAdamW`: AdamW whose moments cover the active tiles of block-structured masks only.

With ``sparsity_structure="block"`` every mask is constant on ``B x B`` tiles of the stored weight. torch's AdamW
keeps ``exp_avg`` and ``exp_avg_sq`` for every element, so at 90% sparsity nine tenths of its state hold zeros. For a
parameter registered with :meth:`ActiveTileAdamW.track`, this optimizer keeps, with ``R x C`` tiles
(``R = ceil(rows / B)``, ``C = ceil(cols / B)``; edge tiles may be partial)::

    state["exp_avg"], state["exp_avg_sq"]  (n_active, B, B), the parameter's dtype (as torch's AdamW)
    state["tile_index"]                    (n_active,) int64, ascending: tile (r, c) is r * C + c
    state["tile_block"]                    B (an int)
    state["step"]                          one count per parameter, as torch's AdamW

which is ``8 * density * (1 + 1 / B^2)`` bytes per fp32 weight (the index adds 8 bytes per active tile) where
torch keeps 8. Each step it gathers the active tiles of the weight and of its gradient, runs torch's own
single-tensor AdamW on them (``torch.optim.adamw.adamw``, ``foreach=False``, so every active element gets the bits
torch's AdamW gives it), and scatters them back; pruned elements are never written and stay ``+0.0``. Parameters
that are not tracked are updated exactly as torch's AdamW (``foreach=False``) updates them.

A mask change (:meth:`mst_hf.MaskState.set_mask`) calls :meth:`ActiveTileAdamW.remap`: kept tiles keep their
moments, new tiles start from zero moments, dropped tiles are forgotten, and the parameter's step count goes on:
what ``regrow_optimizer_state="zero"`` gives with torch's AdamW. ``state_dict``/``load_state_dict`` round-trip the
compact state; the saved tile index is authoritative.
"""

from itertools import chain

import torch
import torch.nn.functional as F
from torch.optim.adamw import adamw as torch_adamw

from . import sharding, topology
from .masks import inner_optimizer
from .optim import refuse_amsgrad_and_maximize, run_closure

TILE_INDEX = "tile_index"  # (n_active,) int64 flat tile index r * C + c, ascending
TILE_BLOCK = "tile_block"  # the tile side B (an int)
MOMENTS = ("exp_avg", "exp_avg_sq")


def block_tiles(mask: torch.Tensor, block: int) -> torch.Tensor:
    """The ``(R, C)`` tile mask of an element ``mask`` that is constant on ``block x block`` tiles (edge tiles may be
    partial); a ``ValueError`` when it is not (an unstructured mask)."""
    tiles = topology.tile_mask(mask, block)
    if not torch.equal(topology.expand_blocks(tiles, block, tuple(mask.shape)), mask.bool()):
        raise ValueError(
            f"ActiveTileAdamW keeps AdamW moments per {block}x{block} tile, but a mask of shape {tuple(mask.shape)} "
            "is not constant on its tiles (an unstructured mask). Use block-structured masks "
            "(`sparsity_structure='block'`) or the dense optimizer (`optimizer_state='dense'`, torch.optim.AdamW)."
        )
    return tiles


class _Tiles:
    """The ``(R, C, B, B)`` tile view of a 2-D tensor and the ``(n, B, B)`` gather/scatter at a tile index. A tensor
    whose sides ``B`` divides (and contiguous) is viewed in place; another one is padded with zeros into a work copy
    that :meth:`scatter` copies back."""

    def __init__(self, tensor: torch.Tensor, block: int, index: torch.Tensor):
        rows, cols = tensor.shape
        n_rows, n_cols = topology.block_grid((rows, cols), block)
        self.tensor = tensor
        self.direct = tensor.is_contiguous() and (rows, cols) == (n_rows * block, n_cols * block)
        self.work = tensor if self.direct else F.pad(tensor, (0, n_cols * block - cols, 0, n_rows * block - rows))
        self.grid = self.work.view(n_rows, block, n_cols, block).transpose(1, 2)  # (R, C, B, B)
        self.r, self.c = index // n_cols, index % n_cols

    def gather(self) -> torch.Tensor:
        return self.grid[self.r, self.c]  # (n, B, B), a copy

    def scatter(self, tiles: torch.Tensor) -> None:
        self.grid[self.r, self.c] = tiles
        if not self.direct:
            self.tensor.copy_(self.work[: self.tensor.shape[0], : self.tensor.shape[1]])


def _adamw_(param, grad, exp_avg, exp_avg_sq, step_t, lr, beta1, beta2, weight_decay, eps) -> None:
    """One AdamW step in place, by torch's own single-tensor AdamW (``torch.optim.adamw.adamw``, ``foreach=False``):
    the same bits torch's optimizer gives an element."""
    torch_adamw([param], [grad], [exp_avg], [exp_avg_sq], [], [step_t], foreach=False, amsgrad=False,
                            beta1=beta1, beta2=beta2, lr=lr, weight_decay=weight_decay, eps=eps, maximize=False)


def _new_step() -> torch.Tensor:
    """A step count as torch's AdamW creates it (float32, float64 under a float64 default dtype; on the CPU)."""
    return torch.zeros((), dtype=torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32)


class ActiveTileAdamW(torch.optim.AdamW):
    """``ActiveTileAdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)``: torch's AdamW
    (decoupled weight decay, one step count per parameter) with compact moments for tracked parameters (module
    docstring). ``amsgrad``, ``maximize`` and the fused, foreach, capturable and differentiable variants are not
    offered."""

    stores_active_tiles = True  # what mst_hf.MaskState.set_mask checks: remap instead of zeroing dense moments
    leaves_pruned_zero = True  # pruned tiles are never written: no re-masking of weights after the step

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=False, fused=False)

    # ------------------------------------------------------------------ tracking
    def tracks(self, param) -> bool:
        """Whether ``param``'s moments are kept per active tile."""
        return TILE_INDEX in self.state.get(param, {})

    def track(self, param: torch.nn.Parameter, tile_mask: torch.Tensor, block: int) -> None:
        """Keep ``param``'s moments for the tiles ``tile_mask`` (bool ``(R, C)``, ``R = ceil(rows / block)``,
        ``C = ceil(cols / block)``) marks active. Existing dense moments are cut down to those tiles (they should be
        zero elsewhere); a tracked parameter is remapped (:meth:`remap`)."""
        if not any(p is param for p in chain.from_iterable(g["params"] for g in self.param_groups)):
            raise ValueError("ActiveTileAdamW.track: the parameter is not one of this optimizer's parameters.")
        if sharding.is_sharded(param):
            raise NotImplementedError(
                "ActiveTileAdamW does not run on FSDP2-sharded (DTensor) weights: a tile may span shards. Set "
                "`optimizer_state='dense'` to train with FSDP2."
            )
        if isinstance(block, bool) or not isinstance(block, int) or block < 1:
            raise ValueError(f"`block` must be a positive int (the tile side), got {block!r}.")
        if param.dim() != 2:
            raise ValueError(f"ActiveTileAdamW tracks 2-D weights only, got a parameter of shape {tuple(param.shape)}")
        grid = topology.block_grid(tuple(param.shape), block)
        if not isinstance(tile_mask, torch.Tensor) or tuple(tile_mask.shape) != grid:
            got = tuple(tile_mask.shape) if isinstance(tile_mask, torch.Tensor) else type(tile_mask).__name__
            raise ValueError(f"`tile_mask` of a {tuple(param.shape)} weight at block {block} must have shape {grid} "
                             f"(tiles), got {got}.")
        index = tile_mask.to(param.device).reshape(-1).nonzero().squeeze(1)  # (n_active,) int64, ascending
        state = self.state[param]
        if TILE_INDEX in state:
            if state[TILE_BLOCK] != block:
                raise ValueError(f"This parameter is tracked with {state[TILE_BLOCK]}x{state[TILE_BLOCK]} tiles, "
                                 f"got block={block}; the tile side cannot change during a run.")
            self._move(param, index)
        else:
            self._compact(param, block, index)

    def remap(self, param: torch.nn.Parameter, new_mask: torch.Tensor) -> None:
        """The compact state of a tracked ``param`` for its new element mask ``new_mask`` (the weight's shape, constant
        on tiles): kept tiles keep their moments, new tiles get zero moments, dropped tiles are forgotten; the step
        count goes on. A ``ValueError`` for a mask that is not block-structured (nothing is changed then)."""
        if not self.tracks(param):
            raise ValueError("ActiveTileAdamW.remap: the parameter is not tracked; call `track` first.")
        state = self.state[param]
        if tuple(new_mask.shape) != tuple(param.shape):
            raise ValueError(f"`new_mask` has shape {tuple(new_mask.shape)}, the parameter {tuple(param.shape)}.")
        tiles = block_tiles(new_mask.to(param.device), state[TILE_BLOCK])
        self._move(param, tiles.reshape(-1).nonzero().squeeze(1))

    def _compact(self, param, block: int, index: torch.Tensor) -> None:
        """Start tracking ``param`` at ``index``: dense moments (if any) gathered there, else zeros."""
        state = self.state[param]
        state.setdefault("step", _new_step())
        for key in MOMENTS:
            dense = state.get(key)
            if dense is not None and tuple(dense.shape) == tuple(param.shape):
                state[key] = _Tiles(dense, block, index).gather()
            else:
                state[key] = param.new_zeros((index.numel(), block, block))
        state[TILE_INDEX], state[TILE_BLOCK] = index, block

    def _move(self, param, index: torch.Tensor) -> None:
        """Rebuild the compact moments of a tracked ``param`` at the new tile ``index``."""
        state = self.state[param]
        old, block = state[TILE_INDEX], state[TILE_BLOCK]
        n_tiles = topology.block_grid(tuple(param.shape), block)
        slot = torch.full((n_tiles[0] * n_tiles[1],), -1, dtype=torch.int64, device=old.device)
        slot[old] = torch.arange(old.numel(), device=old.device)
        source = slot[index.to(old.device)]  # (n_new,) row of each new tile in the old state; -1: a new tile
        kept = source >= 0
        for key in MOMENTS:
            moved = state[key].new_zeros((index.numel(), block, block))
            moved[kept] = state[key][source[kept]]
            state[key] = moved
        state[TILE_INDEX] = index.to(old.device)

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure=None):
        loss = run_closure(closure)
        for group in self.param_groups:
            refuse_amsgrad_and_maximize(group, "ActiveTileAdamW", "torch.optim.AdamW (`optimizer_state='dense'`)")
            hyper = dict(lr=float(group["lr"]), beta1=float(group["betas"][0]), beta2=float(group["betas"][1]),
                         weight_decay=group["weight_decay"], eps=group["eps"])
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise NotImplementedError("ActiveTileAdamW does not take sparse gradients.")
                state = self.state[param]
                if not state:
                    state["step"] = _new_step()
                    for key in MOMENTS:
                        state[key] = torch.zeros_like(param, memory_format=torch.preserve_format)
                if TILE_INDEX not in state:
                    _adamw_(param, param.grad, state["exp_avg"], state["exp_avg_sq"], state["step"], **hyper)
                    continue
                weights = _Tiles(param.data, state[TILE_BLOCK], state[TILE_INDEX])
                tiles = weights.gather()  # (n_active, B, B)
                grads = _Tiles(param.grad, state[TILE_BLOCK], state[TILE_INDEX]).gather()
                _adamw_(tiles, grads, state["exp_avg"], state["exp_avg_sq"], state["step"], **hyper)
                weights.scatter(tiles)
        return loss

    # ------------------------------------------------------------------ save / load
    def load_state_dict(self, state_dict: dict) -> None:
        """``torch.optim.Optimizer.load_state_dict`` with the tile index kept as saved (int64; the base class would
        cast it to the parameter's dtype) and checked against its moments: the saved index is authoritative. A
        parameter tracked here whose saved state is dense (from torch's AdamW) has it cut down to its tracked tiles;
        one with no saved state stays tracked, with zero moments and step 0."""
        saved_ids = list(chain.from_iterable(g["params"] for g in state_dict["param_groups"]))
        indices = {i: s[TILE_INDEX] for i, s in state_dict["state"].items() if TILE_INDEX in s}
        tracked = {p: (s[TILE_BLOCK], s[TILE_INDEX]) for p, s in self.state.items() if TILE_INDEX in s}
        super().load_state_dict(state_dict)
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for saved_id, param in zip(saved_ids, params):
            if saved_id in indices:
                state = self.state[param]
                state[TILE_INDEX] = indices[saved_id].to(device=param.device, dtype=torch.int64, copy=True)
                _check_saved(param, state, saved_id)
            elif param in tracked:
                self._compact(param, *tracked[param])


def _check_saved(param, state: dict, saved_id) -> None:
    """A ``ValueError`` unless a loaded compact state fits ``param``: an int tile side, an ascending index inside
    the tile grid, moments of ``(n_active, B, B)``."""
    block, index = state.get(TILE_BLOCK), state[TILE_INDEX]
    where = f"Optimizer state of parameter {saved_id} (shape {tuple(param.shape)})"
    if isinstance(block, bool) or not isinstance(block, int) or block < 1 or param.dim() != 2:
        raise ValueError(f"{where}: `{TILE_BLOCK}` is {block!r}, not a positive int tile side of a 2-D weight; the "
                         "optimizer file belongs to another model. Resume from a checkpoint of this run.")
    n_rows, n_cols = topology.block_grid(tuple(param.shape), block)
    ascending = index.numel() < 2 or bool((index[1:] > index[:-1]).all())
    inside = index.numel() == 0 or (int(index.min()) >= 0 and int(index.max()) < n_rows * n_cols)
    moments = all(tuple(state[k].shape) == (index.numel(), block, block) for k in MOMENTS)
    if index.dim() != 1 or not ascending or not inside or not moments:
        raise ValueError(f"{where}: the tile index ({index.numel()} tiles of a {n_rows}x{n_cols} grid) does not fit "
                         "its moments or the weight; the optimizer file belongs to another model or is corrupt. "
                         "Resume from a checkpoint of this run.")


def track_masks(optimizer, masks, block: int) -> None:
    """Track every parameter of ``masks`` (a :class:`mst_hf.MaskState` of block-structured masks) in ``optimizer``
    (an :class:`ActiveTileAdamW`, possibly inside accelerate's wrapper) with its current tiles; a parameter tracked
    already is remapped to them (after masks were loaded without :meth:`mst_hf.MaskState.set_mask`)."""
    opt = inner_optimizer(optimizer)
    if not getattr(opt, "stores_active_tiles", False):
        raise TypeError(f"`optimizer_state='active'` needs an ActiveTileAdamW, got {type(opt).__name__}. Let "
                        "MSTTrainer build the optimizer (no `optimizers=` or `optimizer_cls_and_kwargs=`), or set "
                        "`optimizer_state='dense'`.")
    for name, param in masks.params.items():
        opt.track(param, block_tiles(masks.full_mask(name), block), block)


def optimizer_state_bytes(optimizer, params=None) -> int:
    """Bytes of every tensor in ``optimizer``'s state (moments, step counts, tile indices), of ``params`` only when
    given (an iterable of parameters)."""
    opt = inner_optimizer(optimizer)
    chosen = None if params is None else {id(p) for p in params}
    return sum(v.numel() * v.element_size() for p, s in opt.state.items() if chosen is None or id(p) in chosen
               for v in s.values() if torch.is_tensor(v))
