"""Putting a module on the block kernel, and choosing per layer whether that pays.

:func:`enable_block_sparse` swaps the forward of one ``nn.Linear`` or ``Conv1D`` *instance* (the class and the
parameters stay, so ``state_dict`` keys, checkpoints and ``from_pretrained`` are unchanged); the weight stays a
dense tensor that holds zeros outside the active blocks. Calling it again on an enabled module installs the new
mask (a topology update: the layout's index is rebuilt once, eagerly). :func:`disable_block_sparse` restores the
class forward (and keeps the layout, which enabling the module again reuses). A controller uses dense kernels on
topology-update steps (growth ranks inactive weights by their dense gradient, which the sampled ``dW`` does not
compute) and wherever :func:`choose_kernel` says dense.

:func:`choose_kernel` reads a break-even table measured by ``bench/blocksparse_linear.py``: per GPU, per weight
shape and block size, the largest density at which the block kernel was faster than dense cuBLAS for fwd+bwd.
With no table for the GPU, or tokens far below the measured count, it answers ``"dense"`` (and
:func:`set_kernels` warns once per GPU that has no table). ``MST_KERNEL_TABLE=PATH`` points at a table measured
on your own GPU instead of the one shipped in the package (:mod:`.table` reads and validates it). :func:`set_kernels`
keeps a weight that is not on a CUDA device, or any weight without triton, on dense kernels whatever the table says.
"""

import functools
import importlib.util
import math
import types
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from .layout import BlockLayout, block_mask_from_weight, check_block_size, check_divisible
from .ops import block_sparse_linear
from .table import DEFAULT_TABLE, load_table, normalize_device_name, table_path  # noqa: F401 (DEFAULT_TABLE: public)

_STATE = "_mst_block_sparse"
# A disabled module keeps its layout here, and enabling it again reuses it: under torch.compile the module's graph
# reads the layout's index from a slot named by the layout, so a new layout at every dense topology-update step (as
# MST runs them) would recompile the model at each update.
_PARKED = "_mst_block_sparse_parked"


@functools.cache
def triton_installed() -> bool:
    """Whether the `triton` package can be imported (checked once, without importing it)."""
    return importlib.util.find_spec("triton") is not None


def block_kernel_runs(device) -> bool:
    """Whether ``weight_kernels="auto"`` may put a layer whose weight lives on `device` on the block kernel: a CUDA
    device with triton installed. (CPU weights run the ops' plain-torch CPU implementation, and ``"block"`` puts them
    there, but only for correctness and tests: it is slower than dense.)"""
    return torch.device(device).type == "cuda" and triton_installed()


def _is_conv1d(module: nn.Module) -> bool:
    if isinstance(module, Conv1D):
        return True
    if isinstance(module, nn.Linear):
        return False
    raise TypeError(f"Block-sparse kernels replace nn.Linear or transformers' Conv1D, got {type(module).__name__}.")


def _block_forward(self, x):
    layout, conv1d = getattr(self, _STATE)
    return block_sparse_linear(x, self.weight, self.bias, layout, conv1d)


def enable_block_sparse(module: nn.Module, block_mask: torch.Tensor, block_size: int) -> BlockLayout:
    """Run `module` (``nn.Linear`` or ``Conv1D``) on the block kernel with `block_mask`; returns its layout.

    `block_mask` is in the weight's storage orientation: either a block mask (``(out/b, in/b)`` for Linear,
    ``(in/b, out/b)`` for Conv1D) or an element mask of the weight's shape (a block is active where any element
    is). The weight must be zero outside the mask for the result to equal the masked dense product.
    """
    conv1d = _is_conv1d(module)
    block_size = check_block_size(block_size)
    weight = module.weight
    n_out, n_in = (weight.shape[1], weight.shape[0]) if conv1d else tuple(weight.shape)
    check_divisible(n_in, n_out, block_size, f"weight of {type(module).__name__} {tuple(weight.shape)}")
    if tuple(block_mask.shape) == tuple(weight.shape):
        blocks = block_mask_from_weight(block_mask, block_size, conv1d)
    else:
        want = (n_in // block_size, n_out // block_size) if conv1d else (n_out // block_size, n_in // block_size)
        if tuple(block_mask.shape) != want:
            raise ValueError(
                f"`block_mask` has shape {tuple(block_mask.shape)}; for this {type(module).__name__} weight "
                f"{tuple(weight.shape)} at block_size={block_size} pass a block mask of shape {want} or an element "
                f"mask of shape {tuple(weight.shape)}."
            )
        blocks = block_mask.t() if conv1d else block_mask
    enabled = getattr(module, _STATE, None)
    state = enabled or module.__dict__.pop(_PARKED, None)
    if state is not None and state[0].block_size == block_size and state[0].block_mask.shape == blocks.shape:
        layout = state[0]
        layout.update(blocks)
    else:
        layout = BlockLayout(blocks, block_size)
    layout.index(weight.device)  # the device copy made now, eagerly: compiled forwards only read it
    if enabled is None or enabled[0] is not layout:
        setattr(module, _STATE, (layout, conv1d))
        module.forward = types.MethodType(_block_forward, module)
    return layout


def disable_block_sparse(module: nn.Module) -> None:
    """Put `module` back on its class forward (dense kernels). A no-op for a module that is not enabled."""
    state = getattr(module, _STATE, None)
    if state is None:
        return
    delattr(module, _STATE)
    setattr(module, _PARKED, state)
    if "forward" in module.__dict__:
        del module.forward


def set_kernels(
    modules: dict[str, nn.Module],
    masks: dict[str, torch.Tensor],
    block_size: int,
    tokens: int,
    dense: bool = False,
    device_name: str | None = None,
    path: str | None = None,
) -> dict[str, str]:
    """Put each named module on the kernel :func:`choose_kernel` picks for its mask; returns ``{name: choice}``.

    `masks` holds element (or block) masks by the same names, in the weights' storage layout. ``dense=True`` puts
    every module on dense kernels (e.g. for a topology-update step, whose growth needs the dense gradient).
    A module whose weight is not where the kernel runs (:func:`block_kernel_runs`: CUDA with triton) stays dense
    whatever the table says. Call it at phase changes and after each topology update; the returned choices are what
    to log.
    """
    choices = {}
    for name, module in modules.items():
        choice = "dense"
        if not dense and block_kernel_runs(module.weight.device):
            conv1d = _is_conv1d(module)
            n_out, n_in = (module.weight.shape[1], module.weight.shape[0]) if conv1d else tuple(module.weight.shape)
            mask = masks[name]
            if n_in % block_size == 0 and n_out % block_size == 0:
                elementwise = mask.shape == module.weight.shape
                blocks = block_mask_from_weight(mask, block_size, conv1d) if elementwise else mask
                gpu = device_name or torch.cuda.get_device_name(module.weight.device)
                density = blocks.float().mean().item()
                choice = choose_kernel(n_in, n_out, tokens, density, block_size, gpu, path)
                if normalize_device_name(gpu) not in load_table(path):
                    _warn_no_table(gpu, table_path(path))
        if choice == "block":
            enable_block_sparse(module, masks[name], block_size)
        else:
            disable_block_sparse(module)
        choices[name] = choice
    return choices


def block_sparse_layout(module: nn.Module) -> BlockLayout | None:
    """The layout `module` runs with, or None when it is on dense kernels."""
    state = getattr(module, _STATE, None)
    return None if state is None else state[0]


def dense_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The class forward of a Linear/Conv1D, whatever is installed (for comparisons)."""
    if _is_conv1d(module):
        return torch.addmm(module.bias, x.reshape(-1, x.shape[-1]), module.weight).reshape(*x.shape[:-1], -1)
    return F.linear(x, module.weight, module.bias)


# ---------------------------------------------------------------- kernel choice from a measured table


@functools.cache
def _warn_no_table(device_name: str, path: str) -> None:
    warnings.warn(
        f"weight_kernels='auto': the break-even table {path} has no measurements for GPU {device_name!r} (it has: "
        f"{', '.join(sorted(load_table(path))) or 'none'}), so every layer stays on dense kernels and block sparsity "
        "gives no speed-up. Measure this GPU with `python bench/blocksparse_linear.py --out DIR` and point "
        "MST_KERNEL_TABLE at DIR/blocksparse_breakeven.json, or set MSTConfig(weight_kernels='block').",
        UserWarning, stacklevel=3)


def break_even_density(
    n_in: int, n_out: int, block_size: int, device_name: str, path: str | None = None
) -> float | None:
    """The measured break-even density of the nearest table shape (log distance in n_in and n_out), or None."""
    table = load_table(path).get(normalize_device_name(device_name))
    if not table:
        return None
    rows = [r for r in table.get("break_even", []) if r["block_size"] == block_size]
    if not rows:
        return None

    def distance(r):
        return abs(math.log(r["n_in"] / n_in)) + abs(math.log(r["n_out"] / n_out))

    best = min(rows, key=distance)
    if distance(best) > math.log(4):  # nothing measured within a factor of 4 in size: do not guess
        return None
    return best["break_even_density"]


def choose_kernel(
    n_in: int, n_out: int, tokens: int, density: float, block_size: int, device_name: str, path: str | None = None
) -> str:
    """``"block"`` when the measured table says the block kernel beats dense for this layer, else ``"dense"``.

    Block needs: a table for `device_name`, a measured shape within a factor 4 of ``(n_in, n_out)`` at
    `block_size`, `density` below its break-even density, and `tokens` at least half the measured token count
    (fewer tokens per step make launch costs dominate, which the table did not measure).
    """
    if n_in % block_size or n_out % block_size:
        return "dense"
    table = load_table(path).get(normalize_device_name(device_name))
    if not table or tokens < table.get("tokens", 0) / 2:
        return "dense"
    limit = break_even_density(n_in, n_out, block_size, device_name, path)
    return "block" if limit is not None and density < limit else "dense"
