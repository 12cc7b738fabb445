"""Hybrid Sparse Attention (HSA): the settings (`HSASpec`) and the patterns as pure mask functions.

`HSASpec` is the one in-code form of the HSA settings (pattern, window, stride, block, layers, head split,
backend) and the only place they are validated. The other forms are serialisation at the edges: `MSTConfig` keeps
flat ``hsa_*`` fields (read once with `HSASpec.from_config`), and the model's ``config.mst_hsa`` dict is
`HSASpec.to_state`, read back with `HSASpec.from_state` (cached: the mask function reads it on every forward, and
builds and validates a spec only for a dict it has not seen). Per-length answers (`HSASpec.density`) are cached too.

A pattern is a function ``fn(b, h, q_idx, kv_idx) -> bool`` (FlexAttention's ``mask_mod`` signature) that says
whether query position ``q_idx`` may attend key position ``kv_idx``. The arguments are integer tensors that
broadcast against each other (or plain ints), so the same function builds a dense boolean mask, a FlexAttention
``BlockMask`` and transformers' ``mask_function`` overlays. Validation happens in the factories: the returned
functions are traced and must stay branch-free.

Definitions (Child et al. 2019, "Generating Long Sequences with Sparse Transformers"), with ``d = q - k``:

- ``local(w)``:         ``0 <= d < w``
- ``strided(s)``:       ``d >= 0 and d % s == 0``
- ``local_strided``:    the union of the two
- ``fixed(c)``:         ``d >= 0 and (q // c == k // c or k % c == c - 1)`` (own block, or a summary position)
- ``dense``:            ``d >= 0`` (causal)

This module imports torch and the standard library only; it knows nothing of transformers (a leaf).
"""

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

PATTERNS = ("dense", "local", "strided", "local_strided", "fixed")
LAYER_CHOICES = ("all", "alternate")
BACKENDS = ("auto", "flex", "triton", "sdpa", "eager")
DEFAULT_SIZE = 128  # the default window, stride and block, in positions (Child et al. use sqrt(T)-sized ones)

MaskFn = Callable[..., torch.Tensor]


def _check_positive_int(name: str, value, not_int: type[Exception] = TypeError) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise not_int(f"`{name}` must be a positive int, got {value!r} of type {type(value).__name__}.")
    if value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value}. Use a value >= 1.")
    return value


# ---------------------------------------------------------------------------------------------------------------
# The settings
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HSASpec:
    """Hybrid sparse attention settings: which pattern, its sizes, where it applies and which kernel computes it.

    Frozen and hashable (it keys the mask and kernel caches). Validated on construction, one rule per ``if``: a bad
    value raises ``ValueError`` (``TypeError`` for a non-bool flag) naming the field and the value.

    Args:
        pattern: one of `PATTERNS`; ``"dense"`` is plain causal attention.
        window / stride / block: the local window, the stride, and the block of ``"fixed"``, in positions.
        layers: ``"all"``, ``"alternate"`` (even layers 0, 2, ... sparse, odd layers dense) or layer indices
            (stored as a sorted tuple without repeats).
        head_split: the first half of the heads local, the second half strided (``"local_strided"`` only).
        backend: ``"auto"`` (measured, fastest), ``"flex"``, ``"triton"``, ``"sdpa"`` (boolean mask) or
            ``"eager"`` (the float32 reference).
    """

    pattern: str = "local_strided"
    window: int = DEFAULT_SIZE
    stride: int = DEFAULT_SIZE
    block: int = DEFAULT_SIZE
    layers: str | tuple[int, ...] = "all"
    head_split: bool = False
    backend: str = "auto"

    def __post_init__(self):
        object.__setattr__(self, "layers", _validate(dataclasses.asdict(self), prefix="")["layers"])

    @classmethod
    def from_config(cls, config, prefix: str = "hsa_") -> "HSASpec":
        """The spec of an object with flat ``hsa_*`` attributes (an `MSTConfig`); errors name those attributes.
        Attributes it lacks (``hsa_backend`` on `MSTConfig`) keep the defaults."""
        values = {f.name: getattr(config, prefix + f.name) for f in dataclasses.fields(cls)
                  if hasattr(config, prefix + f.name)}
        return cls(**_validate({**dataclasses.asdict(cls()), **values}, prefix))

    @classmethod
    def from_state(cls, state) -> "HSASpec":
        """The spec stored in a model config's ``mst_hsa`` dict (see `to_state`); missing keys keep the defaults.
        The one reader of that dict, called on every forward: cached by the dict's contents (``active`` aside), so
        only a dict not seen before is validated, and switching the pattern on and off returns the same object."""
        if not isinstance(state, dict):
            raise TypeError(
                f"`config.mst_hsa` must be a dict, got {type(state).__name__}. Use configure_hsa(model, spec)."
            )
        check_active(state.get("active", False))
        key = _state_key(state)
        try:
            return _FROM_STATE[key]
        except (KeyError, TypeError):  # not seen yet, or a value that is not hashable (validation reports it)
            pass
        unknown = set(state) - set(STATE_KEYS)
        if unknown:
            raise ValueError(f"Unknown HSA keys {sorted(unknown)}; valid keys: {sorted(STATE_KEYS)}.")
        spec = cls(**{k: v for k, v in state.items() if k != "active"})
        _FROM_STATE[key] = spec  # validated, so hashable
        return spec

    def to_state(self, active: bool = False) -> dict:
        """The JSON-ready dict a model config stores as ``mst_hsa``: the fields plus the on/off switch ``active``.
        `from_state` reads it back as this very object (so caches keyed by the spec see one object per run)."""
        state = dataclasses.asdict(self)
        state["layers"] = list(self.layers) if isinstance(self.layers, tuple) else self.layers
        state["active"] = check_active(active)
        _FROM_STATE[_state_key(state)] = self
        return state

    def mask_fn(self, num_heads: int | None = None) -> MaskFn:
        """The pattern's mask function (`num_heads` is needed with ``head_split``)."""
        return pattern_mask_fn(self.pattern, self.window, self.stride, self.block, self.head_split, num_heads)

    def layer_is_sparse(self, layer_idx: int | None) -> bool:
        """Whether layer `layer_idx` uses the pattern (a module without ``layer_idx`` counts as selected)."""
        if self.layers == "all" or layer_idx is None:
            return True
        if self.layers == "alternate":
            return layer_idx % 2 == 0
        return layer_idx in self.layers

    def sparse_layers(self, n_layers: int) -> tuple[int, ...]:
        """The indices, among ``0..n_layers-1``, of the layers that use the pattern; listed layers the model does
        not have are refused."""
        if isinstance(self.layers, tuple):
            bad = [i for i in self.layers if i >= n_layers]
            if bad and n_layers:
                raise ValueError(
                    f"`layers` (`hsa_layers` of MSTConfig) lists layers {bad} but the model has {n_layers} layers "
                    f"(indices 0..{n_layers - 1}); remove them or use 'all' / 'alternate'."
                )
        return tuple(i for i in range(n_layers) if self.layer_is_sparse(i))

    def mean_attended_keys(self, seq_len: int) -> float:
        """`mean_attended_keys` of this pattern at `seq_len`."""
        return mean_attended_keys(self.pattern, seq_len, self.window, self.stride, self.block, self.head_split)

    def density(self, seq_len: int) -> float:
        """Attended over causal (query, key) pairs of a sparse layer at `seq_len`: 1.0 when the pattern admits
        every causal pair there (e.g. ``local_strided`` with ``window >= seq_len``). Cached per length."""
        return attention_density(self.pattern, seq_len, self.window, self.stride, self.block, self.head_split)


STATE_KEYS = (*(f.name for f in dataclasses.fields(HSASpec)), "active")
_FROM_STATE: dict = {}  # `_state_key` -> HSASpec: one entry per distinct settings dict read or written


def _state_key(state: dict) -> tuple:
    """The key of an ``mst_hsa`` dict without ``active``, value types included (``head_split=1`` must not find the
    spec of ``head_split=True``)."""
    return tuple((k, type(v), tuple(v) if isinstance(v, list) else v) for k, v in state.items() if k != "active")


def check_active(active) -> bool:
    """The HSA on/off switch must be a bool."""
    if not isinstance(active, bool):
        raise TypeError(f"`active` must be a bool, got {active!r}.")
    return active


def _validate(values: dict, prefix: str) -> dict:
    """Check HSASpec field values (one rule per ``if``), naming fields as ``prefix + name``; returns them with
    ``layers`` normalised (a sorted tuple of distinct indices, or a layer choice)."""
    p = prefix
    if values["pattern"] not in PATTERNS:
        raise ValueError(f"`{p}pattern` must be one of {', '.join(PATTERNS)}, got {values['pattern']!r}.")
    for name in ("window", "stride", "block"):
        _check_positive_int(p + name, values[name], not_int=ValueError)
    layers = values["layers"]
    if isinstance(layers, str):
        if layers not in LAYER_CHOICES:
            raise ValueError(f"`{p}layers` must be 'all', 'alternate' or a list of layer indices, got {layers!r}.")
    elif isinstance(layers, (list, tuple)):
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
            raise ValueError(f"`{p}layers` must list layer indices >= 0 (ints), got {list(layers)!r}.")
        layers = tuple(sorted(set(layers)))
    else:
        raise ValueError(f"`{p}layers` must be 'all', 'alternate' or a list of layer indices, got {layers!r}.")
    if not isinstance(values["head_split"], bool):
        raise TypeError(f"`{p}head_split` must be True or False, got {values['head_split']!r}.")
    if values["head_split"] and values["pattern"] != "local_strided":
        raise ValueError(
            f"`{p}head_split=True` splits heads between the local and strided halves of 'local_strided'; it needs "
            f"`{p}pattern='local_strided'`, got {values['pattern']!r}."
        )
    if values["backend"] not in BACKENDS:
        raise ValueError(f"`{p}backend` must be one of {', '.join(BACKENDS)}, got {values['backend']!r}.")
    return {**values, "layers": layers}


# ---------------------------------------------------------------------------------------------------------------
# Mask functions
# ---------------------------------------------------------------------------------------------------------------


def check_pattern_name(pattern) -> str:
    """Return `pattern` if it names a known pattern, else raise a ValueError listing the valid names."""
    if pattern not in PATTERNS:
        raise ValueError(f"Unknown HSA pattern {pattern!r}. Valid patterns: {', '.join(PATTERNS)}.")
    return pattern


def generate_dense_causal_mask() -> MaskFn:
    """Causal attention: every key at or before the query."""

    def dense_causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    return dense_causal


def generate_local_mask(window: int) -> MaskFn:
    """Sliding window of `window` keys ending at the query: ``0 <= q - k < window``."""
    _check_positive_int("window", window)

    def local_mask(b, h, q_idx, kv_idx):
        diff = q_idx - kv_idx
        return (diff >= 0) & (diff < window)

    local_mask.__name__ = f"local_{window}"
    return local_mask


def generate_strided_mask(stride: int) -> MaskFn:
    """Every `stride`-th key back from the query: ``q >= k and (q - k) % stride == 0``."""
    _check_positive_int("stride", stride)

    def strided_mask(b, h, q_idx, kv_idx):
        diff = q_idx - kv_idx
        return (diff >= 0) & (diff % stride == 0)

    strided_mask.__name__ = f"strided_{stride}"
    return strided_mask


def generate_local_strided_mask(window: int, stride: int) -> MaskFn:
    """Union of `local(window)` and `strided(stride)` (Sparse Transformer "strided" attention, both heads merged)."""
    _check_positive_int("window", window)
    _check_positive_int("stride", stride)

    def local_strided_mask(b, h, q_idx, kv_idx):
        diff = q_idx - kv_idx
        return (diff >= 0) & ((diff < window) | (diff % stride == 0))

    local_strided_mask.__name__ = f"local_{window}_strided_{stride}"
    return local_strided_mask


def generate_fixed_mask(block: int) -> MaskFn:
    """Sparse Transformer "fixed" attention: causal, and the key is in the query's block of `block` positions
    or is a summary position (the last of a block, ``k % block == block - 1``)."""
    _check_positive_int("block", block)

    def fixed_mask(b, h, q_idx, kv_idx):
        same_block = (q_idx // block) == (kv_idx // block)
        summary = (kv_idx % block) == (block - 1)
        return (q_idx >= kv_idx) & (same_block | summary)

    fixed_mask.__name__ = f"fixed_{block}"
    return fixed_mask


def generate_head_split_mask(window: int, stride: int, num_heads: int) -> MaskFn:
    """Heads ``[0, num_heads // 2)`` attend `local(window)`, the other half `strided(stride)`."""
    _check_positive_int("window", window)
    _check_positive_int("stride", stride)
    _check_positive_int("num_heads", num_heads)
    if num_heads % 2:
        raise ValueError(f"`head_split=True` needs an even number of heads, got num_heads={num_heads}.")
    half = num_heads // 2

    def head_split_mask(b, h, q_idx, kv_idx):
        diff = q_idx - kv_idx
        local = (diff >= 0) & (diff < window)
        strided = (diff >= 0) & (diff % stride == 0)
        is_local_head = h < half
        return (is_local_head & local) | (~is_local_head & strided)

    head_split_mask.__name__ = f"head_split_local_{window}_strided_{stride}"
    return head_split_mask


def pattern_mask_fn(
    pattern: str,
    window: int = DEFAULT_SIZE,
    stride: int = DEFAULT_SIZE,
    block: int = DEFAULT_SIZE,
    head_split: bool = False,
    num_heads: int | None = None,
) -> MaskFn:
    """Resolve a pattern name to its mask function.

    With ``head_split=True`` the pattern must be ``"local_strided"``: instead of the union on every head, half the
    heads (the first ``num_heads // 2``) attend locally and the other half strided; `num_heads` is then required.
    """
    check_pattern_name(pattern)
    if not isinstance(head_split, bool):
        raise TypeError(f"`head_split` must be a bool, got {head_split!r}.")
    if head_split:
        if pattern != "local_strided":
            raise ValueError(
                f"`head_split=True` splits heads between local and strided attention; it needs "
                f"pattern='local_strided', got pattern={pattern!r}."
            )
        if num_heads is None:
            raise ValueError("`head_split=True` needs `num_heads` (the number of query heads).")
        return generate_head_split_mask(window, stride, num_heads)
    if pattern == "dense":
        return generate_dense_causal_mask()
    if pattern == "local":
        return generate_local_mask(window)
    if pattern == "strided":
        return generate_strided_mask(stride)
    if pattern == "local_strided":
        return generate_local_strided_mask(window, stride)
    return generate_fixed_mask(block)


def _attended_per_query(pattern: str, q: torch.Tensor, window: int, stride: int, block: int) -> torch.Tensor:
    """Number of keys ``k <= q`` each query position in `q` (int64) attends, in closed form."""
    if pattern == "dense":
        return q + 1
    local = torch.clamp(q + 1, max=window)  # keys q-w+1 .. q
    strided = q // stride + 1  # keys q, q-s, q-2s, ... >= 0
    if pattern == "local":
        return local
    if pattern == "strided":
        return strided
    if pattern == "local_strided":
        # keys in both sets: q - j*s with j*s <= q and j*s < w
        overlap = torch.clamp(q // stride, max=(window - 1) // stride) + 1
        return local + strided - overlap
    # fixed: the block's keys up to q, plus the summary key of every earlier block
    return q % block + 1 + q // block


@functools.lru_cache(maxsize=4096, typed=True)
def mean_attended_keys(
    pattern: str,
    seq_len: int,
    window: int = DEFAULT_SIZE,
    stride: int = DEFAULT_SIZE,
    block: int = DEFAULT_SIZE,
    head_split: bool = False,
) -> float:
    """Exact mean, over query positions ``q in [0, seq_len)``, of the number of keys ``k <= q`` the pattern admits.

    This is ``k_bar`` in the attention FLOP count (forward ``4 * d_model * k_bar`` per token and
    layer). Closed forms per query (summed exactly in int64):
    dense ``q + 1``; local ``min(q + 1, w)``; strided ``q // s + 1``; local_strided
    ``local + strided - (min(q // s, (w - 1) // s) + 1)``; fixed ``q % c + 1 + q // c``.
    With ``head_split=True`` (local_strided only) half the heads are local and half strided: the mean of the two.
    Dense gives ``(seq_len + 1) / 2``. Cached per argument tuple (types included: ``window=True`` is still refused).
    """
    check_pattern_name(pattern)
    _check_positive_int("seq_len", seq_len)
    _check_positive_int("window", window)
    _check_positive_int("stride", stride)
    _check_positive_int("block", block)
    q = torch.arange(seq_len, dtype=torch.int64)
    if head_split:
        if pattern != "local_strided":
            raise ValueError(f"`head_split=True` needs pattern='local_strided', got pattern={pattern!r}.")
        total = int(_attended_per_query("local", q, window, stride, block).sum()) + int(
            _attended_per_query("strided", q, window, stride, block).sum()
        )
        return total / (2 * seq_len)
    return int(_attended_per_query(pattern, q, window, stride, block).sum()) / seq_len


def attention_density(
    pattern: str,
    seq_len: int,
    window: int = DEFAULT_SIZE,
    stride: int = DEFAULT_SIZE,
    block: int = DEFAULT_SIZE,
    head_split: bool = False,
) -> float:
    """Attended (query, key) pairs over causal pairs: ``mean_attended_keys / ((seq_len + 1) / 2)``, in (0, 1]."""
    mean = mean_attended_keys(pattern, seq_len, window, stride, block, head_split)
    return mean / ((seq_len + 1) / 2)
