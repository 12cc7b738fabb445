"""`MaskState`: the binary masks of the sparsified weights, keyed by parameter name.

The state is kept apart from the policy that evolves it (``mst_hf.topology`` and ``mst_hf.controller``). It applies
the masks to weights, gradients and optimizer moments in place (no re-parametrisation: parameter names and
checkpoints stay those of the plain model) and serialises them bit-packed.
"""

import hashlib

import numpy as np
import torch
from torch import nn


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bit-pack a boolean mask into a flat uint8 tensor (8 positions per byte, little bit order)."""
    bits = np.packbits(mask.detach().flatten().to("cpu", torch.uint8).numpy(), bitorder="little")
    return torch.from_numpy(bits)


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

    @torch.no_grad()
    def apply_to_weights(self) -> None:
        """Zero every pruned weight (as +0.0, so sparse files round-trip bit-exactly)."""
        params, masks = self._tensor_lists()
        if params[0].device != masks[0].device:
            self._sync_devices()
            params, masks = self._tensor_lists()
        data = [p.data for p in params]
        torch._foreach_mul_(data, masks)
        torch._foreach_add_(data, 0.0)  # -0.0 + 0.0 == +0.0

    @torch.no_grad()
    def apply_to_grads(self) -> None:
        """Zero the gradient of every pruned weight (before the optimizer step)."""
        params, masks = self._tensor_lists()
        pairs = [(p.grad, m) for p, m in zip(params, masks) if p.grad is not None]
        if pairs:
            torch._foreach_mul_([g for g, _ in pairs], [m for _, m in pairs])

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
        h = hashlib.sha256()
        for name in sorted(self.masks):
            h.update(name.encode())
            h.update(pack_mask(self.masks[name]).numpy().tobytes())
        return h.hexdigest()

    # ------------------------------------------------------------------ (de)serialisation
    def state_dict(self) -> dict[str, torch.Tensor]:
        """``{name: packed uint8 bits}`` plus ``{name + ".__shape__": int64 shape}`` (safetensors-ready)."""
        out = {}
        for name, mask in self.masks.items():
            out[name] = pack_mask(mask)
            out[name + ".__shape__"] = torch.tensor(list(mask.shape), dtype=torch.int64)
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor], apply: bool = True) -> None:
        """Load masks saved by :meth:`state_dict`; refuses files whose names or shapes do not match the model."""
        names = {k for k in state if not k.endswith(".__shape__")}
        if names != set(self.params):
            raise ValueError(
                f"Mask file does not match the model: missing masks for {sorted(set(self.params) - names)[:5]}, "
                f"unexpected masks {sorted(names - set(self.params))[:5]}. Load masks saved from the same model "
                "architecture and MST target modules."
            )
        loaded = {}
        for name, param in self.params.items():
            if name + ".__shape__" not in state:
                raise ValueError(f"Mask file has no shape entry for `{name}`: it is not an mst_hf mask file.")
            shape = tuple(int(x) for x in state[name + ".__shape__"].tolist())
            if shape != tuple(param.shape):
                raise ValueError(
                    f"Mask `{name}` has shape {shape} but the model's parameter has shape {tuple(param.shape)}: "
                    "the mask file belongs to another model."
                )
            loaded[name] = unpack_mask(state[name], shape).to(param.device)
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
