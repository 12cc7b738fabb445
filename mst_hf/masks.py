"""`MaskState`: the binary masks of the sparsified weights, keyed by parameter name.

The state is kept apart from the policy that evolves it (``mst_hf.topology`` and ``mst_hf.controller``). It applies
the masks to weights, gradients and optimizer moments in place (no re-parametrisation: parameter names and
checkpoints stay those of the plain model) and serialises them bit-packed.
"""

import hashlib
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bit-pack a boolean mask into a flat uint8 tensor (8 positions per byte, little bit order)."""
    bits = np.packbits(mask.detach().flatten().to("cpu", torch.uint8).numpy(), bitorder="little")
    return torch.from_numpy(bits)


SHAPE_SUFFIX = ".__shape__"  # state_dict key of a mask's shape: f"{name}{SHAPE_SUFFIX}"


def check_shapes(shapes: Mapping[str, tuple], expected: Mapping[str, object], where: str, exact: bool = True) -> None:
    """Refuse saved entries that do not fit a model: the one name/shape check of the package.

    ``shapes``: name -> shape found in a file (masks, weights); ``expected``: name -> tensor (or shape) of the model.
    Refuses (``ValueError`` naming ``where``, the names and both shapes) a name the model does not have, a shape
    that differs, and, with ``exact=True``, a model entry the file lacks."""
    missing = sorted(set(expected) - set(shapes)) if exact else []
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{where} does not match the model: missing entries for {missing[:5]}, unexpected entries "
            f"{unexpected[:5]} (of {len(shapes)} in the file, {len(expected)} in the model); it belongs to another "
            "model. Load what was saved from the same model architecture and MST target modules."
        )
    for name, shape in shapes.items():
        want = tuple(int(x) for x in getattr(expected[name], "shape", expected[name]))
        if tuple(int(x) for x in shape) != want:
            raise ValueError(f"{where}: `{name}` has shape {tuple(shape)} but the model's parameter has shape {want}: "
                             "it belongs to another model. Load what was saved from this model.")


def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over ``name`` then the raw bytes of ``tensors[name]``, in name order: the one digest of the package.

    Of bit-packed masks (``{name: pack_mask(mask)}``) it is :meth:`MaskState.digest`, equal on every rank when the
    masks agree and stored in ``mst_masks.safetensors``; of a compact file's tensors it is the payload digest that
    ``mst_sparse.safetensors`` stores. A stored digest that no longer matches exposes any byte changed on disk."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


_FINGERPRINT_MULTIPLIER = -7046029254386353131  # 0x9E3779B97F4A7C15 (the 64-bit golden ratio) as a signed int64


def mask_fingerprint(mask: torch.Tensor) -> torch.Tensor:
    """A 0-d int64 tensor on the mask's device that identifies its active positions: the sum, wrapping mod 2**64,
    of a hash of each active position's flat index, plus the active count. Equal masks give equal fingerprints on
    every rank with no host sync; ranks compare these few bytes instead of the masks (a sampled digest, not a
    cryptographic one: :func:`tensor_digest` is the file digest)."""
    flat = mask.reshape(-1)
    index = torch.arange(flat.numel(), device=flat.device, dtype=torch.int64)
    hashed = (index + 1) * _FINGERPRINT_MULTIPLIER  # int64 multiplication wraps: a deterministic scramble
    hashed = hashed ^ (hashed >> 29)
    return torch.where(flat, hashed, 0).sum() + flat.sum()


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_mask`."""
    numel = int(np.prod(shape)) if len(shape) else 1
    expected = (numel + 7) // 8
    if packed.dtype != torch.uint8 or packed.numel() != expected:
        raise ValueError(
            f"Packed mask has {packed.numel()} {packed.dtype} bytes; a mask of shape {tuple(shape)} needs {expected} "
            "uint8 bytes. The mask file does not belong to this model."
        )
    bits = np.unpackbits(packed.cpu().numpy(), count=numel, bitorder="little")
    return torch.from_numpy(bits.astype(np.bool_)).view(shape)


class PlainLayout:
    """Where a parameter's mask lives: for a plain parameter, the stored mask is the whole mask.

    :class:`MaskState` asks its layout these five things, so that sharded parameters need no code here:
    ``mst_hf.sharding`` answers the same five for FSDP2 parameters (``DTensor``; the stored mask is then the
    local shard of the full mask)."""

    @staticmethod
    def local(tensor):
        """The part of a parameter, gradient or optimizer state that this process holds."""
        return tensor

    @staticmethod
    def full_mask(mask, param):
        """The full mask from the stored ``mask`` of ``param``."""
        return mask

    @staticmethod
    def local_mask(mask, param):
        """The mask to store for ``param`` from its full ``mask``."""
        return mask

    @staticmethod
    def global_count(mask, param) -> int:
        """Active entries of the full mask whose stored part is ``mask``."""
        return int(mask.sum().item())

    @staticmethod
    def all_ranks(flag: bool, params) -> bool:
        """Whether ``flag``, computed on this process's parts of ``params``, holds for the full tensors."""
        return flag


class MaskState:
    """Masks (``True`` = active) for a set of named parameters.

    ``masks`` (optional) are full masks (global shapes); ``layout`` says how a mask is stored for its parameter
    (default :class:`PlainLayout`: whole; ``mst_hf.sharding`` for FSDP2, where each process keeps the shard of
    the mask that matches its shard of the parameter). Counts, densities, digests and saved masks are always
    those of the full masks."""

    def __init__(self, params: dict[str, nn.Parameter], masks: dict[str, torch.Tensor] | None = None, layout=None):
        self.params = dict(params)
        self.layout = PlainLayout if layout is None else layout
        self._active: dict[str, int] = {}  # cached counts (a count is a host sync: only recount after a change)
        self.untouched = masks is None  # every mask all-ones as built: nothing was ever set, loaded or pruned
        if masks is None:
            local = {n: self.layout.local(p) for n, p in self.params.items()}
            self.masks = {n: torch.ones_like(t, dtype=torch.bool) for n, t in local.items()}
            self._active = {n: p.numel() for n, p in self.params.items()}
        else:
            missing = sorted(set(self.params) - set(masks))
            if missing:
                raise ValueError(f"No mask given for parameters {missing}.")
            self.masks = {}
            for n, p in self.params.items():
                self._store(n, masks[n].to(device=p.device, dtype=torch.bool))
        self._lists = None
        self._zeros: dict = {}

    def _store(self, name: str, full: torch.Tensor) -> None:
        """Keep this process's part of the full mask ``full`` of ``name``; a shard is counted now (it cannot count
        the full mask later without communication), a whole mask when first asked."""
        self.untouched = False
        self.masks[name] = self.layout.local_mask(full, self.params[name])
        if self.masks[name] is full:
            self._active.pop(name, None)
        else:
            self._active[name] = int(full.sum().item())

    def full_mask(self, name: str) -> torch.Tensor:
        """The full mask of ``name`` (global shape; a collective when the parameter is sharded)."""
        return self.layout.full_mask(self.masks[name], self.params[name])

    def rebind(self, params: dict[str, nn.Parameter]) -> None:
        """Point masks at new parameter objects of the same names and global shapes, e.g. the ``DTensor``
        parameters with which FSDP2's ``fully_shard`` replaces a model's parameters; each mask is re-cut to the
        new parameter's shard. A collective when an old parameter was sharded (call it on every rank)."""
        for name, new in params.items():
            old = self.params[name]
            if new is old:
                continue
            if tuple(new.shape) != tuple(old.shape):
                raise ValueError(f"Cannot move the mask of `{name}` from a parameter of shape {tuple(old.shape)} to "
                                 f"one of shape {tuple(new.shape)}: the model changed shape.")
            count, full = self.active(name), self.full_mask(name).to(new.device)
            self.params[name] = new
            self._store(name, full)
            self._active[name] = count
        self._lists = None

    # ------------------------------------------------------------------ applying
    def _tensor_lists(self):
        if self._lists is None:
            names = list(self.params)
            self._lists = ([self.params[n] for n in names], [self.masks[n] for n in names])
        return self._lists

    def _sync_devices(self) -> None:
        for n, p in self.params.items():
            if self.masks[n].device != p.device:
                self.masks[n] = self.masks[n].to(p.device)
                self._lists = None

    def _zero(self, like: torch.Tensor) -> torch.Tensor:
        """A cached 0-d zero of ``like``'s dtype and device (the fill value of :meth:`_keep_active`)."""
        key = (like.device, like.dtype)
        if key not in self._zeros:
            self._zeros[key] = torch.zeros((), dtype=like.dtype, device=like.device)
        return self._zeros[key]

    def _keep_active(self, tensors, masks) -> None:
        """``t = where(mask, t, 0)`` in place. A select, not a product: NaN or inf at a pruned position becomes 0
        (``nan * 0`` is NaN), while non-finite values at active positions stay for the caller (e.g. GradScaler) to see.
        """
        for t, m in zip(tensors, masks):
            torch.where(m, t, self._zero(t), out=t)

    @torch.no_grad()
    def apply_to_weights(self) -> None:
        """Zero every pruned weight (as +0.0, so sparse files round-trip bit-exactly)."""
        params, masks = self._tensor_lists()
        if params[0].device != masks[0].device:
            self._sync_devices()
            params, masks = self._tensor_lists()
        data = [self.layout.local(p).data for p in params]
        self._keep_active(data, masks)
        torch._foreach_add_(data, 0.0)  # -0.0 + 0.0 == +0.0

    @torch.no_grad()
    def apply_to_grads(self) -> None:
        """Zero the gradient of every pruned weight (before the optimizer step)."""
        params, masks = self._tensor_lists()
        pairs = [(self.layout.local(p.grad), m) for p, m in zip(params, masks) if p.grad is not None]
        if pairs:
            self._keep_active([g for g, _ in pairs], [m for _, m in pairs])

    @torch.no_grad()
    def grads_finite(self) -> bool:
        """Whether every gradient of the masked weights is finite (one host sync; only called at update steps)."""
        grads = [self.layout.local(p.grad) for p in self.params.values() if p.grad is not None]
        finite = bool(torch.stack([torch.isfinite(g).all() for g in grads]).all().item()) if grads else True
        return self.layout.all_ranks(finite, self.params.values())

    @torch.no_grad()
    def set_mask(self, name: str, new_mask: torch.Tensor, optimizer=None, regrow_optimizer_state: str = "zero",
                 regrow_init: str = "zero", regrow_init_scale: float = 0.1) -> tuple[int, int]:
        """Replace one mask. Removed weights are zeroed; added weights start at 0; the optimizer state of every
        changed position (Adam's ``exp_avg``/``exp_avg_sq``, SGD momentum, ...) is zeroed. ``new_mask`` is the full
        mask (global shape). Returns ``(n_removed, n_added)`` relative to the old mask (a connection dropped and
        regrown at once is unchanged). With the dense gradient in ``.grad`` (a topology update),
        ``regrow_optimizer_state="warm"`` and ``regrow_init="gradient"`` start the added positions from it instead
        (:func:`warm_regrown`). ``regrow_optimizer_state="restart"`` needs an optimizer that counts steps per element
        (:class:`mst_hf.optim.ElementwiseAdamW`): zeroing the state zeroes those counts too, so a regrown weight's
        bias correction restarts at step 1. An optimizer with moments per active tile (``stores_active_tiles``:
        :mod:`mst_hf.optim_active`) remaps its state to the new tiles first (it refuses an unstructured mask), and
        takes ``regrow_optimizer_state="zero"``."""
        tiles = inner_optimizer(optimizer)
        tiles = tiles if getattr(tiles, "stores_active_tiles", False) else None
        if tiles is not None and regrow_optimizer_state != "zero":
            raise ValueError(
                f"regrow_optimizer_state={regrow_optimizer_state!r} sets per-element optimizer state of regrown "
                f"weights, but {type(tiles).__name__} keeps moments per active tile (optimizer_state='active'). Set "
                "`regrow_optimizer_state='zero'` (new tiles start from zero moments) or `optimizer_state='dense'`."
            )
        if regrow_optimizer_state == "restart" and optimizer is not None and not counts_element_steps(optimizer):
            raise ValueError(
                f"regrow_optimizer_state='restart' restarts the bias correction of each regrown weight, which needs "
                f"an optimizer with a step count per element; got {type(optimizer).__name__}. Use "
                "mst_hf.optim.ElementwiseAdamW (MSTTrainer creates one for this setting) or set "
                "`regrow_optimizer_state='zero'`."
            )
        param, old, old_count = self.params[name], self.masks[name], self._active.get(name)
        tracked = tiles is not None and tiles.tracks(param)
        if tracked:
            tiles.remap(param, new_mask)
        self._store(name, new_mask.to(device=old.device, dtype=torch.bool))
        new = self.masks[name]  # this process's part (all of it unless sharded): every change below is local
        removed = old & ~new
        added = new & ~old
        changed = removed | added
        self.layout.local(param).data.masked_fill_(changed, 0.0)
        if optimizer is not None and not tracked:
            zero_optimizer_state(optimizer, param, changed, self.layout)
        if param.grad is not None and (regrow_optimizer_state == "warm" or regrow_init == "gradient"):
            warm_regrown(param, old & new, added, optimizer if regrow_optimizer_state == "warm" else None,
                         regrow_init_scale if regrow_init == "gradient" else None, self.layout)
        self._lists = None
        n_removed, n_added = self.layout.global_count(removed, param), self.layout.global_count(added, param)
        if name not in self._active and old_count is not None:  # the new count, known without a recount (a sync)
            self._active[name] = old_count - n_removed + n_added
        return n_removed, n_added

    # ------------------------------------------------------------------ reading
    def active(self, name: str) -> int:
        """Number of active connections of one matrix (cached until its mask changes)."""
        if name not in self._active:
            self._active[name] = self.layout.global_count(self.masks[name], self.params[name])
        return self._active[name]

    def density(self, name: str) -> float:
        return self.active(name) / self.params[name].numel()

    def layer_sparsities(self) -> dict[str, float]:
        return {n: 1.0 - self.density(n) for n in self.masks}

    def sparsity(self) -> float:
        """Global sparsity over all masked weights."""
        total = sum(p.numel() for p in self.params.values())
        active = sum(self.active(n) for n in self.masks)
        return 1.0 - active / total

    def digest(self) -> str:
        """SHA-256 of all masks (in name order): equal on every rank when masks agree (a collective when sharded)."""
        return tensor_digest({name: pack_mask(self.full_mask(name)) for name in self.masks})

    # ------------------------------------------------------------------ (de)serialisation
    def state_dict(self) -> dict[str, torch.Tensor]:
        """``{name: packed uint8 bits}`` plus ``{name + ".__shape__": int64 shape}`` (safetensors-ready) of the full
        masks (when sharded, a collective gathering one mask at a time: call it on every rank)."""
        out = {}
        for name in self.masks:
            mask = self.full_mask(name)
            out[name] = pack_mask(mask)
            out[name + SHAPE_SUFFIX] = torch.tensor(list(mask.shape), dtype=torch.int64)
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor], apply: bool = True) -> None:
        """Load masks saved by :meth:`state_dict`; refuses files whose names or shapes do not match the model."""
        shapes = {}
        for name in (k for k in state if not k.endswith(SHAPE_SUFFIX)):
            if name + SHAPE_SUFFIX not in state:
                raise ValueError(f"Mask file has no shape entry for `{name}`: it is not an mst_hf mask file.")
            shapes[name] = tuple(int(x) for x in state[name + SHAPE_SUFFIX].tolist())
        check_shapes(shapes, self.params, "Mask file")
        self._active = {}
        for name, param in self.params.items():  # one full mask at a time
            self._store(name, unpack_mask(state[name], shapes[name]).to(param.device))
        self._lists = None
        if apply:
            self.apply_to_weights()


def zero_optimizer_state(optimizer, param: torch.Tensor, positions: torch.Tensor, layout=PlainLayout) -> None:
    """Zero, at ``positions`` (of this process's part of ``param``, see ``layout``), every per-element state tensor
    the optimizer keeps for ``param``."""
    state = optimizer.state.get(param)
    if not state:
        return
    for value in state.values():
        if torch.is_tensor(value) and value.shape == param.shape:
            layout.local(value).masked_fill_(positions.to(value.device), 0)


def inner_optimizer(optimizer):
    """The torch optimizer itself: ``optimizer``, or the one inside accelerate's ``AcceleratedOptimizer``."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def counts_element_steps(optimizer) -> bool:
    """Whether ``optimizer`` (or the torch optimizer inside accelerate's ``AcceleratedOptimizer``) keeps a step count
    per element in its state (``counts_element_steps = True``, as :class:`mst_hf.optim.ElementwiseAdamW`)."""
    return bool(getattr(inner_optimizer(optimizer), "counts_element_steps", False))


def _adam_betas(optimizer, param) -> tuple[float, float] | None:
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            betas = group.get("betas")
            return (float(betas[0]), float(betas[1])) if betas is not None else None
    return None


@torch.no_grad()
def warm_regrown(param, kept: torch.Tensor, added: torch.Tensor, optimizer=None, init_scale: float | None = None,
                 layout=PlainLayout) -> None:
    """Start regrown connections (``added``) from the dense gradient ``g = param.grad`` the update already has.

    * ``optimizer`` given (``regrow_optimizer_state="warm"``), Adam-style state only (``exp_avg``, ``exp_avg_sq``,
      ``betas``): the moments the weight would hold had its gradient been ``g`` at each of the ``k`` steps taken so
      far, ``m = g (1 - b1^k)``, ``v = g^2 (1 - b2^k)`` (``max_exp_avg_sq`` too). With the shared bias correction of
      step ``k + 1`` the next update is then ``lr * sign(g)`` where zeroed moments give
      ``(1 - b1) / sqrt(1 - b2) ~ 3.2`` times that for ``b2 = 0.999``. Other optimizers keep zeroed state.
    * ``init_scale`` given (``regrow_init="gradient"``): ``w = -init_scale * mean(|w_kept|) * g / rms(g_added)``, a
      small step against the gradient whose RMS is ``init_scale`` times the typical magnitude of the layer's kept
      weights (no change when the layer keeps no weight or the added gradients are all 0).

    Works on this process's part of a sharded parameter (``layout``): statistics are then those of the shard."""
    grad, data = layout.local(param.grad), layout.local(param).data
    added = added.to(grad.device)
    if not bool(added.any()):
        return
    g = grad[added].float()
    if init_scale is not None:
        kept = kept.to(data.device)
        rms = g.pow(2).mean().sqrt()
        if bool(kept.any()) and float(rms) > 0:
            typical = data[kept].abs().float().mean()
            data[added] = (-init_scale * typical * g / rms).to(data.dtype)
    if optimizer is None:
        return
    state = optimizer.state.get(param)
    betas = _adam_betas(optimizer, param)
    if not state or betas is None or "exp_avg" not in state or "exp_avg_sq" not in state:
        return
    k = float(state["step"]) if "step" in state else 0.0
    b1, b2 = betas
    for key, value in (("exp_avg", g * (1.0 - b1**k)), ("exp_avg_sq", g * g * (1.0 - b2**k)),
                       ("max_exp_avg_sq", g * g * (1.0 - b2**k))):
        if key in state and torch.is_tensor(state[key]) and state[key].shape == param.shape:
            target = layout.local(state[key])
            target[added.to(target.device)] = value.to(target.dtype)
