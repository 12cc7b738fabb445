"""The counted FLOP reduction of a planned run under other honest conventions, next to the headline one.

The headline count (:mod:`mst_hf.flops`) credits every weight the masks remove, the tied LM head included, and
charges sparse attention at the exact (query, key) pairs its pattern attends. Each of these is a choice; the
planner prints the reduction under the other reasonable choices so that no single one carries the claim:

* ``headline``: as above;
* ``attention_tiles``: sparse attention charged at the ``64 x 64`` tiles the Triton kernel computes (a visited
  tile costs all its pairs, masked or not), see :func:`triton_tile_pairs`; dense causal attention stays exact in
  both the run and the baseline;
* ``no_attention_credit``: attention always charged as dense causal (the weights alone earn the reduction);
* ``dense_lm_head``: the LM head (the tied embedding) not sparsified: charged dense at every step, the global
  sparsity spread over the other targets only (what ``sparsify_lm_head=False`` trains);
* ``strictest``: no attention credit and a dense LM head together.

All are counted (matmul FLOPs), not timed. Every convention changes the MST run's count only: the dense causal
baseline is the same for all, so the reductions are comparable.
"""

import dataclasses

from . import allocation
from .attention.impl.triton.launch import triton_tile_pairs
from .flops import FlopModel

CONVENTIONS = ("headline", "attention_tiles", "no_attention_credit", "dense_lm_head", "strictest")
DESCRIPTIONS = {
    "headline": "headline (exact attended pairs, head sparsified)",
    "attention_tiles": "sparse attention at the Triton kernel's 64x64 tiles",
    "no_attention_credit": "no attention credit (dense causal attention)",
    "dense_lm_head": "dense LM head (not sparsified)",
    "strictest": "no attention credit and dense LM head",
}


@dataclasses.dataclass(frozen=True)
class TiledFlopModel(FlopModel):
    """A :class:`FlopModel` whose sparse-attention layers are charged at the Triton kernel's tiles."""

    def attended_pairs_x2(self, seq_len: int, hsa_on: bool) -> int:
        n_sparse = len(self.hsa_layers) if hsa_on and self.hsa.pattern != "dense" else 0
        tiles = triton_tile_pairs(self.hsa, seq_len) if n_sparse else None
        if tiles is None:
            return super().attended_pairs_x2(seq_len, hsa_on)
        return (self.n_layers - n_sparse) * seq_len * (seq_len + 1) + n_sparse * 2 * tiles


def convention_flop_models(flop_model: FlopModel) -> dict[str, FlopModel | None]:
    """The :class:`FlopModel` that counts the run under each convention (``None`` where a convention does not
    apply: tiles for a pattern the Triton kernel does not compute)."""
    fields = {f.name: getattr(flop_model, f.name) for f in dataclasses.fields(flop_model) if f.init}
    computable = triton_tile_pairs(flop_model.hsa, 256) is not None or flop_model.hsa.pattern == "dense"
    dense_head = tuple(dataclasses.replace(m, is_target=False) if m.is_lm_head else m for m in flop_model.matmuls)
    return {
        "headline": flop_model,
        "attention_tiles": TiledFlopModel(**fields) if computable else None,
        "no_attention_credit": FlopModel(**{**fields, "hsa_layers": ()}),
        "dense_lm_head": FlopModel(**{**fields, "matmuls": dense_head}),
        "strictest": FlopModel(**{**fields, "hsa_layers": (), "matmuls": dense_head}),
    }


def lm_head_sparsity(flop_model: FlopModel, mst_config, sparsity: float) -> dict[str, float] | None:
    """At global ``sparsity``: the LM head's sparsity and the sparsity of the other targets together, as the
    controller allocates them (``lm_head_max_sparsity`` included); ``None`` when the head is not a target."""
    targets = allocation.distinct_targets(flop_model.matmuls)
    head = [m for m in targets if m.is_lm_head]
    if not head:
        return None
    densities = allocation.layer_densities(targets, mst_config, sparsity)
    rest = [m for m in targets if not m.is_lm_head]
    return {"lm_head": allocation.counted_sparsity(head, densities),
            "other_targets": allocation.counted_sparsity(rest, densities),
            "lm_head_share": sum(m.numel for m in head) / sum(m.numel for m in targets)}
