"""`MSTConfig`: every knob of Mixed Sparsity Training, validated on construction, saved as ``mst_config.json``."""

import copy
import difflib
import json
import os
from dataclasses import field
from typing import Any

from transformers import PretrainedConfig

from . import recipe, schedule
from .attention.patterns import HSASpec
from .presets import DEFAULT_GROW_METHOD, DEFAULT_PRESET, PRESETS, preset_fields  # noqa: F401 (PRESETS: public)
from .regex_safety import check_pattern

MST_CONFIG_NAME = "mst_config.json"
GROW_METHODS = ("gradient", "random", "mixed")
SPARSITY_DISTRIBUTIONS = ("erdos_renyi", "uniform")
SPARSITY_STRUCTURES = ("unstructured", "block")
WEIGHT_KERNELS = ("dense", "auto", "block")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class MSTConfig(PretrainedConfig):
    r"""Configuration of a Mixed Sparsity Training run.

    Sparsities are fractions of zero weights over the targeted matrices (global; per-layer values come from
    ``sparsity_distribution``). Phase lengths are fractions of the run's optimizer steps. See ``docs/concepts.md``
    for the formulas and ``mst_hf.schedule`` for their implementation.

    Args:
        initial_sparsity / initial_mask: sparsity at step 0 (0.0: start dense); its masks: auto, random or magnitude.
        ultra_sparsity: sparsity of the ultra-sparsification phase.
        final_sparsity: sparsity reached at the end of restoration (0.0: end dense).
        warmup_ratio / restoration_ratio: phase lengths as fractions of the run; their sum must be <= 1.
        warmup_curve / restoration_curve: ``"cubic"``, ``"linear"`` or ``"cosine"``.
        update_interval: optimizer steps between topology updates (an update also happens at each phase start).
        drop_fraction: ``zeta_0``, the fraction of active connections dropped and regrown at an update.
        drop_fraction_schedule: ``"cosine"`` (over the run), ``"cosine_per_phase"`` or ``"constant"``.
        grow_method: ``"gradient"`` (RigL), ``"random"`` (SET), ``"mixed"`` (MG), or a dict phase -> method.
        mixed_gradient_fraction: share of ``mixed`` growth chosen by gradient; the rest is uniform random.
        sparsity_distribution: ``"erdos_renyi"`` or ``"uniform"`` layer-wise allocation.
        sparsity_structure / block_size: ``"unstructured"`` masks single weights; ``"block"`` masks square tiles of
            ``block_size`` (drop/grow score a tile by the L2 norm of its weights / dense gradient), so the
            block-sparse kernels of ``mst_hf.kernels`` can skip inactive tiles.
        weight_kernels: ``"dense"`` (masked dense matmuls), ``"auto"`` (the block kernel for each block-structured
            layer where the measured break-even table says it is faster; dense on topology-update steps) or
            ``"block"`` (the block kernel wherever the tile side divides the shape).
        optimizer_state: ``"dense"`` (AdamW moments of every weight) or ``"active"`` (of active tiles only).
        target_modules / exclude_modules: module-name suffixes (list) or a full-match regex (str); ``None`` uses the
            per-``model_type`` default table in ``mst_hf.targets``.
        sparsify_lm_head: include the LM head (the shared matrix when tied to the token embedding).
        seed: seed of the random growth (identical on every rank).
        hsa_pattern: ``"dense"``, ``"local"``, ``"strided"``, ``"local_strided"`` or ``"fixed"``.
        hsa_window / hsa_stride / hsa_block: local window, stride, and block size of the ``fixed`` pattern.
        hsa_phases: phases in which the sparse pattern is on (dense causal elsewhere).
        hsa_layers: ``"all"``, ``"alternate"`` (even layers 0, 2, ... sparse, odd layers dense) or a list of indices.
        hsa_head_split: half the heads local, half strided (only for ``local_strided``).
        lr_schedule / lr_floor / lr_decay_start: ``None`` (the Trainer's scheduler), ``"cosine_floor"`` or ``"wsd"``
            (decay from ``lr_decay_start``, default the restoration start), ending at ``lr_floor`` x the peak.
        regrow_optimizer_state: ``"zero"``, ``"warm"`` (Adam moments of regrown weights from the dense gradient) or
            ``"restart"`` (zeroed moments and the weight's own bias correction restarted: ``mst_hf.optim``).
        regrow_init / regrow_init_scale: ``"zero"`` or ``"gradient"`` (regrown weights start a small step against
            the dense gradient, RMS ``regrow_init_scale`` x the layer's mean ``|w|``).
        lm_head_max_sparsity: cap on the LM head's sparsity (``None``: no cap); the other targets absorb the rest.
        stop_updates_ratio: last fraction of the run without topology updates; the restoration ends before it.
    """

    model_type = "mst"

    initial_sparsity: float = field(default=0.0, metadata={"help": "Weight sparsity at step 0 (0.0: start dense)."})
    initial_mask: str = field(default="auto", metadata={"help": "Masks of step 0: auto (the saved masks, or |w| of "
                              "loaded weights, else random), random or magnitude (largest |w|)."})
    ultra_sparsity: float = field(default=0.9, metadata={"help": "Weight sparsity of the ultra-sparsification phase."})
    final_sparsity: float = field(
        default=0.0, metadata={"help": "Weight sparsity at the end of restoration (0.0: end dense)."}
    )
    warmup_ratio: float = field(
        default=0.1, metadata={"help": "Warm-up length, as a fraction of the run's optimizer steps."}
    )
    restoration_ratio: float = field(
        default=0.2, metadata={"help": "Restoration length, as a fraction of the run's optimizer steps."}
    )
    warmup_curve: str = field(default="cubic", metadata={"help": "Sparsity ramp of warm-up: cubic, linear or cosine."})
    restoration_curve: str = field(
        default="cubic", metadata={"help": "Sparsity ramp of restoration: cubic, linear or cosine."}
    )
    update_interval: int = field(
        default=100, metadata={"help": "Optimizer steps between topology updates (plus one at each phase start)."}
    )
    drop_fraction: float = field(
        default=0.3, metadata={"help": "zeta_0: share of active connections dropped and regrown per update."}
    )
    drop_fraction_schedule: str = field(
        default="cosine", metadata={"help": "Decay of the drop fraction: cosine, cosine_per_phase or constant."}
    )
    grow_method: str | dict | None = field(
        default=None, metadata={"help": "gradient (RigL), random (SET), mixed, or a dict phase -> method."}
    )
    mixed_gradient_fraction: float = field(
        default=0.75, metadata={"help": "Share of mixed growth chosen by gradient; the rest is random."}
    )
    sparsity_distribution: str = field(
        default="erdos_renyi", metadata={"help": "Per-layer allocation: erdos_renyi or uniform."}
    )
    sparsity_structure: str = field(
        default="unstructured",
        metadata={"help": "Mask granularity: unstructured (single weights) or block (square tiles of block_size)."},
    )
    block_size: int = field(
        default=64, metadata={"help": "Tile side of sparsity_structure='block' (the block-sparse kernels: 32/64/128)."}
    )
    weight_kernels: str = field(
        default="dense",
        metadata={"help": "Matmul kernels of block-sparse layers: dense (masked dense), auto (block kernel where a "
                  "measured table says it is faster) or block (always)."},
    )
    optimizer_state: str = field(
        default="dense", metadata={"help": "AdamW moments kept for: dense (every weight) or active (active tiles)."}
    )
    target_modules: list | str | None = field(
        default=None, metadata={"help": "Module-name suffixes or a regex to sparsify (None: per model type)."}
    )
    exclude_modules: list | str | None = field(
        default=None, metadata={"help": "Module-name suffixes or a regex to keep dense."}
    )
    sparsify_lm_head: bool = field(
        default=True, metadata={"help": "Sparsify the LM head (the shared matrix when tied to the embedding)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the random growth (the same on every rank)."})
    hsa_pattern: str = field(
        default=HSASpec.pattern, metadata={"help": "Attention pattern: dense, local, strided, local_strided or fixed."}
    )
    hsa_window: int = field(default=HSASpec.window, metadata={"help": "Window of the local pattern, in positions."})
    hsa_stride: int = field(default=HSASpec.stride, metadata={"help": "Stride of the strided pattern, in positions."})
    hsa_block: int = field(default=HSASpec.block, metadata={"help": "Block of the fixed pattern, in positions."})
    hsa_phases: list | None = field(
        default=None, metadata={"help": "Phases with sparse attention (None: ultra); dense causal elsewhere."}
    )
    hsa_layers: list | str = field(
        default="all", metadata={"help": "Layers with sparse attention: all, alternate or a list of indices."}
    )
    hsa_head_split: bool = field(
        default=False, metadata={"help": "Half the heads local, half strided (local_strided only)."}
    )
    # recipe options (validated in mst_hf.recipe; every default keeps the behaviour from before they existed)
    lr_schedule: str | None = field(
        default=None, metadata={"help": "LR schedule aligned with the phases: cosine_floor or wsd (None: Trainer's)."}
    )
    lr_floor: float = field(default=0.1, metadata={"help": "Final LR of lr_schedule, as a fraction of the peak."})
    lr_decay_start: float | None = field(
        default=None, metadata={"help": "wsd: fraction of the run where the LR decay starts (None: restoration)."}
    )
    regrow_optimizer_state: str = field(
        default="zero", metadata={"help": "Adam moments of regrown weights: zero, warm (from the dense gradient), or "
                                  "restart (zeroed, own bias correction restarted: ElementwiseAdamW)."}
    )
    regrow_init: str = field(
        default="zero", metadata={"help": "Value of regrown weights: zero, or gradient (a small step against it)."}
    )
    regrow_init_scale: float = field(
        default=0.1, metadata={"help": "regrow_init=gradient: RMS of new weights over the layer's mean |w|."}
    )
    lm_head_max_sparsity: float | None = field(
        default=None, metadata={"help": "Cap on the LM head's sparsity; the other targets take the rest (None: off)."}
    )
    stop_updates_ratio: float = field(
        default=0.0, metadata={"help": "Last fraction of the run without topology updates (restoration ends before)."}
    )

    def __post_init__(self, **kwargs):
        if self.grow_method is None:
            self.grow_method = dict(DEFAULT_GROW_METHOD)
        if self.hsa_phases is None:
            self.hsa_phases = [schedule.ULTRA]
        if isinstance(self.hsa_phases, (tuple, str)):
            self.hsa_phases = [self.hsa_phases] if isinstance(self.hsa_phases, str) else list(self.hsa_phases)
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if isinstance(self.exclude_modules, tuple):
            self.exclude_modules = list(self.exclude_modules)
        _refuse_unknown_keywords(kwargs)
        super().__post_init__(**kwargs)
        self.validate_mst()
        object.__setattr__(self, "_mst_validated", True)

    def __setattr__(self, name, value):
        """An MST field set after construction is validated like one passed to the constructor (the old value stays
        when the new one is refused). Change related fields together with ``MSTConfig(**{**cfg.mst_dict(), ...})``
        when one alone would break a rule that ties them (e.g. ``warmup_ratio + restoration_ratio <= 1``)."""
        if name not in _MST_FIELDS or not self.__dict__.get("_mst_validated"):
            super().__setattr__(name, value)
            return
        old = self.__dict__.get(name)
        super().__setattr__(name, value)
        try:
            self.validate_mst()
        except (TypeError, ValueError):
            super().__setattr__(name, old)
            raise

    # ------------------------------------------------------------------ validation
    def validate_mst(self) -> None:
        """Raise ``ValueError``/``TypeError`` naming the first invalid field, its value and the fix."""
        for name in ("initial_sparsity", "ultra_sparsity", "final_sparsity"):
            value = getattr(self, name)
            if not _is_number(value) or not 0.0 <= value < 1.0:
                raise ValueError(f"`{name}` must be a number in [0, 1), got {value!r}.")
        for name in ("warmup_ratio", "restoration_ratio"):
            value = getattr(self, name)
            if not _is_number(value) or not 0.0 <= value <= 1.0:
                raise ValueError(f"`{name}` must be a fraction of the run in [0, 1], got {value!r}.")
        if self.warmup_ratio + self.restoration_ratio > 1.0:
            raise ValueError(
                f"`warmup_ratio` + `restoration_ratio` must not exceed 1 (the phases must fit in the run), got "
                f"{self.warmup_ratio!r} + {self.restoration_ratio!r} = {self.warmup_ratio + self.restoration_ratio!r}."
            )
        for name in ("warmup_curve", "restoration_curve"):
            if getattr(self, name) not in schedule.CURVES:
                raise ValueError(f"`{name}` must be one of {schedule.CURVES}, got {getattr(self, name)!r}.")
        if not _is_int(self.update_interval) or self.update_interval < 1:
            raise ValueError(f"`update_interval` must be a positive number of steps, got {self.update_interval!r}.")
        if not _is_number(self.drop_fraction) or not 0.0 <= self.drop_fraction <= 1.0:
            raise ValueError(f"`drop_fraction` must be in [0, 1], got {self.drop_fraction!r}.")
        if self.drop_fraction_schedule not in schedule.DROP_FRACTION_SCHEDULES:
            raise ValueError(
                f"`drop_fraction_schedule` must be one of {schedule.DROP_FRACTION_SCHEDULES}, "
                f"got {self.drop_fraction_schedule!r}."
            )
        self._validate_grow_method()
        if not _is_number(self.mixed_gradient_fraction) or not 0.0 <= self.mixed_gradient_fraction <= 1.0:
            raise ValueError(f"`mixed_gradient_fraction` must be in [0, 1], got {self.mixed_gradient_fraction!r}.")
        if self.sparsity_distribution not in SPARSITY_DISTRIBUTIONS:
            raise ValueError(
                f"`sparsity_distribution` must be one of {SPARSITY_DISTRIBUTIONS}, got {self.sparsity_distribution!r}."
            )
        if self.sparsity_structure not in SPARSITY_STRUCTURES:
            raise ValueError(
                f"`sparsity_structure` must be one of {SPARSITY_STRUCTURES}, got {self.sparsity_structure!r}."
            )
        if not _is_int(self.block_size) or self.block_size < 1:
            raise ValueError(f"`block_size` must be a positive int (the tile side, e.g. 64), got {self.block_size!r}.")
        if self.weight_kernels not in WEIGHT_KERNELS:
            raise ValueError(f"`weight_kernels` must be one of {WEIGHT_KERNELS}, got {self.weight_kernels!r}.")
        if self.weight_kernels != "dense" and self.sparsity_structure != "block":
            raise ValueError(
                f"`weight_kernels={self.weight_kernels!r}` runs block-sparse kernels, which need block-structured "
                f"masks: set `sparsity_structure='block'` (got {self.sparsity_structure!r}) or "
                "`weight_kernels='dense'`."
            )
        if self.weight_kernels != "dense" and self.block_size not in (16, 32, 64, 128):
            raise ValueError(
                f"`weight_kernels={self.weight_kernels!r}` needs `block_size` 32, 64 or 128 (16 for tests), got "
                f"{self.block_size!r}; use one of those or `weight_kernels='dense'`."
            )
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str) and not (
                isinstance(value, list) and all(isinstance(v, str) for v in value)
            ):
                raise TypeError(
                    f"`{name}` must be None, a regex string or a list of module-name suffixes, got {value!r}."
                )
            if isinstance(value, str):
                check_pattern(name, value)
        if not isinstance(self.sparsify_lm_head, bool):
            raise TypeError(f"`sparsify_lm_head` must be True or False, got {self.sparsify_lm_head!r}.")
        if not _is_int(self.seed):
            raise TypeError(f"`seed` must be an int, got {self.seed!r}.")
        self._validate_hsa()
        recipe.validate_recipe(self)

    def _validate_grow_method(self) -> None:
        method = self.grow_method
        if isinstance(method, str):
            if method not in GROW_METHODS:
                raise ValueError(
                    f"`grow_method` must be one of {GROW_METHODS} or a dict phase -> method, got {method!r}."
                )
            return
        if not isinstance(method, dict):
            raise TypeError(f"`grow_method` must be a method name or a dict phase -> method name, got {method!r}.")
        unknown_phases = sorted(set(method) - set(schedule.PHASES))
        missing = [p for p in schedule.PHASES if p not in method]
        if unknown_phases or missing:
            raise ValueError(
                f"`grow_method` dict must have exactly the keys {schedule.PHASES}, got {method!r} "
                f"(unknown {unknown_phases}, missing {missing})."
            )
        for phase_name, name in method.items():
            if name not in GROW_METHODS:
                raise ValueError(
                    f"`grow_method[{phase_name!r}]` must be one of {GROW_METHODS}, got {name!r} in {method!r}."
                )

    def _validate_hsa(self) -> None:
        """`hsa_phases` here (a schedule matter); every other ``hsa_*`` field through `HSASpec`, the one validator."""
        bad = [p for p in self.hsa_phases if p not in schedule.PHASES]
        if bad:
            raise ValueError(f"`hsa_phases` may only hold {schedule.PHASES}, got {self.hsa_phases!r}.")
        HSASpec.from_config(self)

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data.pop("_mst_validated", None)
        return data

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_preset(cls, name: str = DEFAULT_PRESET, **overrides) -> "MSTConfig":
        """A named recipe of ``PRESETS`` (by default ``DEFAULT_PRESET``, the study's best), fields overridable."""
        return cls(**preset_fields(name, overrides))

    # ------------------------------------------------------------------ (de)serialisation under mst_config.json
    def mst_dict(self) -> dict[str, Any]:
        """The MST fields only (no generic PretrainedConfig keys), JSON-ready."""
        data = {name: copy.deepcopy(getattr(self, name)) for name in self.__dataclass_fields__ if name in _MST_FIELDS}
        data["model_type"] = self.model_type
        return data

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> str:
        """Write ``mst_config.json`` into ``save_directory`` (never the model's ``config.json``).

        ``extra`` (a dict, optional keyword) is stored next to the fields, e.g. the step the config was saved at.
        With ``push_to_hub=True`` the folder is uploaded with the usual ``push_to_hub`` keyword arguments."""
        extra = kwargs.pop("extra", None) or {}
        os.makedirs(save_directory, exist_ok=True)
        data = self.mst_dict()
        data.update(extra)
        path = os.path.join(save_directory, MST_CONFIG_NAME)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
        if push_to_hub:
            from huggingface_hub import HfApi

            repo_id = kwargs.pop("repo_id", os.path.basename(os.path.normpath(save_directory)))
            api = HfApi(token=kwargs.pop("token", None))
            repo_id = api.create_repo(repo_id, exist_ok=True, private=kwargs.pop("private", None)).repo_id
            api.upload_file(path_or_fileobj=path, path_in_repo=MST_CONFIG_NAME, repo_id=repo_id,
                            commit_message=kwargs.pop("commit_message", "Upload MST config"))
        return path

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "MSTConfig":
        """Load ``mst_config.json`` from a folder (or a Hub repo, when reachable); keyword arguments override."""
        kwargs.pop("_configuration_file", None)
        config_dict, _ = cls.get_config_dict(pretrained_model_name_or_path, _configuration_file=MST_CONFIG_NAME)
        data = saved_fields(config_dict, os.path.join(str(pretrained_model_name_or_path), MST_CONFIG_NAME))
        data.update(kwargs)
        return cls(**data)

    @classmethod
    def saved_extra(cls, directory: str | os.PathLike) -> dict[str, Any]:
        """The non-field entries stored next to a saved config (e.g. ``saved_at_step``), or ``{}``."""
        path = os.path.join(directory, MST_CONFIG_NAME)
        if not os.path.isfile(path):
            return {}
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return {k: v for k, v in data.items() if k not in _MST_FIELDS and k != "model_type"}


_MST_FIELDS = frozenset(name for name in MSTConfig.__dataclass_fields__
                        if name not in PretrainedConfig.__dataclass_fields__)

# Keywords that PretrainedConfig itself writes or accepts when a config round-trips (not MST fields).
_GENERIC_KEYWORDS = frozenset(PretrainedConfig().to_dict()) | {"torch_dtype", "num_labels", "name_or_path"}

SAVE_INFO_KEYS = frozenset({"model_type", "saved_at_step", "total_steps", "saved_in_phase", "hsa_active"})


def saved_fields(data: dict, source: str) -> dict:
    """The MST fields of a saved ``mst_config.json`` (every reader's door). A key close to a field's name is a misspelt
    field, which would train with its default: refused; other keys are save information or ``extra`` entries."""
    _refuse_unknown_keywords({k: v for k, v in data.items() if k not in _MST_FIELDS | SAVE_INFO_KEYS}, source, True)
    return {k: v for k, v in data.items() if k in _MST_FIELDS}


def _refuse_unknown_keywords(kwargs: dict, source: str | None = None, typos_only: bool = False) -> None:
    """A keyword that is neither an MST field nor a generic config key is a typo: refuse it (PretrainedConfig
    would store it silently and keep the default of the field that was meant). With ``typos_only`` (a file, named
    by ``source``, may hold other entries) only a key close to a field's name."""
    close = {k: difflib.get_close_matches(k, sorted(_MST_FIELDS), n=1) for k in kwargs
             if k not in _GENERIC_KEYWORDS and not k.startswith("_")}
    unknown = sorted(k for k in close if close[k] or not typos_only)
    if not unknown:
        return
    name = unknown[0]
    hint = f"did you mean `{close[name][0]}`?" if close[name] else f"the MST fields are {sorted(_MST_FIELDS)}."
    what = "MSTConfig got an unknown keyword" if source is None else f"{source} holds the unknown key"
    raise TypeError(f"{what} `{name}`={kwargs[name]!r}; {hint}")
