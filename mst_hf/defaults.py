"""The one rule for "the default": the `MSTConfig` a run gets when the user names no preset, or names a preset but
not the fields that scale with the run.

``MSTTrainer(model, args)`` without ``mst_config``, the example script without ``--mst_preset`` and
``python -m mst_hf.plan`` without ``--preset``/``--config`` all call :func:`run_config`, so the three train or
plan the same recipe for the same run:

1. the preset's fields (``DEFAULT_PRESET`` when none is named);
2. the fields scaled to the run (:func:`run_scaled_defaults`): presets are written for long runs at 1024 tokens,
   so a short run gets about 25 topology updates and a short sequence an HSA window, stride and block of an eighth
   of its length;
3. the fields the user gave (they always win);
4. when no preset was named and the default preset's cap on the LM head's sparsity cannot be met on this model (a
   small model whose head holds most of the weights), the cap is dropped with a warning. A cap from a named preset
   or given by the user is never dropped: it fails with the allocation's error.
"""

from transformers.utils import logging

from .config import MSTConfig
from .presets import DEFAULT_PRESET, preset_fields

logger = logging.get_logger(__name__)

# Fields that the run's length or sequence length scales when they are left unset (see `run_scaled_defaults`).
RUN_SCALED = {
    "update_interval": "about 25 updates per run: max_steps // 25 for runs under 2500 steps",
    "hsa_window": "block_size // 8 for blocks under 1024 tokens; the paper has 128 at 1024",
    "hsa_stride": "block_size // 8 for blocks under 1024 tokens",
    "hsa_block": "block_size // 8 for blocks under 1024 tokens",
}


def run_scaled_defaults(max_steps: int | None = None, block_size: int | None = None) -> dict:
    """Defaults for short runs and short sequences: a topology update about every ``max_steps // 25`` steps (at
    most every 100) and an HSA window, stride and block of ``block_size // 8`` for blocks under 1024 tokens. A
    ``max_steps`` of ``None`` or below 1 (unknown) and a ``block_size`` of ``None`` leave those fields alone."""
    scaled = {}
    if max_steps is not None and max_steps > 0:  # TrainingArguments' max_steps is -1 when epochs decide
        scaled["update_interval"] = min(100, max(1, max_steps // 25))
    if block_size is not None and block_size < 1024:
        scaled.update(dict.fromkeys(("hsa_window", "hsa_stride", "hsa_block"), max(1, block_size // 8)))
    return scaled


def run_config(preset: str | None = None, given: dict | None = None, max_steps: int | None = None,
               seq_len: int | None = None, model=None) -> MSTConfig:
    """The `MSTConfig` of a run: ``preset`` (``None``: ``DEFAULT_PRESET``), then the values scaled to ``max_steps``
    optimizer steps of ``seq_len``-token sequences, then the fields in ``given``; see the module docstring.
    ``model`` (its shapes only: a ``meta``-device model will do) lets an infeasible default head cap be dropped."""
    given = dict(given or {})
    fields = preset_fields(preset or DEFAULT_PRESET, given)  # warns when a constant preset gets one sparsity of 3
    fields.update({k: v for k, v in run_scaled_defaults(max_steps, seq_len).items() if k not in given})
    config = MSTConfig(**fields)
    if model is not None and preset is None and "lm_head_max_sparsity" not in given:
        _drop_infeasible_head_cap(config, model)
    return config


def _drop_infeasible_head_cap(config: MSTConfig, model) -> None:
    from .targets import layer_sparsities

    if config.lm_head_max_sparsity is None:
        return
    peak = max(config.initial_sparsity, config.ultra_sparsity, config.final_sparsity)
    try:
        layer_sparsities(model, config, peak)
    except ValueError as err:
        logger.warning("The default preset %r caps the LM head's sparsity at %s, which this model cannot meet at "
                       "sparsity %s (%s); training without the cap. Name a preset or set `lm_head_max_sparsity` to "
                       "decide yourself.", DEFAULT_PRESET, config.lm_head_max_sparsity, peak, err)
        config.lm_head_max_sparsity = None


def sequence_length(dataset) -> int | None:
    """Tokens per sequence of a dataset's first example (``input_ids``), or ``None`` when that cannot be read
    without iterating (an ``IterableDataset``, or examples without ``input_ids``)."""
    try:
        first = dataset[0]
        ids = first["input_ids"]
    except Exception:  # noqa: BLE001 - any dataset without random access or without input_ids: unknown
        return None
    shape = getattr(ids, "shape", None)
    if shape is not None:
        return int(shape[-1]) if len(shape) else None
    return len(ids) if hasattr(ids, "__len__") else None
