"""Block layouts of a sparse weight: which ``b x b`` tiles are active, and the compact index the kernels read.

A layout is always stated in the matmul's orientation ``(n_out / b, n_in / b)``: block ``(r, c)`` holds the weight
entries of outputs ``r*b .. r*b+b-1`` and inputs ``c*b .. c*b+b-1``, whatever the module stores (``nn.Linear``
keeps ``(out, in)``, GPT-2's ``Conv1D`` keeps ``(in, out)``; :func:`block_mask_from_weight` turns either into this
orientation).

The index is one int32 tensor, built once per mask change and cached on the layout (keyed on ``version`` and the
device), never per step::

    [ row_ptr (R+1) | col_idx (nnz) | col_ptr (C+1) | row_idx (nnz) | blk_row (nnz) ]

``row_ptr``/``col_idx`` list, for each block-row (output block), its active input blocks (the forward);
``col_ptr``/``row_idx`` list, for each block-column (input block), its active output blocks (``dX = dY W``);
``blk_row`` with ``col_idx`` gives the ``(r, c)`` of every active block in row-major order (the sampled ``dW``).

Under ``torch.compile`` the index is a graph input whose length is a dynamic dimension from the start, so a topology
update that changes a layer's tile count reuses the compiled graph. For that, the device copies live in this module
(:data:`_INDEXES`), not on the layout: a tensor that dynamo reaches through a ``nn.Linear``'s attributes (where the
layout hangs) always gets static shapes (``torch._dynamo.config.force_nn_module_property_static_shapes``), which
recompiled the whole model at every change of any layer's tile count.
"""

import itertools
import weakref

import torch

BLOCK_SIZES = (16, 32, 64, 128)  # 16 is for small tests; 32, 64 and 128 are the measured sizes


def check_block_size(block_size) -> int:
    """`block_size` as an int, or a ValueError saying which sizes the kernels support."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size not in BLOCK_SIZES:
        raise ValueError(f"`block_size` must be one of {BLOCK_SIZES} (square blocks), got {block_size!r}.")
    return block_size


def check_divisible(n_in: int, n_out: int, block_size: int, what: str = "weight") -> None:
    """A ValueError unless both matmul dimensions are multiples of the block size."""
    for name, n in (("n_in", n_in), ("n_out", n_out)):
        if n % block_size:
            raise ValueError(
                f"The {what} has {name}={n}, which block_size={block_size} does not divide; use a block size "
                f"that divides both {n_in} and {n_out} (one of {BLOCK_SIZES}) or keep this weight on dense kernels."
            )


def block_mask_from_weight(mask: torch.Tensor, block_size: int, conv1d: bool = False) -> torch.Tensor:
    """The ``(n_out/b, n_in/b)`` block mask of an element mask in the weight's own storage layout.

    A block is active when any of its elements is. The kernels then compute exactly ``x @ (W * M)^T`` as long as
    the weight is zero where the element mask is (MST keeps it so): inactive blocks hold only zeros, and active
    blocks are multiplied in full. Their sampled ``dW`` covers whole blocks; masking the gradient afterwards (as
    MST does) removes entries the element mask excludes.
    """
    if mask.ndim != 2:
        raise ValueError(f"`mask` must be 2-D (the weight's shape), got shape {tuple(mask.shape)}.")
    block_size = check_block_size(block_size)
    m = mask.t() if conv1d else mask  # (out, in)
    n_out, n_in = m.shape
    check_divisible(n_in, n_out, block_size, "mask")
    b = block_size
    return m.reshape(n_out // b, b, n_in // b, b).ne(0).any(dim=3).any(dim=1)


class BlockLayout:
    """The active blocks of one ``(n_out, n_in)`` weight at block size ``b``, with its cached compact index.

    ``update(block_mask)`` installs a new mask (a topology update), bumps ``version`` and rebuilds the index once
    (on the CPU; :meth:`index` copies it to a device once per version).
    """

    def __init__(self, block_mask: torch.Tensor, block_size: int):
        self.block_size = check_block_size(block_size)
        self.version = 0
        self._mask = None
        self._uid = next(_UIDS)
        self._devices = {"cpu"}  # where a copy of the index is kept (and refreshed by update)
        weakref.finalize(self, _forget, self._uid, self._devices)
        self.update(block_mask)

    def update(self, block_mask: torch.Tensor) -> None:
        if not isinstance(block_mask, torch.Tensor) or block_mask.ndim != 2:
            got = tuple(block_mask.shape) if isinstance(block_mask, torch.Tensor) else type(block_mask).__name__
            raise ValueError(f"`block_mask` must be a 2-D tensor of shape (n_out/b, n_in/b), got {got}.")
        if self._mask is not None and block_mask.shape != self._mask.shape:
            raise ValueError(
                f"`block_mask` has shape {tuple(block_mask.shape)} but this layout covers "
                f"{tuple(self._mask.shape)} blocks; build a new BlockLayout for a different weight."
            )
        self._mask = block_mask.detach().ne(0).cpu()
        self.version += 1
        self._index = build_index(self._mask)  # built here, eagerly: never inside a compiled region
        for device in self._devices:  # the copies a compiled graph reads are replaced, never missing
            _INDEXES[self._uid, device] = _dynamic_length(self._index.to(device))
        self.nnz = int(self._mask.sum())

    @property
    def block_mask(self) -> torch.Tensor:
        """The ``(R, C)`` boolean block mask (a CPU copy)."""
        return self._mask

    @property
    def shape(self) -> tuple[int, int]:
        """``(n_out, n_in)`` in elements."""
        return self._mask.shape[0] * self.block_size, self._mask.shape[1] * self.block_size

    @property
    def density(self) -> float:
        return self.nnz / self._mask.numel()

    def index(self, device) -> torch.Tensor:
        """The int32 index on `device` (see the module docstring), cached until the next :meth:`update`, which
        refreshes it (call this once eagerly per device, as ``enable_block_sparse`` does, so that compiled code only
        ever reads it)."""
        key = (self._uid, str(device))
        if key not in _INDEXES:
            self._devices.add(key[1])
            _INDEXES[key] = _dynamic_length(self._index.to(device))
        return _INDEXES[key]


# The index of every live layout on every device it was asked for, by (layout uid, device): see the module docstring.
_INDEXES: dict[tuple[int, str], torch.Tensor] = {}
_UIDS = itertools.count()


def _forget(uid: int, devices: set) -> None:
    for device in devices:
        _INDEXES.pop((uid, device), None)


def _dynamic_length(index: torch.Tensor) -> torch.Tensor:
    """`index`, its length marked dynamic for torch.compile (a weak mark: no error where something specializes it)."""
    torch._dynamo.maybe_mark_dynamic(index, 0)
    return index


def build_index(block_mask: torch.Tensor) -> torch.Tensor:
    """The compact int32 index of a boolean ``(R, C)`` block mask (layout in the module docstring)."""
    m = block_mask.ne(0)
    rows, cols = m.nonzero(as_tuple=True)  # row-major: sorted by row, then column
    t_cols, t_rows = m.t().nonzero(as_tuple=True)  # sorted by column, then row
    zero = torch.zeros(1, dtype=torch.long)
    row_ptr = torch.cat([zero, m.sum(1).cumsum(0)])
    col_ptr = torch.cat([zero, m.sum(0).cumsum(0)])
    return torch.cat([row_ptr, cols, col_ptr, t_rows, rows]).to(torch.int32)


def index_offsets(n_row_blocks: int, n_col_blocks: int, index_numel: int) -> dict[str, int]:
    """Where each part of the index starts, from the block grid and the index length."""
    R, C = n_row_blocks, n_col_blocks
    nnz = (index_numel - R - C - 2) // 3
    return {
        "nnz": nnz,
        "row_ptr": 0,
        "col_idx": R + 1,
        "col_ptr": R + 1 + nnz,
        "row_idx": R + C + 2 + nnz,
        "blk_row": R + C + 2 + 2 * nnz,
    }
