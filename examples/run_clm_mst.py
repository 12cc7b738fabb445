#!/usr/bin/env python
"""Causal language modelling with Mixed Sparsity Training.

This is the usual shape of transformers' ``run_clm.py`` (model/data/training argument dataclasses, tokenize,
``group_texts`` into blocks, ``Trainer``, perplexity = exp(eval loss)) plus one feature, MST. Every line that MST
adds or changes carries a ``# MST`` comment.

With no data or model argument it trains a small GPT-2 on the text shipped with ``mst_hf`` (Moby-Dick and the
GPT-2 tokenizer), offline, in about four and a half minutes on 2 CPU cores, and writes the model,
``mst_output/summary.{json,md}``, ``mst_output/trace.json`` and ``mst_output/schedule.png``::

    python examples/run_clm_mst.py
    python examples/run_clm_mst.py --compare_dense          # also trains the dense baseline
    python examples/run_clm_mst.py args.json                # all arguments from a JSON file
    accelerate launch --num_processes 2 examples/run_clm_mst.py --report_to tensorboard   # on 2 GPUs
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 examples/run_clm_mst.py --use_cpu \
        --ddp_backend gloo                                  # 2 CPU processes (see docs/example.md)

The FLOP reduction it reports is *counted* (matmul FLOPs of the masked weights and of the attention pattern, the
paper's convention), not measured time: dense kernels run the masked weights at full cost.
"""

import copy
import dataclasses
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from itertools import chain

import datasets
import evaluate
import numpy as np
import psutil
import torch
import transformers
from datasets import DatasetDict, load_dataset, load_from_disk
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

import mst_hf  # MST
from mst_hf import MSTConfig, MSTTrainer, schedule  # MST
from mst_hf.embedded import embedded_tokenizer, load_embedded_dataset  # MST
from mst_hf.metrics import TOKEN_ACCURACY_PATH  # MST
from mst_hf.plan import plan_run  # MST
from mst_hf.plotting import plot_schedule  # MST

logger = logging.getLogger(__name__)

# The embedded default run (no model and no data argument): a small GPT-2 on Moby-Dick, a few minutes on 2 CPU cores.
DEFAULT_BLOCK_SIZE = 128
DEFAULT_GPT2_OVERRIDES = "n_layer=4,n_head=4,n_embd=128,attn_pdrop=0.0,resid_pdrop=0.0,embd_pdrop=0.0"
# Training defaults of this script (any of them can be passed on the command line or in the JSON file).
EXAMPLE_DEFAULTS = {
    "output_dir": "mst_output",
    "max_steps": 200,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 16,
    "learning_rate": 2e-3,
    "weight_decay": 0.0,
    "warmup_steps": 20,
    "lr_scheduler_type": "cosine",
    "eval_strategy": "steps",
    "eval_steps": 100,
    "logging_steps": 10,
    "save_strategy": "no",
    "report_to": "none",
    "seed": 42,
}


@dataclass
class ModelArguments:
    """Which model/config/tokenizer to train from (or train from scratch)."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Folder (or Hub id) of a pretrained model; unset: train from scratch."}
    )
    model_type: str | None = field(
        default=None,
        metadata={"help": f"Train from scratch with this model type (one of {', '.join(sorted(CONFIG_MAPPING))})."},
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "Override config fields when training from scratch, e.g. `n_layer=4,n_embd=256,n_head=4`."},
    )
    config_name: str | None = field(default=None, metadata={"help": "Config folder or id, if not the model's."})
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer folder or id; default: the model's, else the shipped GPT-2 one."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where downloaded models and datasets are cached."})
    use_fast_tokenizer: bool = field(default=True, metadata={"help": "Use a fast (tokenizers-backed) tokenizer."})
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of the model."})
    token: str | None = field(default=None, metadata={"help": "Hub token for private models or datasets."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the Hub to run."})
    dtype: str | None = field(
        default=None,
        metadata={
            "help": "dtype to load a pretrained model in.",
            "choices": ["auto", "bfloat16", "float16", "float32"],
        },
    )

    def __post_init__(self):
        if self.config_overrides is not None and (self.config_name is not None or self.model_name_or_path is not None):
            raise ValueError(
                f"`--config_overrides` ({self.config_overrides!r}) only applies when training from scratch; drop "
                "`--config_name`/`--model_name_or_path` or the overrides."
            )


@dataclass
class DataTrainingArguments:
    """What data to train and evaluate on."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "A Hub dataset id, or a local folder written by `save_to_disk`."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset configuration name."})
    train_file: str | None = field(default=None, metadata={"help": "Training data: a .txt, .json(l) or .csv file."})
    validation_file: str | None = field(default=None, metadata={"help": "Evaluation data, same format."})
    text_column_name: str | None = field(
        default=None, metadata={"help": "Column holding the text (default: `text` if present, else the first one)."}
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep only this many training blocks (for quick runs and tests)."}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only this many evaluation blocks."})
    block_size: int | None = field(
        default=None,
        metadata={
            "help": f"Length of the training sequences. Default: {DEFAULT_BLOCK_SIZE} for the embedded default run, "
            "else the tokenizer's maximum length (at most 1024)."
        },
    )
    overwrite_cache: bool = field(default=False, metadata={"help": "Recompute the tokenized datasets."})
    validation_split_percentage: int = field(
        default=5, metadata={"help": "Percentage of the training data held out when there is no validation split."}
    )
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenization."})
    keep_linebreaks: bool = field(default=True, metadata={"help": "Keep line breaks when reading .txt files."})

    def __post_init__(self):
        for name in ("train_file", "validation_file"):
            path = getattr(self, name)
            if path is not None and path.rsplit(".", 1)[-1] not in ("txt", "json", "jsonl", "csv"):
                raise ValueError(f"`--{name}` must be a .txt, .json, .jsonl or .csv file, got {path!r}.")
        if not 0 < self.validation_split_percentage < 100:
            raise ValueError(
                f"`--validation_split_percentage` must be in 1..99, got {self.validation_split_percentage!r}."
            )


@dataclass
class MSTArguments:  # MST
    """Mixed Sparsity Training: every field maps to the `MSTConfig` field without the `mst_` prefix. Unset (None)
    fields take the preset's value, else the `MSTConfig` default; `mst_update_interval` and the HSA window/stride,
    when unset, are scaled to the run (see `build_mst_config`)."""

    mst_preset: str | None = field(default=None, metadata={"help": f"Start from a preset: {sorted(mst_hf.PRESETS)}."})
    mst_initial_sparsity: float | None = field(default=None, metadata={"help": "Sparsity at step 0 (default 0.0)."})
    mst_ultra_sparsity: float | None = field(default=None, metadata={"help": "Sparsity of the ultra phase (0.9)."})
    mst_final_sparsity: float | None = field(default=None, metadata={"help": "Sparsity at the end (0.0: dense)."})
    mst_warmup_ratio: float | None = field(default=None, metadata={"help": "Warm-up share of the steps (0.1)."})
    mst_restoration_ratio: float | None = field(default=None, metadata={"help": "Restoration share (0.2)."})
    mst_warmup_curve: str | None = field(default=None, metadata={"help": "cubic, linear or cosine."})
    mst_restoration_curve: str | None = field(default=None, metadata={"help": "cubic, linear or cosine."})
    mst_update_interval: int | None = field(
        default=None,
        metadata={"help": "Steps between topology updates. Default: 100, or max_steps // 25 under 2500 steps."},
    )
    mst_drop_fraction: float | None = field(default=None, metadata={"help": "zeta_0, share dropped per update (0.3)."})
    mst_drop_fraction_schedule: str | None = field(
        default=None, metadata={"help": "cosine, cosine_per_phase or constant."}
    )
    mst_grow_method: str | None = field(
        default=None,
        metadata={
            "help": "gradient, random or mixed; or per phase, e.g. `warmup=gradient,ultra=mixed,restoration=gradient`."
        },
    )
    mst_mixed_gradient_fraction: float | None = field(default=None, metadata={"help": "Gradient share of mixed."})
    mst_sparsity_distribution: str | None = field(default=None, metadata={"help": "erdos_renyi or uniform."})
    mst_target_modules: str | None = field(
        default=None, metadata={"help": "Comma-separated module-name suffixes to sparsify (default: per model type)."}
    )
    mst_exclude_modules: str | None = field(default=None, metadata={"help": "Comma-separated suffixes to keep dense."})
    mst_sparsify_lm_head: bool | None = field(default=None, metadata={"help": "Sparsify the LM head (True)."})
    mst_seed: int | None = field(default=None, metadata={"help": "Seed of the random growth (0)."})
    mst_hsa_pattern: str | None = field(
        default=None, metadata={"help": "dense, local, strided, local_strided (default) or fixed."}
    )
    mst_hsa_window: int | None = field(
        default=None, metadata={"help": "Local window. Default: 128, or block_size // 8 for blocks under 1024."}
    )
    mst_hsa_stride: int | None = field(
        default=None, metadata={"help": "Stride. Default: 128, or block_size // 8 for blocks under 1024."}
    )
    mst_hsa_block: int | None = field(
        default=None, metadata={"help": "Block of the fixed pattern. Default: 128, or block_size // 8 under 1024."}
    )
    mst_hsa_phases: str | None = field(default=None, metadata={"help": "Comma-separated phases with HSA (ultra)."})
    mst_hsa_layers: str | None = field(
        default=None, metadata={"help": "all, alternate, or comma-separated layer indices (all)."}
    )
    mst_hsa_head_split: bool | None = field(default=None, metadata={"help": "Half the heads local, half strided."})
    compare_dense: bool = field(
        default=False, metadata={"help": "Also train the dense baseline (plain Trainer, same data and steps)."}
    )
    mst_mask_digest_file: str | None = field(
        default=None,
        metadata={"help": "Every rank appends a JSON line {rank, step, digest} to PATH.rank<r> after each update."},
    )


# ---------------------------------------------------------------------------------------------------------- MST config
def _comma_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _parse_grow_method(value: str):
    if "=" not in value:
        return value
    pairs = [item.split("=", 1) for item in _comma_list(value)]
    return {phase.strip(): method.strip() for phase, method in pairs}


def _parse_layers(value: str):
    if value in ("all", "alternate"):
        return value
    try:
        return [int(i) for i in _comma_list(value)]
    except ValueError as err:
        raise ValueError(
            f"`--mst_hsa_layers` must be all, alternate or comma-separated layer indices like 0,2, got {value!r}."
        ) from err


_MST_PARSERS = {
    "grow_method": _parse_grow_method,
    "target_modules": _comma_list,
    "exclude_modules": _comma_list,
    "hsa_phases": _comma_list,
    "hsa_layers": _parse_layers,
}


def build_mst_config(mst_args: MSTArguments, max_steps: int, block_size: int) -> MSTConfig:  # MST
    """The `MSTConfig` of the run: preset, then the explicit `--mst_*` values, then run-scaled defaults for the
    update interval (about 25 updates in runs under 2500 steps) and the HSA window/stride/block (block_size // 8,
    the paper's 128 at 1024). A bad value raises the config's error, prefixed with the command-line flag."""
    if mst_args.mst_preset is not None and mst_args.mst_preset not in mst_hf.PRESETS:
        raise ValueError(f"`--mst_preset` must be one of {sorted(mst_hf.PRESETS)}, got {mst_args.mst_preset!r}.")
    fields = copy.deepcopy(mst_hf.PRESETS[mst_args.mst_preset]) if mst_args.mst_preset else {}
    for name, value in asdict(mst_args).items():
        if not name.startswith("mst_") or name in ("mst_preset", "mst_mask_digest_file") or value is None:
            continue
        key = name[len("mst_"):]
        fields[key] = _MST_PARSERS[key](value) if key in _MST_PARSERS else value
    if "update_interval" not in fields:
        fields["update_interval"] = min(100, max(1, max_steps // 25))
    for name in ("hsa_window", "hsa_stride", "hsa_block"):
        if name not in fields and block_size < 1024:
            fields[name] = max(1, block_size // 8)
    try:
        return MSTConfig(**fields)
    except (ValueError, TypeError) as err:
        flag = next((f"--mst_{k}" for k in fields if f"`{k}" in str(err)), "--mst_*")
        raise type(err)(f"{flag}: {err}") from err


class MaskDigestCallback(TrainerCallback):  # MST
    """After every topology update, append ``{"rank", "step", "digest"}`` to ``PATH.rank<r>`` (one JSON line), so
    that runs on several processes can be checked for identical masks."""

    def __init__(self, controller, path: str, rank: int):
        self.controller, self.path, self.rank, self.seen = controller, f"{path}.rank{rank}", rank, 0
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        open(self.path, "w").close()

    def on_step_end(self, args, state, control, **kwargs):
        history = self.controller.history
        if len(history) > self.seen:
            with open(self.path, "a", encoding="utf-8") as f:
                for record in history[self.seen:]:
                    line = {"rank": self.rank, "step": record["step"], "digest": self.controller.masks.digest()}
                    f.write(json.dumps(line) + "\n")
            self.seen = len(history)


class MSTTraceCallback(TrainerCallback):  # MST
    """Record the run step by step, in the layout of `mst_hf.plan.Plan.trace()` (entry ``t`` describes optimizer step
    ``t``: the schedule's target, the sparsity of the masks in force during the step, its attention density, and the
    cumulative counted FLOPs through it), for `mst_hf.plotting.plot_schedule` and ``trace.json``."""

    KEYS = ("step", "target_sparsity", "sparsity", "attention_density", "mst_cumulative_flops",
            "dense_cumulative_flops")

    def __init__(self, controller, mst_config: MSTConfig):
        self.controller, self.mst_config = controller, mst_config
        self.trace = {key: [] for key in self.KEYS}
        self.in_force = controller.masks.sparsity()  # sparsity of the masks the next step runs with

    def on_step_end(self, args, state, control, **kwargs):
        step, flops = state.global_step - 1, self.controller.flops.metrics()
        row = (step, schedule.target_sparsity(step, state.max_steps, self.mst_config), self.in_force,
               flops["mst/attention_density"], flops["mst/total_flops"], flops["mst/dense_total_flops"])
        for key, value in zip(self.KEYS, row):
            self.trace[key].append(value)
        self.in_force = self.controller.masks.sparsity()  # after this step's topology update, if any

    def arrays(self, total_steps: int) -> dict:
        return {**{k: np.asarray(v) for k, v in self.trace.items()},
                "phase_bounds": schedule.phase_bounds(total_steps, self.mst_config)}


# ---------------------------------------------------------------------------------------------------------- arguments
def parse_arguments(argv: list[str] | None = None):
    """``HfArgumentParser`` over the four dataclasses; a single ``.json`` argument is a config file. The script's
    own defaults (``EXAMPLE_DEFAULTS``) apply unless given; ``max_steps`` is dropped when epochs are asked for."""
    argv = sys.argv[1:] if argv is None else argv
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments, MSTArguments))  # MST
    defaults = dict(EXAMPLE_DEFAULTS)
    if len(argv) == 1 and argv[0].endswith(".json"):
        with open(argv[0], encoding="utf-8") as f:
            values = json.load(f)
        if "num_train_epochs" in values:
            defaults.pop("max_steps")
        return parser.parse_dict({**defaults, **values})
    if any(arg.split("=")[0] == "--num_train_epochs" for arg in argv):
        defaults.pop("max_steps")
    parser.set_defaults(**defaults)
    return parser.parse_args_into_dataclasses(args=argv)


def uses_embedded_data(data_args: DataTrainingArguments) -> bool:
    return data_args.dataset_name is None and data_args.train_file is None and data_args.validation_file is None


def uses_embedded_model(model_args: ModelArguments) -> bool:
    return model_args.model_name_or_path is None and model_args.config_name is None and model_args.model_type is None


# ---------------------------------------------------------------------------------------------------------- data
def load_raw_datasets(data_args: DataTrainingArguments, model_args: ModelArguments) -> DatasetDict:
    """Raw text splits ``train`` and ``validation``: from a Hub dataset or a ``save_to_disk`` folder, from files,
    or (no data argument) the Moby-Dick text shipped with mst_hf."""
    if uses_embedded_data(data_args):  # MST: the shipped corpus, offline
        return load_embedded_dataset(validation_fraction=data_args.validation_split_percentage / 100)
    split = data_args.validation_split_percentage
    if data_args.dataset_name is not None:
        if os.path.isdir(data_args.dataset_name):
            raw = load_from_disk(data_args.dataset_name)
            raw = raw if isinstance(raw, DatasetDict) else DatasetDict(train=raw)
        else:
            raw = load_dataset(
                data_args.dataset_name, data_args.dataset_config_name, cache_dir=model_args.cache_dir,
                token=model_args.token, trust_remote_code=model_args.trust_remote_code,
            )
    else:
        data_files = {}
        if data_args.train_file is not None:
            data_files["train"] = data_args.train_file
        if data_args.validation_file is not None:
            data_files["validation"] = data_args.validation_file
        extension = next(iter(data_files.values())).rsplit(".", 1)[-1]
        extension = {"txt": "text", "jsonl": "json"}.get(extension, extension)
        kwargs = {"keep_linebreaks": data_args.keep_linebreaks} if extension == "text" else {}
        raw = load_dataset(extension, data_files=data_files, cache_dir=model_args.cache_dir, **kwargs)
        if "train" not in raw:
            raise ValueError("`--validation_file` needs a `--train_file` too (or use `--dataset_name`).")
    if "validation" not in raw:
        held_out = raw["train"].train_test_split(test_size=split / 100, shuffle=False)
        raw = DatasetDict(train=held_out["train"], validation=held_out["test"])
    return raw


def tokenize_and_group(raw: DatasetDict, tokenizer, data_args: DataTrainingArguments, block_size: int, training_args):
    """Tokenize every text, concatenate, cut into ``block_size`` blocks (the remainder is dropped), labels = ids."""
    columns = raw["train"].column_names
    text_column = data_args.text_column_name or ("text" if "text" in columns else columns[0])
    if text_column not in columns:
        raise ValueError(f"`--text_column_name` {text_column!r} is not a column of the data; columns: {columns}.")

    def tokenize(examples):
        return tokenizer(list(examples[text_column]))

    def group_texts(examples):
        joined = {k: list(chain.from_iterable(examples[k])) for k in examples}
        total = len(joined["input_ids"]) // block_size * block_size
        blocks = {k: [v[i : i + block_size] for i in range(0, total, block_size)] for k, v in joined.items()}
        blocks["labels"] = [list(ids) for ids in blocks["input_ids"]]
        return blocks

    cache = not data_args.overwrite_cache
    with training_args.main_process_first(desc="tokenization"):
        tokenized = raw.map(
            tokenize, batched=True, num_proc=data_args.preprocessing_num_workers, remove_columns=columns,
            load_from_cache_file=cache, desc="Tokenizing",
        )
    with training_args.main_process_first(desc="grouping texts"):
        grouped = tokenized.map(
            group_texts, batched=True, batch_size=1000, num_proc=data_args.preprocessing_num_workers,
            load_from_cache_file=cache, desc=f"Grouping texts in blocks of {block_size}",
        )
    train, validation = grouped["train"], grouped["validation"]
    if data_args.max_train_samples is not None:
        train = train.select(range(min(len(train), data_args.max_train_samples)))
    if data_args.max_eval_samples is not None:
        validation = validation.select(range(min(len(validation), data_args.max_eval_samples)))
    return train, validation


# ---------------------------------------------------------------------------------------------------------- model
def load_tokenizer(model_args: ModelArguments):
    kwargs = {"cache_dir": model_args.cache_dir, "use_fast": model_args.use_fast_tokenizer,
              "revision": model_args.model_revision, "token": model_args.token,
              "trust_remote_code": model_args.trust_remote_code}
    if model_args.tokenizer_name is not None:
        tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name, **kwargs)
    elif model_args.model_name_or_path is not None:
        tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, **kwargs)
    else:  # MST: no tokenizer given: the GPT-2 tokenizer shipped with mst_hf
        return embedded_tokenizer()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_config(model_args: ModelArguments, block_size_hint: int | None):
    kwargs = {"cache_dir": model_args.cache_dir, "revision": model_args.model_revision, "token": model_args.token,
              "trust_remote_code": model_args.trust_remote_code}
    if model_args.config_name is not None:
        return AutoConfig.from_pretrained(model_args.config_name, **kwargs)
    if model_args.model_name_or_path is not None:
        return AutoConfig.from_pretrained(model_args.model_name_or_path, **kwargs)
    model_type = model_args.model_type or "gpt2"
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"`--model_type` must be one of {sorted(CONFIG_MAPPING)}, got {model_type!r}.")
    config = CONFIG_MAPPING[model_type]()
    overrides = [model_args.config_overrides] if model_args.config_overrides else []
    if uses_embedded_model(model_args):  # MST: the small GPT-2 of the embedded default run
        overrides.insert(0, f"{DEFAULT_GPT2_OVERRIDES},n_positions={block_size_hint or DEFAULT_BLOCK_SIZE}")
    for override in overrides:
        logger.info(f"Config overrides: {override}")
        config.update_from_string(override)
    return config


def build_model(model_args: ModelArguments, config, tokenizer):
    if model_args.model_name_or_path is not None:
        dtype = model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)
        model = AutoModelForCausalLM.from_pretrained(
            model_args.model_name_or_path, config=config, cache_dir=model_args.cache_dir,
            revision=model_args.model_revision, token=model_args.token,
            trust_remote_code=model_args.trust_remote_code, dtype=dtype,
        )
    else:
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=model_args.trust_remote_code)
        logger.info(f"Training a new model from scratch: {model.num_parameters() / 1e6:.2f}M parameters")
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    return model


def resolve_block_size(data_args: DataTrainingArguments, tokenizer, config) -> int:
    max_positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 1024
    if data_args.block_size is None:
        return min(1024, tokenizer.model_max_length, max_positions)
    if data_args.block_size > max_positions:
        raise ValueError(
            f"`--block_size` {data_args.block_size} exceeds the model's {max_positions} positions; pass "
            f"`--block_size {max_positions}` or less."
        )
    return data_args.block_size


# ---------------------------------------------------------------------------------------------------------- metrics
def preprocess_logits_for_metrics(logits, labels):
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(dim=-1)  # (B, T): keep only the predicted ids, not the (B, T, vocab) logits


def make_compute_metrics(training_args):
    with training_args.main_process_first(desc="loading the token_accuracy metric"):
        metric = evaluate.load(TOKEN_ACCURACY_PATH)  # MST: the metric module shipped with mst_hf (offline)

    def compute_metrics(eval_preds):
        preds, labels = eval_preds
        # The prediction at position t is for the token at t + 1.
        return metric.compute(predictions=preds[:, :-1].reshape(-1), references=labels[:, 1:].reshape(-1))

    return compute_metrics


def perplexity(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


# ---------------------------------------------------------------------------------------------------------- summary
def last_logged(log_history: list[dict], key: str):
    return next((r[key] for r in reversed(log_history) if key in r), None)


def write_summary(output_dir: str, summary: dict) -> str:
    """Write ``summary.json`` and ``summary.md`` (MST and, with ``--compare_dense``, dense side by side); return the
    markdown."""
    with open(os.path.join(output_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    mst, dense = summary["mst"], summary.get("dense")
    runs = [("MST", mst)] + ([("dense", dense)] if dense else [])

    def row(label, fmt, key):
        cells = [fmt.format(r[key]) if r.get(key) is not None else "-" for _, r in runs]
        return f"| {label} | " + " | ".join(cells) + " |"

    lines = [
        "# MST run summary",
        "",
        f"{summary['model']}, {summary['parameters'] / 1e6:.2f}M parameters; {summary['data']}: "
        f"{summary['train_blocks']} training and {summary['eval_blocks']} evaluation blocks of "
        f"{summary['block_size']} tokens; {summary['max_steps']} optimizer steps of {summary['tokens_per_step']} "
        f"tokens. Perplexity before training: {summary['untrained_perplexity']:.1f}.",
        "",
        "| | " + " | ".join(name for name, _ in runs) + " |",
        "|---|" + "---|" * len(runs),
        row("perplexity after training", "{:.2f}", "perplexity"),
        row("next-token accuracy", "{:.4f}", "token_accuracy"),
        row("training FLOPs (counted)", "{:.4e}", "total_flops"),
        row("FLOP reduction vs dense (counted)", "{:.3f}x", "counted_flop_reduction"),
        row("FLOP reduction vs dense (planned)", "{:.3f}x", "planned_flop_reduction"),
        row("final weight sparsity", "{:.4f}", "final_sparsity"),
        row("topology updates", "{}", "topology_updates"),
        row("training time (s)", "{:.1f}", "train_seconds"),
        "",
        f"Wall time of the whole script: {summary['wall_seconds']:.1f} s.",
        "",
        "FLOPs are counted matmul FLOPs (weights at their mask density, attention at its pattern density), not time:",
        "the masked weights run on dense kernels here, so the training times do not shrink with sparsity.",
        "",
    ]
    markdown = "\n".join(lines)
    with open(os.path.join(output_dir, "summary.md"), "w", encoding="utf-8") as f:
        f.write(markdown)
    return markdown


# ---------------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    start = psutil.Process().create_time()  # wall time includes the imports
    model_args, data_args, training_args, mst_args = parse_arguments(argv)

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)])
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    logger.warning(
        f"Process rank {training_args.process_index} of {training_args.world_size}, device {training_args.device}"
    )
    if training_args.max_steps <= 0:  # MST
        raise ValueError(
            f"MST needs the number of optimizer steps up front for its schedule: pass `--max_steps N` (got "
            f"{training_args.max_steps}; `--num_train_epochs` alone is not enough)."
        )

    build_mst_config(mst_args, training_args.max_steps, data_args.block_size or DEFAULT_BLOCK_SIZE)  # MST: fail fast
    raw = load_raw_datasets(data_args, model_args)
    tokenizer = load_tokenizer(model_args)
    if data_args.block_size is None and uses_embedded_model(model_args):  # MST: the embedded default run
        data_args.block_size = DEFAULT_BLOCK_SIZE
    config = load_config(model_args, data_args.block_size)
    block_size = resolve_block_size(data_args, tokenizer, config)
    train_dataset, eval_dataset = tokenize_and_group(raw, tokenizer, data_args, block_size, training_args)
    mst_config = build_mst_config(mst_args, training_args.max_steps, block_size)  # MST
    logger.info(f"MST config: {json.dumps(mst_config.mst_dict(), sort_keys=True)}")

    dense_config = copy.deepcopy(config)  # MST: the dense baseline's, untouched by MSTTrainer's HSA settings
    set_seed(training_args.seed)  # the dense baseline starts from the same initial weights
    model = build_model(model_args, config, tokenizer)
    compute_metrics = make_compute_metrics(training_args)
    trainer = MSTTrainer(  # MST: MSTTrainer instead of Trainer
        model=model,
        args=training_args,
        mst_config=mst_config,  # MST
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=default_data_collator,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics,
    )
    trace = MSTTraceCallback(trainer.mst, mst_config)  # MST
    trainer.add_callback(trace)  # MST
    if mst_args.mst_mask_digest_file is not None:  # MST
        digest_path, rank = mst_args.mst_mask_digest_file, training_args.process_index
        trainer.add_callback(MaskDigestCallback(trainer.mst, digest_path, rank))

    # The untrained model's loss, through `predict` so that nothing is logged (a log before `train` would open the
    # TensorBoard writer in the working directory instead of output_dir).
    untrained = trainer.predict(eval_dataset, metric_key_prefix="eval_untrained").metrics
    t0 = time.time()
    train_result = trainer.train()
    mst_train_seconds = time.time() - t0
    trainer.save_model()
    metrics = trainer.evaluate()
    metrics["perplexity"] = perplexity(metrics["eval_loss"])
    trainer.log_metrics("train", train_result.metrics)
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("all", {**train_result.metrics, **metrics})

    # MST: counted FLOPs from the trainer's logs, the plan's prediction, and the schedule plot.
    history = trainer.state.log_history
    tokens_per_step = (
        training_args.per_device_train_batch_size * training_args.world_size
        * training_args.gradient_accumulation_steps * block_size
    )
    plan = plan_run(model, mst_config, total_steps=training_args.max_steps, tokens_per_step=tokens_per_step,
                    seq_len=block_size)
    summary = {
        "model": f"{config.model_type} (" + (model_args.model_name_or_path or "from scratch") + ")",
        "parameters": model.num_parameters(),
        "data": "embedded Moby-Dick" if uses_embedded_data(data_args) else (
            data_args.dataset_name or data_args.train_file),
        "train_blocks": len(train_dataset),
        "eval_blocks": len(eval_dataset),
        "block_size": block_size,
        "max_steps": training_args.max_steps,
        "tokens_per_step": tokens_per_step,
        "world_size": training_args.world_size,
        "untrained_perplexity": perplexity(untrained["eval_untrained_loss"]),
        "untrained_token_accuracy": untrained.get("eval_untrained_accuracy"),
        "mst_config": mst_config.mst_dict(),
        "hsa": mst_config.hsa_pattern != "dense",  # MSTTrainer runs the model with the "mst_hsa" attention
        "mst": {
            "perplexity": metrics["perplexity"],
            "eval_loss": metrics["eval_loss"],
            "token_accuracy": metrics.get("eval_accuracy"),
            "final_sparsity": trainer.mst.masks.sparsity(),
            "layer_sparsities": trainer.mst.masks.layer_sparsities(),
            "topology_updates": len(trainer.mst.history),
            "counted_flop_reduction": last_logged(history, "mst/flop_reduction"),
            "total_flops": last_logged(history, "mst/total_flops"),
            "dense_total_flops": last_logged(history, "mst/dense_total_flops"),
            "planned_flop_reduction": plan.flop_reduction,
            "train_seconds": mst_train_seconds,
        },
    }
    if training_args.should_save:
        with open(os.path.join(training_args.output_dir, "trace.json"), "w", encoding="utf-8") as f:
            json.dump(trace.trace, f)
        plot_schedule(trace.arrays(training_args.max_steps), os.path.join(training_args.output_dir, "schedule.png"),
                      title=f"MST run: counted FLOP reduction {summary['mst']['counted_flop_reduction']:.2f}x")

    if mst_args.compare_dense:  # MST: the dense baseline, same data, steps and initialisation
        set_seed(training_args.seed)
        dense_model = build_model(model_args, dense_config, tokenizer)
        dense_args = dataclasses.replace(training_args, output_dir=os.path.join(training_args.output_dir, "dense"))
        dense_trainer = Trainer(
            model=dense_model, args=dense_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
            processing_class=tokenizer, data_collator=default_data_collator, compute_metrics=compute_metrics,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )
        t0 = time.time()
        dense_trainer.train()
        dense_seconds = time.time() - t0
        dense_trainer.save_model()
        dense_metrics = dense_trainer.evaluate()
        summary["dense"] = {
            "perplexity": perplexity(dense_metrics["eval_loss"]),
            "eval_loss": dense_metrics["eval_loss"],
            "token_accuracy": dense_metrics.get("eval_accuracy"),
            "total_flops": summary["mst"]["dense_total_flops"],  # the same count at full density
            "counted_flop_reduction": 1.0,
            "final_sparsity": 0.0,
            "train_seconds": dense_seconds,
        }

    summary["wall_seconds"] = time.time() - start
    if training_args.should_save:
        markdown = write_summary(training_args.output_dir, summary)
        print(markdown)
    return summary


if __name__ == "__main__":
    main()
