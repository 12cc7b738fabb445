"""The transformers glue of Hybrid Sparse Attention: the attention implementation named ``"mst_hsa"``.

Opt a model in with ``AutoModelForCausalLM.from_config(cfg, attn_implementation="mst_hsa")`` (or
``from_pretrained(...)``, ``model.set_attn_implementation("mst_hsa")``), then `configure_hsa` it; the trainer flips
`set_hsa_active` at phase changes. The HSA state is a plain dict on the model config, ``config.mst_hsa``, so the
mask function (which receives ``config=``) and the attention function (which sees ``module.config``) read the same
state, and it is saved in ``config.json``. With no state, ``active=False``, or a layer not selected, a layer gets
exactly what ``attn_implementation="sdpa"`` computes.

How the two registered functions cooperate. transformers calls the mask function once per forward and hands its
return value to every layer. When HSA is active it returns an `HSAMask`: the arguments of the model's own mask
(causal, sliding window, packing, padding) plus the HSA state. Each layer then asks it for what it needs:

- a dense layer: the model's own mask (``sdpa_mask``: ``None`` for plain causal), run by transformers' SDPA code;
- a sparse layer on a plain causal sequence (no padding, no packing, no cache offset, no shorter sliding window):
  the fast kernels of `mst_hf.attention.dispatch` (on CUDA the fastest of flex / chunked / permuted SDPA, measured
  once per shape; on CPU SDPA with a cached boolean mask);
- a sparse layer otherwise (padding, packing, decoding with a cache): the model's boolean mask AND the pattern, run
  by SDPA. With padding the pattern is evaluated on real-token positions (cumulative sum of the
  padding mask), so a left-padded row attends like the same row unpadded. Packed sequences keep the model's
  per-sequence causality; the pattern uses row positions there (identical for local and strided, whose rules only
  use ``q - k``; fixed blocks are aligned to the row).

Models whose own mask is a sliding window shorter than the sequence (Mistral's ``sliding_window``, Qwen2 with
``use_sliding_window``) take the general path (correct, composed with the window, but no sparse speed-up). GPT-2
passes ``attn_pdrop`` as attention dropout in training, which FlexAttention lacks: local, fixed and strided then run
on the chunked / permuted SDPA kernels, local_strided and head_split on SDPA with a boolean mask (slow); set
``attn_pdrop=0`` for speed.
"""

import functools
import os
import sys
import warnings

import torch
from transformers import AttentionInterface, AttentionMaskInterface, PretrainedConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import causal_mask_function, prepare_padding_mask, sdpa_mask
from transformers.utils import logging

from .dispatch import hsa_attention
from .impl.reference import reference_attention
from .patterns import (  # noqa: F401 (LAYER_CHOICES: public name)
    BACKENDS,
    LAYER_CHOICES,
    HSASpec,
    check_active,
)

HSA_NAME = "mst_hsa"
HSA_BACKEND_ENV = "MST_HSA_BACKEND"
# attention arguments that SDPA and the HSA kernels do not implement; a model passing one runs its own eager code
EAGER_ONLY_KWARGS = ("softcap", "s_aux", "sinks")

logger = logging.get_logger(__name__)
DEFAULT_HSA_STATE = HSASpec().to_state(active=False)  # what `configure_hsa(model)` stores


# ---------------------------------------------------------------------------------------------------------------
# State on the config
# ---------------------------------------------------------------------------------------------------------------


def validate_hsa_state(state: dict) -> dict:
    """Check an HSA state dict (through `HSASpec.from_state`) and return it completed with the defaults."""
    return HSASpec.from_state(state).to_state(state.get("active", False))


def _find_config(model_or_config) -> PretrainedConfig:
    """The config of a PreTrainedModel, a PeftModel, a DDP-wrapped model, or the config itself."""
    if isinstance(model_or_config, PretrainedConfig):
        return model_or_config
    obj = model_or_config
    if isinstance(obj, torch.nn.parallel.DistributedDataParallel):
        obj = obj.module
    if hasattr(obj, "get_base_model"):  # peft.PeftModel
        obj = obj.get_base_model()
    config = getattr(obj, "config", None)
    if not isinstance(config, PretrainedConfig):
        raise TypeError(
            f"Expected a transformers model (or PeftModel) or its config, got {type(model_or_config).__name__}."
        )
    return config


def _configs(config: PretrainedConfig) -> list:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return [config] if text is config else [config, text]


def configure_hsa(model, spec: HSASpec | None = None, *, active: bool = False, **fields) -> dict:
    """Store `spec` (an `HSASpec`; default ``HSASpec()``) as ``config.mst_hsa`` (saved with the model), the pattern
    on or off by `active`. Returns the stored dict (``spec.to_state(active)``).

    A shim keeps the keyword form: ``configure_hsa(model, pattern="local", window=64)`` builds
    ``HSASpec(pattern="local", window=64)`` (`HSASpec` documents the fields). The environment variable
    ``MST_HSA_BACKEND`` overrides the spec's backend. The model must run ``attn_implementation="mst_hsa"`` for any
    of it to apply.
    """
    if fields:
        if spec is not None:
            raise TypeError(
                f"configure_hsa got both a spec and the fields {sorted(fields)}; pass one: "
                "configure_hsa(model, dataclasses.replace(spec, ...))."
            )
        spec = HSASpec(**fields)
    if spec is None:
        spec = HSASpec()
    if not isinstance(spec, HSASpec):
        raise TypeError(
            f"`spec` must be an HSASpec, got {spec!r}. Use configure_hsa(model, HSASpec(pattern=...)) or "
            "configure_hsa(model, pattern=...)."
        )
    state = spec.to_state(active)  # from now on `HSASpec.from_state` reads this dict back as `spec` itself
    for config in _configs(_find_config(model)):
        config.mst_hsa = dict(state)
    return dict(state)


def set_hsa_active(model, active: bool) -> None:
    """Switch the configured pattern on or off: flips ``config.mst_hsa["active"]`` (a new dict, the settings
    untouched; nothing is validated or rebuilt, so masks and kernel choices cached for the spec stay warm)."""
    check_active(active)
    configs = _configs(_find_config(model))
    if getattr(configs[0], HSA_NAME, None) is None:
        raise ValueError("This model has no HSA state: call configure_hsa(model, spec) first.")
    HSASpec.from_state(configs[0].mst_hsa)  # the cached spec (a dict edited by hand is checked here, once)
    for config in configs:
        config.mst_hsa = {**config.mst_hsa, "active": active}


def get_hsa_state(model_or_config) -> dict | None:
    """A validated copy of ``config.mst_hsa``, or None when the model has none."""
    state = getattr(_find_config(model_or_config), HSA_NAME, None)
    return None if state is None else validate_hsa_state(dict(state))


def get_hsa_spec(model_or_config) -> HSASpec | None:
    """The `HSASpec` stored on a model (or config), or None when it has none."""
    state = getattr(_find_config(model_or_config), HSA_NAME, None)
    return None if state is None else HSASpec.from_state(state)


def _backend(spec: HSASpec) -> str:
    backend = os.environ.get(HSA_BACKEND_ENV) or spec.backend
    if backend not in BACKENDS:
        raise ValueError(f"{HSA_BACKEND_ENV}={backend!r} is not a backend; valid: {', '.join(BACKENDS)}.")
    return backend


# ---------------------------------------------------------------------------------------------------------------
# The mask object and the two registered functions
# ---------------------------------------------------------------------------------------------------------------


class HSAMask:
    """Returned by the "mst_hsa" mask function while HSA is active; every layer picks its mask from it.

    Holds the arguments transformers gave the mask function (so the model's own mask, ``sdpa_mask(**args)``, is
    rebuilt exactly) and the `HSASpec`. Masks are built lazily, once per forward.
    """

    ndim = 4  # lets transformers' mask preprocessing pass a precomputed HSAMask through (generate, static cache)

    def __init__(self, spec: HSASpec, mask_args: dict):
        self.spec = spec
        self.mask_args = mask_args
        self.backend = _backend(spec)  # once per forward, not per layer
        self.structured = self._is_plain_causal()
        self._dense = None
        self._dense_built = False
        self._sparse = {}

    @property
    def shape(self) -> tuple:
        a = self.mask_args
        return (a["batch_size"], 1, a["q_length"], a["kv_length"])

    def _is_plain_causal(self) -> bool:
        """True when the model's mask is plain causal over positions 0..T-1 (the fast kernels' precondition)."""
        a = self.mask_args
        q_offset, kv_offset = a.get("q_offset", 0), a.get("kv_offset", 0)
        if not a.get("allow_is_causal_skip", True) or isinstance(q_offset, torch.Tensor):
            return False  # packing, or/and overlays, compiled decoding: the model's mask is more than causal
        if q_offset != 0 or kv_offset != 0 or a["q_length"] != a["kv_length"]:
            return False
        local_size = a.get("local_size")
        if local_size is not None and a["kv_length"] > local_size:
            return False
        padding = prepare_padding_mask(a.get("attention_mask"), a["kv_length"], kv_offset)
        return padding is None or bool(padding[:, : a["kv_length"]].all())

    def dense_mask(self):
        """The model's own mask, exactly as ``attn_implementation="sdpa"`` builds it (None = plain causal)."""
        if not self._dense_built:
            self._dense = sdpa_mask(**self.mask_args)
            self._dense_built = True
        return self._dense

    def sparse_mask(self, num_heads: int) -> torch.Tensor:
        """The model's boolean mask AND the pattern: ``(B, 1 | H, q_len, kv_len)`` (H only with head_split)."""
        heads = num_heads if self.spec.head_split else 1
        if heads not in self._sparse:
            a = self.mask_args
            base = sdpa_mask(**{**a, "allow_is_causal_skip": False})  # (B, 1, q, kv) bool
            device = base.device
            q_pos = torch.arange(a["q_length"], device=device) + a.get("q_offset", 0)
            kv_pos = torch.arange(a["kv_length"], device=device) + a.get("kv_offset", 0)
            padding = prepare_padding_mask(a.get("attention_mask"), a["kv_length"], a.get("kv_offset", 0))
            if padding is not None:  # positions among real tokens: left padding does not shift the pattern
                real_pos = padding.to(device=device, dtype=torch.long).cumsum(-1) - 1  # (B, L)
                q_pos, kv_pos = real_pos[:, q_pos], real_pos[:, kv_pos]  # (B, q), (B, kv)
            else:
                q_pos, kv_pos = q_pos[None], kv_pos[None]
            h = torch.arange(heads, device=device)[None, :, None, None]
            pattern = self.spec.mask_fn(num_heads if self.spec.head_split else None)
            self._sparse[heads] = base & pattern(0, h, q_pos[:, None, :, None], kv_pos[:, None, None, :])
        return self._sparse[heads]


def hsa_mask_interface(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset=0,
    kv_offset=0,
    mask_function=causal_mask_function,
    attention_mask=None,
    **kwargs,
):
    """The "mst_hsa" mask function: what ``sdpa_mask`` returns while HSA is off, an `HSAMask` while it is on."""
    if isinstance(attention_mask, HSAMask):  # precomputed by generate() for a static cache
        return attention_mask
    args = dict(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=attention_mask,
        **kwargs,
    )
    config = kwargs.get("config")
    state = getattr(config, HSA_NAME, None) if config is not None else None
    # bidirectional masks (encoder / cross attention) are never made sparse
    if state is None or "allow_is_bidirectional_skip" in kwargs:
        return sdpa_mask(**args)
    spec = HSASpec.from_state(state)
    if not check_active(state.get("active", False)):
        return sdpa_mask(**args)
    if q_length == kv_length > 1 and not torch.compiler.is_compiling():  # a whole sequence, not a decoding step
        warn_if_dense(spec, q_length)
    return HSAMask(spec, args)


_WARNED_DENSE: set = set()


def warn_if_dense(spec: HSASpec, seq_len: int) -> bool:
    """Warn (once per spec) when `spec`'s pattern admits every causal pair at `seq_len`, so "HSA on" changes
    nothing; returns whether the pattern is dense there. Called by the "mst_hsa" mask function on every forward
    with the pattern on (cached by spec and length)."""
    message = _dense_message(spec, seq_len)
    if message is not None and spec not in _WARNED_DENSE:
        _WARNED_DENSE.add(spec)
        warnings.warn(message, UserWarning, stacklevel=2)
    return message is not None


@functools.lru_cache(maxsize=256)
def _dense_message(spec: HSASpec, seq_len: int) -> str | None:
    return dense_pattern_message(spec, seq_len)


def dense_pattern_message(spec: HSASpec, seq_len: int) -> str | None:
    """``None`` when `spec`'s pattern drops causal pairs at `seq_len`; otherwise a sentence naming the pattern,
    the length and the sizes that would make it sparse there (``dense`` itself is never reported: it was asked for).

    Pure: a pattern is dense at a length exactly when its `HSASpec.density` there is 1.0. Why it happens: local
    keeps every key within ``window``, so ``window >= seq_len`` keeps all; ``local_strided`` also needs some
    distance ``>= window`` that is not a multiple of ``stride``; ``fixed`` needs a key outside the query's block
    that is not a summary position (``block < seq_len``, ``block >= 2``); ``strided`` needs ``stride >= 2``.
    """
    if spec.pattern == "dense" or spec.density(seq_len) < 1.0:
        return None
    size = max(seq_len // 4, 2)
    longer = ", or train on longer sequences"
    if spec.head_split or spec.pattern == "local":
        fix = f"window < {seq_len} (e.g. window={size}){longer}"
    elif spec.pattern == "strided":
        fix = f"stride >= 2 (e.g. stride={size})"  # stride 1 keeps every key at any length
    elif spec.pattern == "local_strided":
        fix = f"window < {max(seq_len - 1, 1)} and stride >= 2 (e.g. window=stride={size}){longer}"
    else:
        fix = f"2 <= block < {seq_len} (e.g. block={size}){longer}"
    return (
        f"HSA pattern {spec.pattern!r} (window={spec.window}, stride={spec.stride}, block={spec.block}) admits every "
        f"causal pair at sequence length {seq_len}: attention is dense (density 1.0) although HSA is on. For a "
        f"sparse pattern at this length use {fix}."
    )


def hsa_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The "mst_hsa" attention function: ``query (B, H, q, D)``, ``key``/``value`` ``(B, Hkv, kv, D)`` ->
    ``((B, q, H, D), None)``."""
    eager = any(kwargs.get(name) is not None for name in EAGER_ONLY_KWARGS)  # softcap (Gemma 2), sinks (gpt-oss)
    if not isinstance(attention_mask, HSAMask):  # HSA off, or a 4-D mask supplied by the caller: plain SDPA
        mask = attention_mask
        if eager:
            return model_eager_attention(module, query, key, value, mask, dropout, scaling, **kwargs)
        return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
    hsa, spec = attention_mask, attention_mask.spec
    sparse = spec.pattern != "dense" and spec.layer_is_sparse(getattr(module, "layer_idx", None))
    if not sparse or not getattr(module, "is_causal", True):
        mask = hsa.dense_mask()
        if eager:
            return model_eager_attention(module, query, key, value, mask, dropout, scaling, **kwargs)
        return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
    if spec.head_split and query.shape[1] % 2:
        raise ValueError(f"`head_split=True` needs an even number of attention heads, got {query.shape[1]}.")
    if eager:
        return model_eager_attention(module, query, key, value, hsa.sparse_mask(query.shape[1]), dropout, scaling,
                                     **kwargs)
    if hsa.structured and query.shape[2] > 1:
        out = hsa_attention(query, key, value, spec, scaling, hsa.backend, dropout)  # (B, H, T, D)
        return out.transpose(1, 2).contiguous(), None
    mask = hsa.sparse_mask(query.shape[1])
    if hsa.backend == "eager":
        out = reference_attention(query, key, value, mask, scaling).to(query.dtype)
        return out.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)


def model_eager_attention(module, query, key, value, mask, dropout=0.0, scaling=None, **kwargs):
    """The model's own eager attention under a boolean `mask` (True = attend; None = plain causal): the
    ``eager_attention_forward`` of the module's modeling file, which applies softcapping, attention sinks, scaling
    and dropout exactly as ``attn_implementation="eager"`` does. For models whose attention needs one of
    `EAGER_ONLY_KWARGS`; correct in every phase and layer, but materialises the scores (no sparse speed-up)."""
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    used = ", ".join(name for name in EAGER_ONLY_KWARGS if kwargs.get(name) is not None)
    if eager is None:
        raise NotImplementedError(
            f"{type(module).__name__} passes {used} to its attention, which SDPA and the HSA kernels do not "
            f"implement, and its module {type(module).__module__} has no `eager_attention_forward` to run instead. "
            "Train it with `hsa_pattern='dense'` and `attn_implementation='eager'`."
        )
    logger.warning_once(
        f"{type(module).__name__} needs its own eager attention ({used}): 'mst_hsa' runs it with the pattern as a "
        "mask. Correct in every phase, but no faster than dense attention."
    )
    q_len, kv_len = query.shape[2], key.shape[2]
    if mask is None and getattr(module, "is_causal", True):  # sdpa_mask's "plain causal" (aligned to the last key)
        mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)[None, None]
    if mask is not None and mask.dtype == torch.bool:  # eager code adds the mask to the scores
        zero = torch.zeros((), dtype=query.dtype, device=query.device)
        mask = torch.where(mask, zero, torch.finfo(query.dtype).min)
    return eager(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)


def register() -> None:
    """Register "mst_hsa" with transformers' AttentionInterface and AttentionMaskInterface (idempotent)."""
    AttentionInterface.register(HSA_NAME, hsa_attention_forward)
    AttentionMaskInterface.register(HSA_NAME, hsa_mask_interface)

