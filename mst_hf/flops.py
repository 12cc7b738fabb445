"""Training-FLOP accounting of Mixed Sparsity Training, from the model's real matmul shapes.

We count matmul FLOPs per training token, as RigL (Evci et al. 2020) and the MST paper do; norms, softmax,
biases and embedding lookups are ignored (SPEC section 3):

* a weight matrix ``n_in x n_out`` with ``a`` active entries (density ``d = a / (n_in n_out)``) costs
  ``2 a`` in the forward and ``4 a`` in the backward (input gradient and weight gradient): ``6 a`` per token;
* on a topology-update step the weight gradient is also needed for the inactive part (the grow criterion reads
  the dense gradient): ``+ 2 (n_in n_out - a)`` per token;
* attention, per layer and token: ``4 * d_attn * k_bar`` forward (``Q K^T`` and ``A V``), twice that backward,
  so ``12 * d_attn * k_bar``, where ``d_attn = num_heads * head_dim`` of the queries and ``k_bar`` is the mean
  number of keys a query attends (exact, from :func:`mst_hf.attention.patterns.mean_attended_keys`, causal included).

Every ``nn.Linear``/``Conv1D`` of the model counts, targeted or not (an untargeted matrix is simply dense), and
the LM head counts once even when it is tied to the token embedding. GQA needs nothing special: the k/v
projections have their real (smaller) shapes, and attention FLOPs depend on the query heads only.

**Dense baseline (our convention): causal.** ``C_dense = 6 N + 12 L d_attn (T + 1) / 2`` per token, where ``N``
is the number of matmul weights and ``T`` the sequence length: every query ``q`` attends ``q + 1`` keys, so
``k_bar = (T + 1) / 2``. nanoGPT's ``6 N + 12 L d T`` (Kaplan et al. 2020, PaLM appendix B) is the same
formula with ``k_bar = T`` (every key counted, no causal halving); ``dense_token_flops(..., causal=False)``
returns it. MST totals and reductions are always against the causal baseline, so that a run with nothing
sparse reports exactly 1.0.

Exactness: weight terms are integers (active counts, not rounded densities), and attention per sequence is
``12 d_attn * sum_q keys(q)``, an integer, so per-step counts are exact integers whenever the step holds whole
sequences, and totals are exact Python integers. The planner (:mod:`mst_hf.plan`) and the runtime
:class:`FlopMeter` use the same functions, so a run's logged total equals its plan.
"""

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from torch import nn
from transformers.pytorch_utils import Conv1D

from .allocation import Matmul  # the one weight-matrix record (also mst_hf.flops.Matmul)
from .attention.patterns import HSASpec
from .targets import find_targets, moe_weights, unwrap_model
from .topology import active_count
from .windows import layer_k_bar, layer_windows

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- the shapes of a model


@dataclass(frozen=True)
class FlopModel:
    """Everything the FLOP count needs to know about a model: matmul shapes, attention size, and the HSA settings.

    ``hsa`` is the `HSASpec` of the run; ``hsa_layers`` are the layer indices that use its pattern when HSA is on
    (``hsa.sparse_layers(n_layers)``; the others stay dense causal). ``layer_windows``: each layer's own sliding
    window (``None``: full; empty: none has one), `mst_hf.windows.layer_windows`, intersected with the pattern.
    """

    matmuls: tuple[Matmul, ...]
    n_layers: int
    attn_dim: int
    hsa_layers: tuple[int, ...] = ()
    hsa: HSASpec = HSASpec(pattern="dense")
    max_seq_len: int | None = None
    layer_windows: tuple[int | None, ...] = ()
    _pairs_cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def n_params(self) -> int:
        """``N``: matmul weights (LM head once)."""
        return sum(m.numel for m in self.matmuls)

    @property
    def n_token_params(self) -> int:
        """Matmul weights one token multiplies: ``N`` less the experts a token does not use (``N`` without MoE)."""
        return sum(m.token_numel for m in self.matmuls)

    @property
    def targets(self) -> tuple[Matmul, ...]:
        return tuple(m for m in self.matmuls if m.is_target)

    def attended_pairs_x2(self, seq_len: int, hsa_on: bool) -> int:
        """Twice the number of attended (query, key) pairs of one sequence, summed over layers (twice: with
        ``hsa_head_split`` half the heads attend locally and half strided, so a layer's mean can be a half-integer)."""
        key = (seq_len, bool(hsa_on))
        if key not in self._pairs_cache:
            # exact: each mean is an integer (or half-integer) over seq_len
            self._pairs_cache[key] = sum(round(2 * k * seq_len) for k in self.k_bar(seq_len, hsa_on))
        return self._pairs_cache[key]

    def k_bar(self, seq_len: int, hsa_on: bool) -> list[float]:
        """Mean attended keys per query, per layer, for sequences of ``seq_len`` tokens (`mst_hf.windows.layer_k_bar`:
        ``(T + 1) / 2`` dense causal, the HSA pattern's mean on a sparse layer, each within its sliding window)."""
        sparse = self.hsa_layers if hsa_on and self.hsa.pattern != "dense" else ()
        return layer_k_bar(self.hsa, sparse, self.layer_windows or (None,) * self.n_layers, seq_len)

    def attention_density(self, seq_len: int, hsa_on: bool) -> float:
        """Attended pairs over those of the dense baseline (causal, each layer within its own sliding window),
        averaged over layers: 1.0 for the model's own attention."""
        if self.n_layers == 0:
            return 1.0
        return self.attended_pairs_x2(seq_len, hsa_on) / self.attended_pairs_x2(seq_len, False)


def hsa_layer_indices(hsa_layers, n_layers: int) -> tuple[int, ...]:
    """Layers that use the sparse pattern: ``"all"``, ``"alternate"`` (0, 2, 4, ...) or an explicit list of indices
    (`HSASpec.sparse_layers`, the rule the attention uses)."""
    return HSASpec(layers=hsa_layers).sparse_layers(n_layers)


def _attention_size(config) -> tuple[int, int]:
    """``(num_hidden_layers, num_heads * head_dim)`` of a transformers config, or ``(0, 0)`` when unknown."""
    if config is None:
        return 0, 0
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    n_layers = getattr(config, "num_hidden_layers", None)
    n_heads = getattr(config, "num_attention_heads", None)
    head_dim = getattr(config, "head_dim", None)
    if head_dim is None and n_heads:
        hidden = getattr(config, "hidden_size", None)
        head_dim = hidden // n_heads if hidden else None
    if not n_layers or not n_heads or not head_dim:
        return 0, 0
    return int(n_layers), int(n_heads) * int(head_dim)


def model_flop_shapes(model: nn.Module, mst_config=None) -> FlopModel:
    """Read a model's matmul shapes (every ``nn.Linear``/``Conv1D``, the LM head once), its attention size from
    its config, and the HSA settings of ``mst_config`` (default: ``MSTConfig()``). Works on the ``meta`` device."""
    if mst_config is None:
        from .config import MSTConfig

        mst_config = MSTConfig()
    model = unwrap_model(model)
    target_names = set(find_targets(model, mst_config))
    first_names: dict[int, str] = {}  # a tied parameter is known by its first name, as in find_targets
    for n, p in model.named_parameters():
        first_names.setdefault(id(p), n)
    matmuls = []
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    embedding_weight = getattr(embedding, "weight", None)
    for module_name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, (nn.Linear, Conv1D)) or weight is None or weight.ndim != 2:
            continue
        name = first_names.get(id(weight), module_name + ".weight")
        n_in, n_out = weight.shape if isinstance(module, Conv1D) else weight.shape[::-1]  # Conv1D stores (in, out)
        matmuls.append(Matmul(name, module_name, int(n_in), int(n_out), name in target_names, module is head,
                              weight is embedding_weight))
    for w in moe_weights(model):  # fused 3-D expert tensors and MoE routers (not nn.Linear): dense, never targets
        matmuls.append(Matmul(w.name, w.module_name, w.n_in, w.n_out, False, tokens_fraction=w.tokens_fraction))

    config = getattr(model, "config", None)
    n_layers, attn_dim = _attention_size(config)
    if n_layers == 0:
        logger.warning("MST FLOP count: the model config has no num_hidden_layers/num_attention_heads; attention "
                       "FLOPs are not counted (matmul weights are).")
    max_seq_len, windows = None, ()
    if config is not None:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        max_seq_len = getattr(text, "max_position_embeddings", None)
        windows = layer_windows(text, n_layers)
    hsa = HSASpec.from_config(mst_config)
    return FlopModel(
        matmuls=tuple(matmuls),
        n_layers=n_layers,
        attn_dim=attn_dim,
        hsa_layers=hsa.sparse_layers(n_layers),
        hsa=hsa,
        max_seq_len=max_seq_len,
        layer_windows=windows,
    )


# --------------------------------------------------------------------------- counting


def active_weights(flop_model: FlopModel, densities: Mapping[str, float] | None = None) -> dict[str, int]:
    """Active entries per matmul parameter: ``active_count(numel, densities[name])`` (round half up, as the
    controller sets them) for the names given, every entry otherwise."""
    known = {m.name: m.numel for m in flop_model.matmuls}
    densities = densities or {}
    unknown = sorted(set(densities) - set(known))
    if unknown:
        raise ValueError(f"`densities` names parameters {unknown[:5]} that are not matmul weights of this model; "
                         f"use the names of `FlopModel.matmuls` (e.g. {next(iter(known), None)!r}).")
    return {name: active_count(numel, densities[name]) if name in densities else numel
            for name, numel in known.items()}


def _weight_flops(flop_model: FlopModel, active: Mapping[str, int], update_step: bool) -> int:
    """Per-token weight FLOPs from active counts: ``6 a`` per matrix, ``+ 2 (numel - a)`` on an update step."""
    total = 0
    for m in flop_model.matmuls:
        if m.tokens_fraction != 1:  # a fused expert tensor: never a target, dense for the tokens routed to it
            total += 6 * m.token_numel
            continue
        a = active.get(m.name, m.numel)
        total += 6 * a + (2 * (m.numel - a) if update_step else 0)
    return total


def weight_token_flops(flop_model: FlopModel, densities: Mapping[str, float] | None = None,
                       update_step: bool = False) -> int:
    """Matmul FLOPs (forward + backward) of one training token at the given per-parameter densities (others dense)."""
    return _weight_flops(flop_model, active_weights(flop_model, densities), update_step)


def attention_token_flops(flop_model: FlopModel, k_bar: float | Sequence[float]) -> float:
    """``12 * d_attn * sum_l k_bar_l``: attention FLOPs of one token (one ``k_bar`` for every layer, or one each)."""
    if isinstance(k_bar, (int, float)):
        return 12 * flop_model.attn_dim * k_bar * flop_model.n_layers
    if len(k_bar) != flop_model.n_layers:
        raise ValueError(f"`k_bar` has {len(k_bar)} entries but the model has {flop_model.n_layers} layers; give "
                         "one number, or one per layer.")
    return 12 * flop_model.attn_dim * sum(k_bar)


def token_flops(flop_model: FlopModel, densities: Mapping[str, float] | None, k_bar: float | Sequence[float],
                update_step: bool = False) -> float:
    """Training FLOPs of one token: :func:`weight_token_flops` + :func:`attention_token_flops`."""
    return weight_token_flops(flop_model, densities, update_step) + attention_token_flops(flop_model, k_bar)


def dense_token_flops(flop_model: FlopModel, seq_len: int, causal: bool = True) -> int | float:
    """The dense baseline per token: ``6 N + 12 L d_attn (T + 1) / 2`` (causal, our convention), or with
    ``causal=False`` nanoGPT's ``6 N + 12 L d_attn T``. ``N``: the weights a token multiplies (MoE: its ``top_k``
    experts); a layer with a sliding window ``w`` has ``k_bar = sum_q min(q + 1, w) / T`` (causal only)."""
    n, L, d = flop_model.n_token_params, flop_model.n_layers, flop_model.attn_dim
    if causal:
        return 6 * n + _attention_step_flops(flop_model, 1, seq_len, False)
    return 6 * n + 12 * L * d * seq_len


def dense_flop_shares(flop_model: FlopModel, seq_len: int) -> dict[str, float]:
    """Shares of the dense causal training FLOPs per token (:func:`dense_token_flops`): the LM head, the other
    matmuls (transformer blocks, MoE experts at their ``top_k``) and attention (``Q K^T`` and ``A V``)."""
    total = dense_token_flops(flop_model, seq_len)
    head = 6 * sum(m.token_numel for m in flop_model.matmuls if m.is_lm_head)
    weights = 6 * flop_model.n_token_params
    return {"head": head / total, "blocks": (weights - head) / total, "attention": (total - weights) / total,
            "dense_token_flops": total}


def _attention_step_flops(flop_model: FlopModel, tokens: int, seq_len: int, hsa_on: bool) -> int | float:
    """Attention FLOPs of ``tokens`` tokens in sequences of ``seq_len``: ``6 d_attn * (2 pairs) * sequences``."""
    numerator = 6 * flop_model.attn_dim * flop_model.attended_pairs_x2(seq_len, hsa_on) * tokens
    return numerator // seq_len if numerator % seq_len == 0 else numerator / seq_len


def step_flops(flop_model: FlopModel, densities: Mapping[str, float] | None, tokens: int, seq_len: int,
               hsa_on: bool = False, update_step: bool = False) -> int | float:
    """Training FLOPs of one optimizer step over ``tokens`` tokens (all ranks) in sequences of ``seq_len``.

    An exact integer when ``tokens`` is a multiple of ``seq_len``."""
    weights = tokens * weight_token_flops(flop_model, densities, update_step)
    return weights + _attention_step_flops(flop_model, tokens, seq_len, hsa_on)


def dense_step_flops(flop_model: FlopModel, tokens: int, seq_len: int) -> int | float:
    """The dense causal baseline of one step: ``tokens * dense_token_flops(seq_len)``."""
    return step_flops(flop_model, None, tokens, seq_len)


# --------------------------------------------------------------------------- runtime accounting


class FlopMeter:
    """Running FLOP totals of a training run, global over all ranks.

    Per optimizer step: :meth:`add_batch` (or :meth:`add_inputs`) for every micro-batch, then :meth:`end_step`
    once, after the backward and *before* the topology update, with the masks the step's forward and backward ran
    with (an update step pays the dense weight gradient of their inactive part; the new masks count from the next
    step on). Active counts read from a :class:`~mst_hf.MaskState` are cached until the next update step or
    :meth:`load_state_dict`; call :meth:`invalidate` after changing masks any other way. A step closed with no batch
    counted (``uncounted_steps``) leaves the totals incomplete: ``flop_reduction`` is NaN from then on. Only the masks
    of the flop model's targets are read: a matrix it counts dense (e.g. the head of the ``dense_lm_head`` model of
    :func:`mst_hf.conventions.convention_flop_models`) is charged dense whatever its mask, so one run's masks can be
    priced under each convention.
    """

    def __init__(self, flop_model: FlopModel):
        self.flop_model = flop_model
        self.total_flops: int | float = 0
        self.dense_total_flops: int | float = 0
        self.tokens = 0
        self.steps = 0
        self.uncounted_steps = 0  # steps closed without any batch counted: the totals miss them
        self.step_flops: int | float = 0
        self.attention_density = 1.0
        self._pending: dict[int, int] = {}  # seq_len -> sequences in the current step
        self._active: dict[str, int] | None = None
        self._warned = False

    def add_batch(self, n_sequences: int, seq_len: int) -> None:
        """Count ``n_sequences`` sequences of ``seq_len`` tokens (all ranks) in the current step."""
        if n_sequences > 0 and seq_len > 0:
            self._pending[seq_len] = self._pending.get(seq_len, 0) + int(n_sequences)

    def add_inputs(self, inputs: Mapping, world_size: int = 1) -> None:
        """Count one micro-batch from its ``input_ids`` (or ``inputs_embeds``), times ``world_size`` ranks (every
        rank is assumed to see the same shape). Padding tokens count: the matmuls run on them too."""
        ids = inputs.get("input_ids") if isinstance(inputs, Mapping) else None
        shape = tuple(ids.shape) if ids is not None else None
        if shape is None and isinstance(inputs, Mapping) and inputs.get("inputs_embeds") is not None:
            shape = tuple(inputs["inputs_embeds"].shape[:-1])
        if not shape:
            if not self._warned:
                logger.warning("MST FLOP count: a batch has neither `input_ids` nor `inputs_embeds`; not counted.")
                self._warned = True
            return
        n_sequences = 1
        for size in shape[:-1]:
            n_sequences *= int(size)
        self.add_batch(n_sequences * world_size, int(shape[-1]))

    def invalidate(self) -> None:
        """Forget the cached active counts (re-read from the masks at the next step)."""
        self._active = None

    def _active_counts(self, masks) -> dict[str, int]:
        if masks is None:
            return {}
        if isinstance(masks, Mapping):  # densities by parameter name
            return active_weights(self.flop_model, masks)
        if self._active is None:  # a MaskState: its counts are cached until a mask changes
            targets = {m.name for m in self.flop_model.targets}  # a mask on a matrix counted dense is not read
            self._active = {name: masks.active(name) for name in masks.masks if name in targets}
        return self._active

    def end_step(self, masks=None, hsa_on: bool = False, update_step: bool = False) -> int | float:
        """Close the current step and add it to the totals; returns its FLOPs.

        ``masks``: the :class:`~mst_hf.MaskState` (or ``{name: density}``, or ``None`` for dense) in force during
        the step; ``hsa_on``: whether the sparse attention pattern ran; ``update_step``: whether the topology is
        updated after this backward."""
        fm = self.flop_model
        weights = _weight_flops(fm, self._active_counts(masks), update_step)
        dense_weights = 6 * fm.n_token_params
        flops = dense = pairs = dense_pairs = 0
        for seq_len, n in sorted(self._pending.items()):
            tokens = n * seq_len
            flops += tokens * weights + _attention_step_flops(fm, tokens, seq_len, hsa_on)
            dense += tokens * dense_weights + _attention_step_flops(fm, tokens, seq_len, False)
            pairs += n * fm.attended_pairs_x2(seq_len, hsa_on)
            dense_pairs += n * fm.attended_pairs_x2(seq_len, False)
            self.tokens += tokens
        if dense_pairs:
            self.attention_density = pairs / dense_pairs
        if not self._pending:
            self.uncounted_steps += 1
        self.step_flops = flops
        self.total_flops += flops
        self.dense_total_flops += dense
        self.steps += 1
        self._pending = {}
        if update_step:
            self.invalidate()  # the masks are about to change
        return flops

    @property
    def flop_reduction(self) -> float:
        """Dense total over MST total (1.0 before anything is counted; NaN once a step closed with no batch counted,
        since the totals then miss that step)."""
        if self.uncounted_steps:
            return float("nan")
        return self.dense_total_flops / self.total_flops if self.total_flops else 1.0

    def metrics(self) -> dict[str, float]:
        """The ``mst/*`` FLOP values for logs (floats, so every logger can plot them)."""
        return {
            "mst/step_flops": float(self.step_flops),
            "mst/total_flops": float(self.total_flops),
            "mst/dense_total_flops": float(self.dense_total_flops),
            "mst/flop_reduction": float(self.flop_reduction),
            "mst/attention_density": float(self.attention_density),
        }

    def state_dict(self) -> dict:
        """JSON-ready totals (exact integers where the counts are), so a resumed run continues them."""
        return {
            "total_flops": self.total_flops,
            "dense_total_flops": self.dense_total_flops,
            "tokens": self.tokens,
            "steps": self.steps,
            "uncounted_steps": self.uncounted_steps,
            "step_flops": self.step_flops,
            "attention_density": self.attention_density,
        }

    def load_state_dict(self, state: Mapping) -> None:
        for key, value in self.state_dict().items():
            setattr(self, key, state.get(key, value))
        self._pending = {}
        self.invalidate()
