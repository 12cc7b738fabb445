"""FSDP2 support: masks sharded like their parameters (``torch.distributed.fsdp.fully_shard`` makes every parameter a
``DTensor``).

The whole DTensor knowledge of mst_hf is here, so :class:`mst_hf.masks.MaskState` and the controller stay plain:

* a mask is stored as the *local shard* of the full mask, cut exactly like the local shard of its parameter, so
  masking weights, gradients and optimizer moments is a local, element-wise operation with no communication;
* a topology update is a global decision: the controller gathers one layer at a time (:func:`full` of the weight
  and the gradient, :func:`full_mask` of the mask), runs the same pure update on every rank, and keeps
  :func:`local_mask` of the result; every rank computes the same full mask, so nothing is broadcast;
* saving gathers each full mask (:func:`full_mask`), so the mask file is the one an unsharded run writes; loading
  cuts the full masks of the file (:func:`local_mask`) with no communication.

For a plain tensor every function is the identity (or a plain count), so unsharded code takes the same path.
``DTensor.shape`` and ``numel()`` are global, so layer shapes, allocations and FLOP counts need no change.
"""

import torch

try:  # torch built without distributed support: nothing can be sharded
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
except ImportError:  # pragma: no cover
    DTensor = None


def is_sharded(tensor) -> bool:
    """Whether ``tensor`` (a parameter, gradient or optimizer state) is a ``DTensor``."""
    return DTensor is not None and isinstance(tensor, DTensor)


def local(tensor):
    """The local shard of a ``DTensor`` (sharing its storage, so in-place changes reach it); other tensors as is."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def full(tensor):
    """The full tensor of a ``DTensor`` (a collective: call on every rank); other tensors as is."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def full_mask(mask: torch.Tensor, param) -> torch.Tensor:
    """The full boolean mask (global shape) from the local ``mask`` of ``param``'s shard; a collective (all-gather
    of one byte per weight of this layer) when ``param`` is sharded, else ``mask`` itself."""
    if not is_sharded(param):
        return mask
    shard = DTensor.from_local(mask.to(torch.uint8), param.device_mesh, param.placements, shape=param.shape,
                               stride=param.stride())
    return shard.full_tensor().bool()


def local_mask(mask: torch.Tensor, param) -> torch.Tensor:
    """The part of the full boolean ``mask`` that belongs to this rank's shard of ``param`` (same shape as its local
    tensor; no communication: every rank holds the full mask); ``mask`` itself when ``param`` is not sharded."""
    if not is_sharded(param):
        return mask
    if tuple(mask.shape) != tuple(param.shape):
        raise ValueError(f"A mask of shape {tuple(mask.shape)} cannot be sharded like a parameter of global shape "
                         f"{tuple(param.shape)}.")
    part = distribute_tensor(mask, param.device_mesh, param.placements, src_data_rank=None).to_local()
    return part.clone()  # own storage: the full mask is freed after the caller's layer


def global_count(mask: torch.Tensor, param) -> int:
    """Number of ``True`` entries of the full mask whose local part is ``mask`` (an all-reduce of one number over
    the mesh dimensions that shard ``param``, when it is sharded)."""
    count = mask.sum(dtype=torch.int64)
    if is_sharded(param):
        placements = [Partial() if isinstance(p, Shard) else Replicate() for p in param.placements]
        count = DTensor.from_local(count, param.device_mesh, placements).full_tensor()
    return int(count.item())


def any_sharded(params) -> bool:
    """Whether any of ``params`` is a ``DTensor``."""
    return any(is_sharded(p) for p in params)


def all_ranks(flag: bool, params) -> bool:
    """Whether ``flag`` holds on every rank (an all-reduce of one number when any of ``params`` is sharded: each
    rank then judged only its shards; unsharded parameters hold the same values everywhere)."""
    sharded = [p for p in params if is_sharded(p)]
    if not sharded:
        return flag
    value = torch.tensor(int(flag), device=sharded[0].to_local().device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
    return bool(value.item())
