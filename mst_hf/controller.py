"""`MSTController`: drives masks, schedule, attention and FLOP counting through a training run, with or without
`MSTTrainer`.

A custom training loop uses it like this (``MSTTrainer`` makes exactly these calls, from its ``training_step`` and
a callback, so both count the same FLOPs and get the same masks)::

    ctl = MSTController(model, mst_config)
    for step in range(total_steps):
        for batch in micro_batches:                      # one or more (gradient accumulation)
            ctl.before_forward(step, total_steps, batch)  # attention pattern on/off; counts the batch's tokens
            model(**batch).loss.backward()
        ctl.after_backward(step, total_steps, optimizer)  # closes the step's FLOP count, topology update when due,
        optimizer.step(); optimizer.zero_grad()          # then masks the gradients
        ctl.after_optimizer_step(optimizer)              # pruned weights stay exactly 0

``batch`` is a mapping with ``input_ids`` (or ``inputs_embeds``); under ``torch.distributed`` each rank passes its
own micro-batch and the count is multiplied by the world size (every rank is assumed to see the same shape).
"""

import dataclasses

import torch
import torch.distributed as dist
from torch import nn
from transformers import PretrainedConfig
from transformers.utils import logging

from . import allocation, schedule, sharding, topology
from .flops import FlopMeter, model_flop_shapes
from .initial_masks import set_initial_masks
from .masks import MaskState, inner_optimizer, mask_fingerprint
from .targets import TargetWeight, check_fused_experts, require_targets, unwrap_model

logger = logging.get_logger(__name__)

_SEED_MOD = 2**62
_NO_ATTENTION = ("MST: %s has no attention layer (its config names no attention heads): hybrid sparse attention "
                 "(hsa_pattern=%r) is switched off for this run (saved as 'dense'); set `hsa_pattern='dense'`.")
_NO_TOKENS = ("MST: step %d closed with no tokens counted (call before_forward(step, total_steps, batch) with every "
              "micro-batch): the FLOP totals miss it, so mst/flop_reduction is NaN (the count is incomplete).")


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _tokens(inputs) -> int:
    """Tokens of one micro-batch on this rank (0 when unknown)."""
    return int(getattr(inputs.get("input_ids") if hasattr(inputs, "get") else None, "numel", lambda: 0)())


# Optimizers whose update of an element with zero gradient, zero state and zero weight is exactly +0.0 (decoupled or
# L2 weight decay scales 0 to 0; Adam's m / (sqrt(v) + eps) is 0 / eps): exact types only, a subclass may differ
# (one that says so with `leaves_pruned_zero = True` counts: ActiveTileAdamW never writes a pruned tile).
_ZERO_KEEPING_OPTIMIZERS = (torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD)


def keeps_pruned_zero(optimizer) -> bool:
    """Whether ``optimizer`` (or the torch optimizer inside accelerate's ``AcceleratedOptimizer``) leaves weights
    whose gradient and optimizer state are masked to zero at exactly zero, so they need no re-masking per step."""
    optimizer = inner_optimizer(optimizer)
    return type(optimizer) in _ZERO_KEEPING_OPTIMIZERS or getattr(optimizer, "leaves_pruned_zero", False) is True


class MSTController:
    """Owns the :class:`MaskState` of a model and applies the MST schedule to it."""

    def __init__(self, model: nn.Module, mst_config, initialize_masks: bool = True):
        from .config import MSTConfig

        if not isinstance(mst_config, MSTConfig):
            raise TypeError(f"`mst_config` must be an mst_hf.MSTConfig, got {type(mst_config).__name__}.")
        mst_config.validate_mst()  # also catches a field changed behind the config's back (e.g. via __dict__)
        self.model = model
        self.config = mst_config
        self.targets: dict[str, TargetWeight] = require_targets(model, mst_config)
        self.masks = MaskState({name: t.param for name, t in self.targets.items()}, layout=sharding)
        root = unwrap_model(model)  # modules stay when FSDP2 swaps their parameters: follow_params reads them
        self._target_modules = {name: root.get_submodule(t.module_name) for name, t in self.targets.items()}
        if mst_config.lm_head_max_sparsity is not None:  # an infeasible cap fails now, not at mid-run
            self.target_densities(max(mst_config.initial_sparsity, mst_config.ultra_sparsity,
                                      mst_config.final_sparsity))
        # tile side of block-structured masks (None: unstructured); counts in update records are then tiles
        self.block: int | None = mst_config.block_size if mst_config.sparsity_structure == "block" else None
        if self.block is not None:
            self._refuse_tiles_that_cannot_hold_the_sparsity()
        self.history: list[dict] = []  # one record per topology update
        self.skipped_updates: list[int] = []  # update steps skipped for non-finite gradients
        self.last_update_step: int | None = None
        self.hsa_on: bool | None = None
        self.hsa_spec = None  # the run's HSASpec, built once by _setup_hsa (None: dense attention)
        self.hsa_density = 1.0  # attended / causal pairs of the sparse layers at the last batch's length (1.0: dense)
        self.current_step: int | None = None  # the step whose forward ran last (what logs describe)
        self.flops = FlopMeter(model_flop_shapes(model, mst_config))  # training-FLOP totals (mst_hf.flops)
        check_fused_experts(model, self.flops.flop_model, mst_config)  # MoE experts: refused unless excluded
        self.weight_kernels = None
        if mst_config.weight_kernels != "dense":  # before any weight is pruned: its checks may refuse the run
            from .weight_kernels import WeightKernels

            self._refuse_sharded_kernels(self.masks.params.values())

            self.weight_kernels = WeightKernels(unwrap_model(model), self.targets, self.masks, self.block,
                                                mst_config.weight_kernels)
        if initialize_masks and mst_config.initial_sparsity > 0:  # saved, magnitude or seeded random masks
            set_initial_masks(self, mst_config.initial_sparsity, lambda i, device: self._generator(-1, i, device))
        transformers_model = isinstance(getattr(unwrap_model(model), "config", None), PretrainedConfig)
        if mst_config.hsa_pattern != "dense" and transformers_model and not self.flops.flop_model.n_layers:
            logger.warning(_NO_ATTENTION, type(unwrap_model(model)).__name__, mst_config.hsa_pattern)
            self.config = mst_config = MSTConfig(**{**mst_config.mst_dict(), "hsa_pattern": "dense"})
        if mst_config.hsa_pattern != "dense":
            self._setup_hsa()

    # ------------------------------------------------------------------ helpers
    def _refuse_sharded_kernels(self, params) -> None:
        if sharding.any_sharded(params):
            raise NotImplementedError(
                f"weight_kernels={self.config.weight_kernels!r} does not run on FSDP2-sharded weights. Set "
                "`weight_kernels='dense'` to train with FSDP2."
            )

    def _refuse_tiles_that_cannot_hold_the_sparsity(self) -> None:
        """Block masks switch whole tiles (edge tiles of a side ``block_size`` does not divide are partial). A target
        with a side shorter than a tile is one tile, all on or all off; one whose share at the peak sparsity rounds
        to no tile is pruned entirely. Either trains another sparsity than configured: refused before any pruning."""
        cfg, block = self.config, self.block
        peak = max(cfg.initial_sparsity, cfg.ultra_sparsity, cfg.final_sparsity)
        for name, density in self.target_densities(peak).items():
            t = self.targets[name]
            if min(t.n_in, t.n_out) < block:
                raise ValueError(
                    f"`block_size={block}` is larger than the target `{t.module_name}` ({t.n_in}x{t.n_out}): its mask "
                    "would be one tile, all on or all off. Set `block_size` to a divisor of the layers' sides (at "
                    f"most {min(t.n_in, t.n_out)}), leave the layer out with `exclude_modules`, or use "
                    "`sparsity_structure='unstructured'`."
                )
            rows, cols = topology.block_grid((t.n_in, t.n_out), block)
            if topology.active_tiles((t.n_in, t.n_out), block, density) == 0:
                raise ValueError(
                    f"`block_size={block}` leaves the target `{t.module_name}` ({t.n_in}x{t.n_out}, {rows * cols} "
                    f"tiles) no active tile at sparsity {peak}: its share, density {density:.3f}, is "
                    f"{density * rows * cols:.2f} tiles, so the layer would be all zero. Use a smaller `block_size`, "
                    "a lower sparsity, or leave the layer out with `exclude_modules`."
                )

    def follow_params(self) -> None:
        """Re-point targets and masks at the modules' current weights. FSDP2's ``fully_shard`` (which
        ``Trainer.train`` runs after this controller was built) replaces every parameter by a ``DTensor`` one; the
        masks are then cut like the new shards (:mod:`mst_hf.sharding`). Called by :meth:`after_backward`; cheap
        when nothing changed (one attribute read per target)."""
        moved = {n: m.weight for n, m in self._target_modules.items() if m.weight is not self.targets[n].param}
        if not moved:
            return
        if self.weight_kernels is not None:
            self._refuse_sharded_kernels(moved.values())
        self.masks.rebind(moved)
        for name, param in moved.items():
            self.targets[name] = dataclasses.replace(self.targets[name], param=param)

    def shapes(self) -> list[tuple[int, int]]:
        return [(t.n_in, t.n_out) for t in self.targets.values()]

    def target_densities(self, sparsity: float) -> dict[str, float]:
        """Per-layer densities for a global ``sparsity`` under the configured allocation
        (:func:`mst_hf.allocation.layer_densities`, the head cap included)."""
        return allocation.layer_densities(self.targets.values(), self.config, sparsity)

    def _generator(self, step: int, layer_index: int, device: torch.device) -> torch.Generator:
        """A generator that depends only on (seed, step, layer): identical on every rank, and nothing to save."""
        g = torch.Generator(device=device)
        g.manual_seed((self.config.seed * 1_000_003 + (step + 1) * 10_007 + layer_index) % _SEED_MOD)
        return g

    def _setup_hsa(self) -> None:
        """Build the run's `HSASpec` once (``self.hsa_spec``; nothing per micro-batch builds or checks one), store it
        on the model config (off until its phase) and switch the model to the registered ``"mst_hsa"`` attention,
        which is dense causal whenever the pattern is off."""
        from . import attention

        model, cfg = unwrap_model(self.model), self.config
        self.hsa_spec = attention.HSASpec.from_config(cfg)
        if not isinstance(getattr(model, "config", None), PretrainedConfig):
            raise TypeError(
                f"Hybrid sparse attention (hsa_pattern={cfg.hsa_pattern!r}) needs a transformers model on the "
                f"attention interface; {type(model).__name__} is not one. Set `hsa_pattern='dense'` to train its "
                "weights with MST and dense attention."
            )
        attention.configure_hsa(model, self.hsa_spec, active=False)
        if getattr(model.config, "_attn_implementation", None) != attention.HSA_NAME:
            if not hasattr(model, "set_attn_implementation"):
                raise NotImplementedError(
                    f"{type(model).__name__} cannot switch its attention implementation, so hybrid sparse attention "
                    f"(hsa_pattern={cfg.hsa_pattern!r}) cannot run. Set `hsa_pattern='dense'`."
                )
            try:
                model.set_attn_implementation(attention.HSA_NAME)
            except (ValueError, NotImplementedError) as err:
                raise NotImplementedError(
                    f"{type(model).__name__} does not use the transformers attention interface, so hybrid sparse "
                    f"attention (hsa_pattern={cfg.hsa_pattern!r}) cannot run on it ({err}). Set `hsa_pattern='dense'`."
                ) from err

    def _agree(self, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Make sure every rank holds the same new masks. They already agree when weights and gradients do (the same
        all-reduced gradients, the same seeded generators), so ranks compare a fingerprint per mask (a few bytes:
        one all-reduce of the minimum and one of the maximum, one host sync) and only on a mismatch take rank 0's
        masks whole, with a warning."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return masks
        names = list(masks)
        low = torch.stack([mask_fingerprint(masks[n]) for n in names])
        high = low.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        if torch.equal(low, high):
            return masks
        differ = [n for n, a, b in zip(names, low.tolist(), high.tolist()) if a != b]
        logger.warning("MST: the new masks of %d layer(s) differ between ranks (%s); taking rank 0's. Ranks should "
                       "see the same gradients: check that every rank runs the same model and data-parallel set-up.",
                       len(differ), ", ".join(differ[:4]))
        flat = torch.cat([masks[n].flatten().to(torch.uint8) for n in names])
        dist.broadcast(flat, src=0)
        out, offset = {}, 0
        for n in names:
            numel = masks[n].numel()
            out[n] = flat[offset : offset + numel].view(masks[n].shape).bool()
            offset += numel
        return out

    # ------------------------------------------------------------------ the three hooks
    def before_forward(self, step: int, total_steps: int, inputs=None, world_size: int | None = None) -> bool:
        """Before the forward of a micro-batch of ``step``: switch hybrid sparse attention on or off for the step and,
        when ``inputs`` is given, count its tokens (times ``world_size``: by default the ``torch.distributed`` world
        size, 1 without it). Returns whether the sparse pattern is on."""
        self.current_step = step
        on = schedule.hsa_active(step, total_steps, self.config)
        if on != self.hsa_on:
            if self.config.hsa_pattern != "dense":
                from . import attention

                attention.set_hsa_active(unwrap_model(self.model), on)
            self.hsa_on = on
        if inputs is not None:
            self.flops.add_inputs(inputs, world_size=_world_size() if world_size is None else world_size)
            self.hsa_density = self._hsa_density(on, inputs)
        if self.weight_kernels is not None:
            self.weight_kernels.before_forward(self.is_update_step(step, total_steps), _tokens(inputs))
        return on

    def _hsa_density(self, on: bool, inputs) -> float:
        """The exact density of the sparse pattern at this batch's sequence length (1.0 when it is off): a pattern
        that admits every causal pair there (e.g. window 128 on 128 tokens) is dense although HSA is on."""
        x = inputs.get("input_ids") if hasattr(inputs, "get") else None
        x = inputs.get("inputs_embeds") if x is None and hasattr(inputs, "get") else x
        if not on or self.config.hsa_pattern == "dense" or x is None or x.dim() < 2:
            return 1.0
        return self.hsa_spec.density(int(x.shape[1]))  # cached per length

    @property
    def weights_stay_dense(self) -> bool:
        """No weight sparsity in any phase, no mask ever set or loaded (HSA alone): no weight work in any step."""
        c = self.config
        return self.masks.untouched and max(c.initial_sparsity, c.ultra_sparsity, c.final_sparsity) == 0

    def is_update_step(self, step: int, total_steps: int) -> bool:
        """Whether ``after_backward(step, ...)`` updates the topology (once per step, also across a resume)."""
        due = schedule.is_update_step(step, total_steps, self.config) and self.last_update_step != step
        return due and not self.weights_stay_dense

    def after_backward(self, step: int, total_steps: int, optimizer=None) -> dict | None:
        """After the (accumulated, all-reduced) backward of the last micro-batch of ``step``: add the step's FLOPs
        (with the masks its forward and backward ran with), update the topology when due, then mask the gradients.
        Returns the update's record, or ``None`` when no update happened."""
        self.follow_params()
        update = self.is_update_step(step, total_steps)
        uncounted = self.flops.uncounted_steps
        self.flops.end_step(self.masks, hsa_on=bool(self.hsa_on), update_step=update)
        if uncounted == 0 < self.flops.uncounted_steps:  # the first step of the run without a counted batch
            logger.warning(_NO_TOKENS, step)
        record = None
        if update and not self.masks.grads_finite():
            # Growth scores would be NaN/inf (e.g. an overflowing fp16 step that GradScaler is about to skip): keep
            # the masks, try again at the next update step.
            logger.warning("MST: non-finite gradients at step %d; the topology update of this step is skipped "
                           "(masks unchanged).", step)
            self.skipped_updates.append(step)
        elif update:
            record = self.update_topology(step, total_steps, optimizer)
            if self.weight_kernels is not None:
                self.weight_kernels.masks_changed()
        if not self.weights_stay_dense:
            self.masks.apply_to_grads()
        return record

    def after_optimizer_step(self, optimizer=None) -> None:
        """Keep pruned weights at exactly zero after ``optimizer.step()``.

        With the step's ``optimizer`` given and one that provably keeps them there (:func:`keeps_pruned_zero`:
        torch's AdamW, Adam and SGD see a zero gradient and zero state at every pruned position, and scale a zero
        weight to zero), nothing runs: the gradient masking of :meth:`after_backward` is the step's one masking
        pass. Otherwise (another optimizer, or none given) every pruned weight is set back to ``+0.0``."""
        if not self.weights_stay_dense and (optimizer is None or not keeps_pruned_zero(optimizer)):
            self.masks.apply_to_weights()

    # ------------------------------------------------------------------ topology evolution
    @torch.no_grad()
    def update_topology(self, step: int, total_steps: int, optimizer=None) -> dict:
        """Drop and grow connections of every target layer toward the schedule's target sparsity at ``step``.

        With FSDP2-sharded weights, one layer at a time: gather its weight, gradient and mask, run the same update
        on every rank (same tensors, same seeded generator, so the same full mask), keep this rank's shard."""
        cfg = self.config
        sharded = sharding.any_sharded(self.masks.params.values())
        removed = added = 0
        sparsity = schedule.target_sparsity(step, total_steps, cfg)
        zeta = schedule.drop_fraction(step, total_steps, cfg)
        method = schedule.grow_method(step, total_steps, cfg)
        new_masks, n_drop, n_grow = {}, 0, 0
        for i, (name, density) in enumerate(self.target_densities(sparsity).items()):
            param = self.targets[name].param
            weight, mask = sharding.full(param), self.masks.full_mask(name)
            grad = sharding.full(param.grad) if param.grad is not None else torch.zeros_like(weight)
            generator = self._generator(step, i, param.device)
            if self.block is not None:  # counts in tiles
                target = topology.active_tiles(tuple(param.shape), self.block, density)
                new_masks[name], dropped, grown = topology.evolve_blocks(
                    mask, weight, grad, target, zeta, method, self.block, generator=generator,
                    gradient_fraction=cfg.mixed_gradient_fraction,
                )
            else:
                target = topology.active_count(param.numel(), density)
                new_masks[name], dropped, grown = topology.evolve(
                    mask, weight, grad, target, zeta, method, generator=generator,
                    gradient_fraction=cfg.mixed_gradient_fraction, n_active=self.masks.active(name),
                )
            n_drop += dropped
            n_grow += grown
            if sharded:  # the same full mask on every rank: keep this layer's shard now, free the full tensors
                r, a = self.masks.set_mask(name, new_masks.pop(name), optimizer)
                removed += r
                added += a
        new_masks = self._agree(new_masks) if new_masks else new_masks
        for name, mask in new_masks.items():
            r, a = self.masks.set_mask(name, mask, optimizer, regrow_optimizer_state=cfg.regrow_optimizer_state,
                                       regrow_init=cfg.regrow_init, regrow_init_scale=cfg.regrow_init_scale)
            removed += r
            added += a
        record = {
            "step": step,
            "phase": schedule.phase(step, total_steps, cfg),
            "target_sparsity": sparsity,
            "sparsity": self.masks.sparsity(),
            "drop_fraction": zeta,
            "grow_method": method,
            "dropped": n_drop,
            "grown": n_grow,
            "net_removed": removed,
            "net_added": added,
            "unit": "weights" if self.block is None else f"{self.block}x{self.block} tiles",  # of dropped / grown
        }
        self.history.append(record)
        self.last_update_step = step
        return record

    # ------------------------------------------------------------------ logging
    def metrics(self, global_step: int, total_steps: int) -> dict[str, float]:
        """Scalar ``mst/*`` values describing the optimizer step that ran last (``global_step`` is the number of
        steps done): sparsity, phase index, drop fraction, whether the sparse pattern was on, and the FLOP totals."""
        total = max(total_steps, 1)
        step = self.current_step if self.current_step is not None else global_step
        step = min(step, total - 1)
        return {
            "mst/sparsity": self.masks.sparsity(),
            "mst/phase": float(schedule.PHASES.index(schedule.phase(step, total, self.config))),
            "mst/drop_fraction": schedule.drop_fraction(step, total, self.config),
            "mst/hsa": float(bool(self.hsa_on) and self.hsa_density < 1.0),  # on, and sparse at this length
            "mst/hsa_density": float(self.hsa_density),
            **self.flops.metrics(),  # mst/step_flops, total_flops, dense_total_flops, flop_reduction, ...
        }

    def reset_run(self) -> None:
        """Start a new run on the current masks: the FLOP totals, the update history and the schedule position
        start again (what ``MSTTrainer.train()`` does when called a second time without resuming)."""
        self.flops = FlopMeter(self.flops.flop_model)
        self.history, self.skipped_updates = [], []
        self.last_update_step = self.current_step = None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Everything beyond the masks needed to resume (the random growth needs no state: its generator is a
        function of the seed, the step and the layer)."""
        return {"last_update_step": self.last_update_step, "history": list(self.history),
                "flops": self.flops.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.last_update_step = state.get("last_update_step")
        self.history = list(state.get("history", []))
        if "flops" in state:
            self.flops.load_state_dict(state["flops"])
        else:
            self.flops.invalidate()
