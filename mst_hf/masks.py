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


class MaskState:
    """Masks (``True`` = active) for a set of named parameters."""

    def __init__(self, params: dict[str, nn.Parameter], masks: dict[str, torch.Tensor] | None = None):
        self.params = dict(params)
        if masks is None:
            masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in self.params.items()}
        missing = sorted(set(self.params) - set(masks))
        if missing:
            raise ValueError(f"No mask given for parameters {missing}.")
        self.masks = {n: masks[n].to(device=p.device, dtype=torch.bool) for n, p in self.params.items()}
        self._lists = None
        self._active: dict[str, int] = {}  # cached counts (a count is a host sync: only recount after a change)
        self._zeros: dict = {}

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
        data = [p.data for p in params]
        self._keep_active(data, masks)
        torch._foreach_add_(data, 0.0)  # -0.0 + 0.0 == +0.0

    @torch.no_grad()
    def apply_to_grads(self) -> None:
        """Zero the gradient of every pruned weight (before the optimizer step)."""
        params, masks = self._tensor_lists()
        pairs = [(p.grad, m) for p, m in zip(params, masks) if p.grad is not None]
        if pairs:
            self._keep_active([g for g, _ in pairs], [m for _, m in pairs])

    @torch.no_grad()
    def grads_finite(self) -> bool:
        """Whether every gradient of the masked weights is finite (one host sync; only called at update steps)."""
        grads = [p.grad for p in self.params.values() if p.grad is not None]
        if not grads:
            return True
        return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all().item())

    @torch.no_grad()
    def set_mask(self, name: str, new_mask: torch.Tensor, optimizer=None) -> tuple[int, int]:
        """Replace one mask. Removed weights are zeroed; added weights start at 0; the optimizer state of every
        changed position (Adam's ``exp_avg``/``exp_avg_sq``, SGD momentum, ...) is zeroed. Returns
        ``(n_removed, n_added)`` relative to the old mask (a connection dropped and regrown at once is unchanged)."""
        param, old = self.params[name], self.masks[name]
        new_mask = new_mask.to(device=old.device, dtype=torch.bool)
        removed = old & ~new_mask
        added = new_mask & ~old
        changed = removed | added
        param.data.masked_fill_(changed, 0.0)
        if optimizer is not None:
            zero_optimizer_state(optimizer, param, changed)
        self.masks[name] = new_mask
        self._lists = None
        self._active.pop(name, None)
        return int(removed.sum().item()), int(added.sum().item())

    # ------------------------------------------------------------------ reading
    def active(self, name: str) -> int:
        """Number of active connections of one matrix (cached until its mask changes)."""
        if name not in self._active:
            self._active[name] = int(self.masks[name].sum().item())
        return self._active[name]

    def density(self, name: str) -> float:
        return self.active(name) / self.masks[name].numel()

    def layer_sparsities(self) -> dict[str, float]:
        return {n: 1.0 - self.density(n) for n in self.masks}

    def sparsity(self) -> float:
        """Global sparsity over all masked weights."""
        total = sum(m.numel() for m in self.masks.values())
        active = sum(self.active(n) for n in self.masks)
        return 1.0 - active / total

    def digest(self) -> str:
        """SHA-256 of all masks (in name order): equal on every rank when masks agree."""
        return tensor_digest({name: pack_mask(mask) for name, mask in self.masks.items()})

    # ------------------------------------------------------------------ (de)serialisation
    def state_dict(self) -> dict[str, torch.Tensor]:
        """``{name: packed uint8 bits}`` plus ``{name + ".__shape__": int64 shape}`` (safetensors-ready)."""
        out = {}
        for name, mask in self.masks.items():
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
        loaded = {name: unpack_mask(state[name], shapes[name]).to(param.device) for name, param in self.params.items()}
        self.masks = loaded
        self._lists = None
        self._active = {}
        if apply:
            self.apply_to_weights()


def zero_optimizer_state(optimizer, param: torch.Tensor, positions: torch.Tensor) -> None:
    """Zero, at ``positions``, every per-element state tensor the optimizer keeps for ``param``."""
    state = optimizer.state.get(param)
    if not state:
        return
    for value in state.values():
        if torch.is_tensor(value) and value.shape == param.shape:
            value.masked_fill_(positions.to(value.device), 0)
