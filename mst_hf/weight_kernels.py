"""Which target layers run on the block-sparse kernels, step by step (``MSTConfig.weight_kernels``).

Between the pure masks and the controller: :class:`WeightKernels` puts each target module on the block kernel of
:mod:`mst_hf.kernels` or back on its dense class forward. It follows three rules:

1. Only block-structured masks (``sparsity_structure="block"``) can use the kernel, and only layers whose shape
   the tile side divides.
2. A topology-update step runs every layer dense: growth ranks inactive weights by their dense gradient, and the
   block kernel computes ``dW`` on active tiles only. After the update the new masks are installed.
3. ``"auto"`` asks :func:`mst_hf.kernels.choose_kernel` (a measured break-even table per GPU, shape, tile side and
   density): a layer at low sparsity (warm-up, restoration) stays dense where the block kernel would be slower.
   ``"block"`` forces the kernel wherever rule 1 allows, CPU weights included: there the block-sparse ops run their
   plain-torch CPU implementation, which is for correctness and tests (``torch.compile`` of a block-mode run without
   a GPU), not speed: it is slower than the dense matmul. ``"auto"`` never picks it for a weight off CUDA or without
   triton.

Construction refuses what would otherwise fail or do nothing later: ``"block"`` without triton for weights off the
CPU, a missing or malformed break-even table for ``"auto"``, a ``block_size`` that divides no target's shape (and
warns about the targets it does not divide: they run dense).

Decisions change only when masks do (at updates, or after loading masks: both replace the mask tensors, which is
what is checked), so a normal step costs a loop of identity checks here.
"""

from transformers.utils import logging

from .topology import tile_mask

logger = logging.get_logger(__name__)


class WeightKernels:
    """Per-layer kernel choice for the targets of one controller."""

    def __init__(self, model, targets, masks, block: int, mode: str):
        self.model, self.targets, self.masks, self.block, self.mode = model, targets, masks, block, mode
        self._check(targets, block, mode, {self._module(t).weight.device.type for t in targets.values()})
        self.choice: dict[str, str] = {}  # parameter name -> "block" | "dense"
        self._dirty = True
        self._dense_step = False
        self._installed: dict = {}

    @staticmethod
    def _check(targets, block: int, mode: str, devices: set) -> None:
        """What would only show at the first step, refused (or warned about) now: no triton for ``"block"`` on
        weights off the CPU (`devices`: the targets' device types), a malformed break-even table for ``"auto"``,
        target shapes the tile side does not divide."""
        from .kernels import dispatch

        if mode == "block" and devices - {"cpu"} and not dispatch.triton_installed():
            raise NotImplementedError(
                f"`weight_kernels='block'` runs the Triton block-sparse kernels on {sorted(devices - {'cpu'})} "
                "weights, but triton is not installed: install triton (CUDA GPUs), or set `weight_kernels='dense'` "
                "(or 'auto', which stays dense where the block kernel cannot run)."
            )
        if mode == "auto":
            dispatch.load_table()  # a missing or malformed table (MST_KERNEL_TABLE) fails here, naming the field
        undivided = [f"{t.module_name} ({t.n_in}x{t.n_out})" for t in targets.values()
                     if t.n_in % block or t.n_out % block]
        if undivided and len(undivided) == len(targets):
            raise ValueError(
                f"`weight_kernels={mode!r}`: block_size={block} divides the shape of no target layer "
                f"({', '.join(undivided[:6])}{' ...' if len(undivided) > 6 else ''}), so every layer would run on "
                "dense kernels. Set `block_size` to a divisor of the layers' dimensions (16, 32, 64 or 128) or "
                "`weight_kernels='dense'`."
            )
        if undivided:
            logger.warning(
                "MST weight kernels: block_size=%d does not divide %d of %d target layers, which always run on dense "
                "kernels: %s. Use a block_size that divides them to put them on the block kernel.", block,
                len(undivided), len(targets), ", ".join(undivided[:8]) + (" ..." if len(undivided) > 8 else ""))

    def masks_changed(self) -> None:
        """Masks were replaced (topology update, load): decide and install again before the next normal step."""
        self._dirty = True

    def before_forward(self, update_step: bool, tokens: int) -> None:
        """Dense kernels for an update step; otherwise (re)install the block kernels where chosen."""
        from . import kernels

        if update_step:
            if not self._dense_step:
                for t in self.targets.values():
                    kernels.disable_block_sparse(self._module(t))
                self._dense_step, self._dirty = True, True
            return
        if not self._dirty and all(self.masks.masks[n] is m for n, m in self._installed.items()):
            return  # the masks installed are still the masks in force (set_mask and loading replace the tensors)
        self._dense_step = False
        modules = {name: self._module(t) for name, t in self.targets.items()}
        if self.mode == "auto":  # the measured break-even table decides, layer by layer
            self.choice = kernels.set_kernels(modules, self.masks.masks, self.block, tokens)
        else:  # "block": wherever the tile side divides the shape
            for name, t in self.targets.items():
                if t.n_in % self.block or t.n_out % self.block:
                    kernels.disable_block_sparse(modules[name])
                    self.choice[name] = "dense"
                else:
                    kernels.enable_block_sparse(modules[name], tile_mask(self.masks.masks[name], self.block),
                                                self.block)
                    self.choice[name] = "block"
        self._installed = {n: self.masks.masks[n] for n in self.targets}
        self._dirty = False
        n_block = sum(c == "block" for c in self.choice.values())
        logger.info("MST weight kernels: %d of %d target layers on the block-sparse kernel (%s).", n_block,
                    len(self.choice), ", ".join(f"{n}={c}" for n, c in list(self.choice.items())[:8]))

    def block_layers(self) -> int:
        """Target layers on the block kernel now (0 on an update step)."""
        return 0 if self._dense_step else sum(c == "block" for c in self.choice.values())

    def _module(self, target):
        return self.model.get_submodule(target.module_name)
