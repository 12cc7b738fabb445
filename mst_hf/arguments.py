"""Command-line flags for `MSTConfig`, generated from its own fields, for `HfArgumentParser` scripts.

`HfArgumentParser` cannot parse a `PreTrainedConfig`, so :func:`mst_arguments_dataclass` builds a plain dataclass
with one ``--mst_<field>`` flag per `MSTConfig` field (its help text is the field's ``metadata["help"]``, followed
by the config's default) and ``--mst_preset``. Nothing here lists the fields by hand: a field added to
`MSTConfig` gets its flag. Every flag defaults to unset (``None``), so that :func:`to_mst_config` can apply, in
order, the preset, the values scaled to the run (:func:`run_scaled_defaults`) and the flags actually given.

On the command line a value that is not a single number, bool or word is written as text: lists comma-separated
(``--mst_target_modules c_attn,c_fc``, ``--mst_hsa_layers 0,2``), a per-phase grow method as
``warmup=gradient,ultra=mixed,restoration=gradient``; a field with no such rule takes JSON. A flag whose field may be
None takes ``none`` (or ``null``, any case) for None (``--mst_lm_head_max_sparsity none``: no cap;
``--mst_target_modules none``: the model type's default), and so does ``null`` in a JSON arguments file
(:func:`file_values`).
"""

import dataclasses
import json
import typing

from transformers import PretrainedConfig
from transformers.utils import logging

from .config import PRESETS, MSTConfig
from .presets import DEFAULT_PRESET, preset_fields
from .targets import layer_sparsities

logger = logging.get_logger(__name__)

PREFIX = "mst_"
PRESET_FLAG = "mst_preset"
# Fields that the run's length or sequence length scales when they are left unset (see `run_scaled_defaults`).
RUN_SCALED = {
    "update_interval": "about 25 updates per run: max_steps // 25 for runs under 2500 steps",
    "hsa_window": "block_size // 8 for blocks under 1024 tokens; the paper has 128 at 1024",
    "hsa_stride": "block_size // 8 for blocks under 1024 tokens",
    "hsa_block": "block_size // 8 for blocks under 1024 tokens",
}
_SCALARS = (bool, int, float, str)


def config_fields() -> list[dataclasses.Field]:
    """`MSTConfig`'s own fields (not those it inherits from `PreTrainedConfig`), in declaration order."""
    return [f for f in dataclasses.fields(MSTConfig) if f.name not in PretrainedConfig.__dataclass_fields__]


# ------------------------------------------------------------------------------------------------ text <-> value
def _items(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _phase_methods(value: str):
    """``gradient`` or ``warmup=gradient,ultra=mixed,restoration=gradient``."""
    if "=" not in value:
        return value
    bare = [item for item in _items(value) if "=" not in item]
    if bare:
        raise ValueError(
            f"`--{PREFIX}grow_method` takes one method (gradient, random or mixed) or phase=method pairs such as "
            f"warmup=gradient,ultra=mixed,restoration=gradient, got {value!r}: {bare[0]!r} has no `=method`."
        )
    pairs = [item.split("=", 1) for item in _items(value)]
    return {phase.strip(): method.strip() for phase, method in pairs}


def _layers(value: str):
    """``all``, ``alternate`` or comma-separated layer indices such as ``0,2``."""
    if value.strip() in ("all", "alternate"):
        return value.strip()
    try:
        return [int(item) for item in _items(value)]
    except ValueError as err:
        raise ValueError(
            f"`--{PREFIX}hsa_layers` must be all, alternate or comma-separated layer indices like 0,2, got {value!r}."
        ) from err


# How the text of a flag becomes the value of a field that is not one scalar.
TEXT_PARSERS = {
    "grow_method": _phase_methods,
    "target_modules": _items,
    "exclude_modules": _items,
    "hsa_phases": _items,
    "hsa_layers": _layers,
}


def _json_value(name: str):
    def parse(value: str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f"`--{PREFIX}{name}` takes a JSON value here, got {value!r} ({err}).") from err

    return parse


def _optional_number(name: str, kind: type):
    """``none`` / ``null`` (any case) unsets an optional number, e.g. a preset's ``lm_head_max_sparsity``."""

    def parse(value: str):
        if value.strip().lower() in ("none", "null"):
            return None
        try:
            return kind(value)
        except ValueError as err:
            raise ValueError(f"`--{PREFIX}{name}` takes a {kind.__name__} or `none`, got {value!r}.") from err

    return parse


def _nullable(annotation) -> bool:
    """Whether a field of this type may be None (its flag then takes ``none`` / ``null``)."""
    return type(None) in typing.get_args(annotation)


def _is_none_text(value) -> bool:
    return isinstance(value, str) and value.strip().lower() in ("none", "null")


def file_values(given: dict) -> dict:
    """The values of a JSON arguments file, with a ``null`` for an ``mst_`` flag whose field may be None written as
    the text ``none``: it sets the field to None, as ``--mst_<field> none`` does, where a flag left out of the file
    leaves the preset's value (both would otherwise read as an unset flag)."""
    nullable = {PREFIX + f.name for f in config_fields() if _nullable(f.type)}
    return {k: "none" if v is None and k in nullable else v for k, v in given.items()}


def _optional_number_kind(annotation) -> type | None:
    """``float`` for ``float | None`` (``int`` likewise); else None."""
    args = typing.get_args(annotation)
    members = [a for a in args if a is not type(None)]
    return members[0] if type(None) in args and len(members) == 1 and members[0] in (int, float) else None


def _cli_type(annotation):
    """The flag's type: the field's own when it is one scalar (``float``, ``str | None``, ...), else ``str`` (also
    for an optional number, whose text may be ``none``)."""
    if _optional_number_kind(annotation) is not None:
        return str
    members = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    return members[0] if len(members) == 1 and members[0] in _SCALARS else str


def text_parser(field: dataclasses.Field):
    """``None`` for a scalar field (the parser converts it); else the function from flag text to field value."""
    kind = _optional_number_kind(field.type)
    if kind is not None:
        return _optional_number(field.name, kind)
    if _cli_type(field.type) is not str or field.type is str or field.type == (str | None):
        return None
    return TEXT_PARSERS.get(field.name, _json_value(field.name))


def as_text(value) -> str:
    """A field value as it would be written on the command line."""
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


# ------------------------------------------------------------------------------------------------ the dataclass
def _help(field: dataclasses.Field, default) -> str:
    text = field.metadata.get("help", "").rstrip()
    text += f" Default: {as_text(default)}"
    if _nullable(field.type):
        text += " (`none`: None)"
    if field.name in RUN_SCALED:
        text += f"; when unset, scaled to the run ({RUN_SCALED[field.name]})"
    # '%(default).0s' prints nothing; its presence stops HfArgumentParser's formatter from appending
    # "(default: None)": the flags default to unset, and the value that applies is the one written above.
    return text + ".%(default).0s"


def mst_arguments_dataclass(extra_fields=(), name: str = "MSTArguments") -> type:
    """A dataclass with ``mst_preset`` and one ``mst_<field>`` per `MSTConfig` field (all default ``None``),
    followed by ``extra_fields`` (``(name, type, dataclasses.field(...))`` tuples, as for
    `dataclasses.make_dataclass`) for a script's own flags."""
    defaults = MSTConfig()
    fields = [(
        PRESET_FLAG,
        str | None,
        dataclasses.field(
            default=None,
            metadata={"help": f"Start from a named MSTConfig preset ({', '.join(sorted(PRESETS))}; default "
                              f"{DEFAULT_PRESET}, the study's best recipe; mst-paper is the paper's); the mst_* "
                              "flags given override its values.%(default).0s"},
        ),
    )]
    for f in config_fields():
        help_text = _help(f, getattr(defaults, f.name))
        if text_parser(f) is not None and f.name not in TEXT_PARSERS and _optional_number_kind(f.type) is None:
            help_text = "(JSON) " + help_text
        fields.append((PREFIX + f.name, _cli_type(f.type) | None,
                       dataclasses.field(default=None, metadata={"help": help_text})))
    cls = dataclasses.make_dataclass(name, fields + list(extra_fields))
    cls.__doc__ = (
        "Mixed Sparsity Training: `--mst_<field>` sets the MSTConfig field <field>; unset flags take the preset's "
        "value, else the run-scaled or MSTConfig default (see `mst_hf.arguments.to_mst_config`)."
    )
    return cls


MSTArguments = mst_arguments_dataclass()


# ------------------------------------------------------------------------------------------------ to MSTConfig
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


def given_values(args) -> dict:
    """The `MSTConfig` fields whose ``mst_*`` flag is set in ``args``, parsed from text where needed."""
    values = {}
    for f in config_fields():
        value = getattr(args, PREFIX + f.name, None)
        if value is None:
            continue
        if _nullable(f.type) and _is_none_text(value):  # `none` / `null`: the field's None, as in MSTConfig
            values[f.name] = None
            continue
        parser = text_parser(f)
        values[f.name] = parser(value) if parser is not None and isinstance(value, str) else value
    return values


def to_mst_config(args, max_steps: int | None = None, block_size: int | None = None, model=None) -> MSTConfig:
    """The `MSTConfig` of parsed ``args`` (an instance of a :func:`mst_arguments_dataclass` class): the preset
    (``DEFAULT_PRESET`` when none is named), then :func:`run_scaled_defaults` (when ``max_steps`` / ``block_size``
    are given; they replace a preset's update interval and HSA sizes, which are written for long runs at 1024
    tokens), then the flags given, then `MSTConfig`'s defaults. A bad value raises the
    config's error, prefixed with the flag.

    ``model`` (its shapes only: a model on the ``meta`` device will do): when no preset was named and the default
    preset's cap on the LM head's sparsity cannot be met on this model (a small model whose head holds most of the
    weights), the cap is dropped with a warning instead of failing the run. A cap given by flag or by a named preset
    is never dropped: it fails with the allocation's error."""
    named = getattr(args, PRESET_FLAG, None)
    preset = named or DEFAULT_PRESET
    if preset not in PRESETS:
        raise ValueError(f"`--{PRESET_FLAG}` must be one of {sorted(PRESETS)}, got {preset!r}.")
    given = given_values(args)
    fields = preset_fields(preset, given)  # warns when a constant-sparsity preset gets one sparsity of three
    for name, value in run_scaled_defaults(max_steps, block_size).items():
        if name not in given:  # presets are written for long runs at 1024 tokens: scaled to this run too
            fields[name] = value
    try:
        config = MSTConfig(**fields)
    except (ValueError, TypeError) as err:
        flag = next((f"--{PREFIX}{k}" for k in fields if f"`{k}" in str(err)), f"--{PREFIX}*")
        raise type(err)(f"{flag}: {err}") from err
    if model is not None and named is None and "lm_head_max_sparsity" not in given:
        _drop_infeasible_head_cap(config, model)
    return config


def _drop_infeasible_head_cap(config: MSTConfig, model) -> None:
    if config.lm_head_max_sparsity is None:
        return
    peak = max(config.initial_sparsity, config.ultra_sparsity, config.final_sparsity)
    try:
        layer_sparsities(model, config, peak)
    except ValueError as err:
        logger.warning("The default preset %r caps the LM head's sparsity at %s, which this model cannot meet at "
                       "sparsity %s (%s); training without the cap. Name a preset (`--%s`) or set `--%slm_head_max_"
                       "sparsity` to decide yourself.", DEFAULT_PRESET, config.lm_head_max_sparsity, peak, err,
                       PRESET_FLAG, PREFIX)
        config.lm_head_max_sparsity = None
