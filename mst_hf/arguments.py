"""Command-line flags for `MSTConfig`, generated from its own fields, for `HfArgumentParser` scripts.

`HfArgumentParser` cannot parse a `PreTrainedConfig`, so :func:`mst_arguments_dataclass` builds a plain dataclass
with one ``--mst_<field>`` flag per `MSTConfig` field (its help text is the field's ``metadata["help"]``, followed
by the default preset's value) and ``--mst_preset``. Nothing here lists the fields by hand: a field added to
`MSTConfig` gets its flag. Every flag defaults to unset (``None``), so that :func:`to_mst_config` can apply, in
order, the preset, the values scaled to the run (:func:`mst_hf.defaults.run_scaled_defaults`) and the flags
actually given.

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
from .defaults import RUN_SCALED, run_config
from .presets import DEFAULT_PRESET

logger = logging.get_logger(__name__)

PREFIX = "mst_"
PRESET_FLAG = "mst_preset"
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
    """The field's help, then the value an unset flag takes: the default preset's (``MSTConfig.from_preset()``, what
    :func:`to_mst_config` starts from when no preset is named), not the bare ``MSTConfig()`` field default."""
    text = field.metadata.get("help", "").rstrip()
    text += f" Default (preset {DEFAULT_PRESET}): {as_text(default)}"
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
    defaults = MSTConfig.from_preset(DEFAULT_PRESET)  # what an unset flag takes when no preset is named
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
    """The `MSTConfig` of parsed ``args`` (an instance of a :func:`mst_arguments_dataclass` class), by the one rule
    that ``MSTTrainer`` without ``mst_config`` and ``python -m mst_hf.plan`` follow too
    (:func:`mst_hf.defaults.run_config`): the preset (``DEFAULT_PRESET`` when none is named), then the values
    scaled to ``max_steps`` and ``block_size``, then the flags given. A bad value raises the config's error,
    prefixed with the flag. ``model`` (shapes only) lets an infeasible default head cap be dropped with a warning."""
    named = getattr(args, PRESET_FLAG, None)
    if named is not None and named not in PRESETS:
        raise ValueError(f"`--{PRESET_FLAG}` must be one of {sorted(PRESETS)}, got {named!r}.")
    given = given_values(args)
    try:
        return run_config(named, given, max_steps, block_size, model=model)
    except (ValueError, TypeError) as err:
        fields = {**PRESETS[named or DEFAULT_PRESET], **given}
        flag = next((f"--{PREFIX}{k}" for k in fields if f"`{k}" in str(err)), f"--{PREFIX}*")
        raise type(err)(f"{flag}: {err}") from err
