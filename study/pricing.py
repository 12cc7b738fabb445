"""What the study charges a run: the library's FLOP count of that very run under each convention of
:mod:`mst_hf.conventions`, and the dense FLOP shares of a model. Nothing is re-derived here: each convention is the
library's :class:`~mst_hf.flops.FlopModel` for it (:func:`mst_hf.conventions.convention_flop_models`), counted by
a :class:`mst_hf.FlopMeter` fed the steps the run took, so the study's "tiles" are the tiles the Triton kernel
visits (:func:`mst_hf.conventions.triton_tile_pairs`), the same count the planner uses."""

from mst_hf import FlopMeter
from mst_hf.conventions import convention_flop_models


class ConventionMeters:
    """One :class:`~mst_hf.FlopMeter` per convention, all fed the same steps.

    Per optimizer step call :meth:`step` once, with what the step ran with: its sequences, its masks (a
    ``MaskState`` before the topology update, or ``None`` for a dense model), whether the sparse attention ran and
    whether the topology is updated after this backward (the arguments of :meth:`FlopMeter.end_step`). The
    ``headline`` meter then counts exactly what the controller's own meter counts."""

    def __init__(self, flop_model):
        models = convention_flop_models(flop_model)
        self.meters = {name: None if fm is None else FlopMeter(fm) for name, fm in models.items()}

    def step(self, n_sequences: int, seq_len: int, masks=None, hsa_on: bool = False, update_step: bool = False):
        for meter in self.meters.values():
            if meter is not None:
                meter.add_batch(n_sequences, seq_len)
                meter.end_step(masks, hsa_on=hsa_on, update_step=update_step)

    def totals(self) -> dict[str, float | None]:
        """Counted FLOPs so far per convention (``None`` where the convention does not apply: tiles for a pattern
        the Triton kernel does not compute)."""
        return {name: None if m is None else float(m.total_flops) for name, m in self.meters.items()}
