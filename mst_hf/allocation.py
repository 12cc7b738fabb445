"""How a global sparsity is split over the weight matrices MST sparsifies: the one place that turns
``(matrices, MSTConfig, sparsity)`` into per-matrix densities.

The controller (the masks it sets), :func:`mst_hf.layer_sparsities`, the planner, the time prediction and the
FLOP conventions all call :func:`layer_densities`, so they cannot disagree (the LM head's cap once did). It applies
the configured ``sparsity_distribution`` through :func:`mst_hf.topology.allocate` (the primitive: Erdős–Rényi or
uniform) and caps the LM head at ``lm_head_max_sparsity`` (the weights the head keeps above its share come out of
the other matrices, the global sparsity unchanged).

:class:`Matmul` is the record they share: one weight matrix's name, shape and flags, no tensor, so it describes a
model on the ``meta`` device as well as a live one. The FLOP model lists one per ``nn.Linear``/``Conv1D``;
:class:`mst_hf.targets.TargetWeight` is a ``Matmul`` that also holds the live parameter. It is defined here, the
lowest module that reads it. Pure: imports only :mod:`mst_hf.topology`.
"""

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fractions import Fraction

from .topology import active_count, allocate


@dataclass(frozen=True)
class Matmul:
    """One weight matrix applied to every token, ``n_in x n_out``.

    ``name``: its parameter name (the first name of a tied parameter, as in :func:`mst_hf.find_targets`);
    ``is_target``: MST sparsifies it; ``is_lm_head``: the model's output embedding (``lm_head_max_sparsity`` caps
    it); ``tied``: the same tensor as the input token embedding, so its mask sparsifies the embedding too."""

    name: str
    module_name: str
    n_in: int
    n_out: int
    is_target: bool
    is_lm_head: bool = False
    tied: bool = False
    # share of the tokens using it: ``top_k / n_experts`` for fused MoE experts (`mst_hf.targets.MoEWeight`)
    tokens_fraction: Fraction = Fraction(1)

    @property
    def numel(self) -> int:
        return self.n_in * self.n_out

    @property
    def token_numel(self) -> int:
        """Weights one token multiplies: ``numel * tokens_fraction`` (exact for experts: ``n_experts`` divides it)."""
        return self.numel if self.tokens_fraction == 1 else int(self.numel * self.tokens_fraction)


def distinct_targets(matmuls: Iterable[Matmul]) -> list[Matmul]:
    """The targeted matrices, each parameter once (its first record), in the order given. A tensor that two
    modules use (the FLOP model lists it twice, it is applied twice) has one mask, so it is allocated once."""
    seen: dict[str, Matmul] = {}
    for m in matmuls:
        if m.is_target and m.name not in seen:
            seen[m.name] = m
    return list(seen.values())


def layer_densities(matmuls: Iterable[Matmul], mst_config, sparsity: float) -> dict[str, float]:
    """``{parameter name: density}`` of every targeted matrix at global ``sparsity``, as the controller sets them.

    ``matmuls``: :class:`Matmul` records (or ``TargetWeight``); untargeted ones are left out and a parameter listed
    twice counts once (:func:`distinct_targets`). ``mst_config``: an ``MSTConfig`` (or any object with its fields);
    ``sparsity_distribution`` and ``lm_head_max_sparsity`` are read. A tied LM head is allocated as the head (the
    cap applies), once, under its first name.

    1. keep the distinct targets ``i`` with ``N_i = n_in n_out`` weights;
    2. cap ``m_i = lm_head_max_sparsity`` on the LM head, no cap elsewhere;
    3. ``d = topology.allocate(shapes, sparsity, sparsity_distribution, caps)``: ``sum_i d_i N_i = (1 - sparsity)
       sum_i N_i``, with ``d_i >= 1 - m_i``.
    Raises ``ValueError`` for a sparsity outside ``[0, 1)`` or a cap the budget cannot meet.
    """
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"`sparsity` must be a number in [0, 1) (the global fraction of targeted weights removed), "
                         f"got {sparsity!r}.")
    targets = distinct_targets(matmuls)
    cap = getattr(mst_config, "lm_head_max_sparsity", None)
    caps = None if cap is None else [cap if m.is_lm_head else None for m in targets]
    densities = allocate([(m.n_in, m.n_out) for m in targets], sparsity, mst_config.sparsity_distribution, caps)
    return {m.name: d for m, d in zip(targets, densities)}


def counted_sparsity(matmuls: Iterable[Matmul], densities: Mapping[str, float]) -> float:
    """Sparsity of the masks ``densities`` make over the targeted ``matmuls`` (each parameter once):
    ``1 - sum_i a_i / sum_i N_i`` with ``a_i = topology.active_count(N_i, d_i)``, the entries the controller keeps
    (element masks). 0.0 when no weight is targeted."""
    targets = distinct_targets(matmuls)
    total = sum(m.numel for m in targets)
    if not total:
        return 0.0
    return 1.0 - sum(active_count(m.numel, densities[m.name]) for m in targets) / total
