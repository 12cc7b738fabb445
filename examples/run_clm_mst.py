#!/usr/bin/env python
"""Causal language modelling (GPT-2, Llama, Qwen, ... from scratch or from a checkpoint) with Mixed Sparsity
Training.

This script has the shape and the arguments of transformers' ``run_clm.py`` (model / data / training argument
dataclasses parsed by ``HfArgumentParser``, tokenize, ``group_texts`` into blocks, ``--do_train`` / ``--do_eval``,
resume, perplexity = exp(eval loss), model card or ``--push_to_hub``) and adds Mixed Sparsity Training. Every line
that differs from it for MST is marked ``# MST``: ``grep -n "# MST" examples/run_clm_mst.py``.

With no argument at all it trains and evaluates a small GPT-2 on the text shipped with ``mst_hf`` (Moby-Dick and
the GPT-2 tokenizer), offline, in about four minutes on 2 CPU cores, and writes the model with its MST files,
``summary.{json,md}``, ``trace.json`` and ``schedule.png`` into ``mst_output/``::

    python examples/run_clm_mst.py
    python examples/run_clm_mst.py --compare_dense              # also trains the dense baseline
    python examples/run_clm_mst.py args.json                    # all arguments from a JSON file
    python examples/run_clm_mst.py --save_strategy steps --save_steps 50    # checkpoints; after a stop:
    python examples/run_clm_mst.py --save_strategy steps --save_steps 50 --resume_from_checkpoint DIR/checkpoint-100
    python examples/run_clm_mst.py --do_eval --model_name_or_path mst_output --output_dir /tmp/eval  # evaluate only
    accelerate launch --num_processes 2 examples/run_clm_mst.py --report_to tensorboard   # on 2 GPUs

It needs the example extra: ``pip install -e ".[example]"``. The FLOP reduction it reports is *counted* (matmul
FLOPs of the masked weights and of the attention pattern, the paper's convention), not a measured time.
"""

import copy
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from itertools import chain

import psutil
import torch
import transformers
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
    TrainingArguments,
    default_data_collator,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils.versions import require_version

require_version("datasets>=3.0", 'To fix: pip install -e ".[example]"')
require_version("evaluate>=0.4", 'To fix: pip install -e ".[example]"')

import datasets  # noqa: E402
import evaluate  # noqa: E402
from datasets import DatasetDict, load_dataset, load_from_disk  # noqa: E402

from mst_hf import MSTTrainer, layer_sparsities, reporting  # noqa: E402  # MST
from mst_hf.arguments import file_values, mst_arguments_dataclass, to_mst_config  # noqa: E402  # MST
from mst_hf.embedded import embedded_tokenizer, load_embedded_dataset  # noqa: E402  # MST
from mst_hf.metrics import TOKEN_ACCURACY_PATH  # noqa: E402  # MST

logger = logging.getLogger(__name__)

# MST: the embedded default run (no model and no data argument): a small GPT-2 on Moby-Dick, minutes on 2 CPU cores.
DEFAULT_BLOCK_SIZE = 128
DEFAULT_GPT2_OVERRIDES = "n_layer=4,n_head=4,n_embd=128,attn_pdrop=0.0,resid_pdrop=0.0,embd_pdrop=0.0"
# MST: training defaults of this script (each can be given on the command line or in the JSON file).
EXAMPLE_DEFAULTS = {
    "output_dir": "mst_output",
    "max_steps": 200,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 16,
    "learning_rate": 2e-3,
    "weight_decay": 0.0,
    "warmup_steps": 20,  # the learning-rate schedule is the MST preset's `lr_schedule` (wsd), or Trainer's when None
    "eval_strategy": "steps",
    "eval_steps": 100,
    "logging_steps": 10,
    "save_strategy": "no",
    "report_to": "none",
    "seed": 42,
}


@dataclass
class ModelArguments:
    """Which model, config and tokenizer to train from, or train from scratch."""

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
        metadata={"help": "dtype to load a pretrained model in.",
                  "choices": ["auto", "bfloat16", "float16", "float32"]},
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


# MST: one --mst_<field> flag per MSTConfig field, generated from the config (help text from its field metadata),
# plus this script's own two flags.
MSTArguments = mst_arguments_dataclass(
    extra_fields=[
        ("compare_dense", bool, field(
            default=False, metadata={"help": "Also train the dense baseline (plain Trainer, same data and steps)."})),
        ("mst_mask_digest_file", str | None, field(
            default=None,
            metadata={"help": "Every rank appends a JSON line {rank, step, digest} to PATH.rank<r> after each "
                              "topology update (to check that ranks agree)."})),
    ]
)

HELP_DESCRIPTION = (  # MST: --help lists the MST flags first, then run_clm.py's own, then TrainingArguments'
    "Train a causal LM with Mixed Sparsity Training. Flags: first the MST ones (--mst_*, --compare_dense), then "
    "the model and data ones of transformers' run_clm.py, then every transformers.TrainingArguments flag. With "
    "no argument: a small GPT-2 on the shipped Moby-Dick text, offline."
)


def parse_arguments(argv: list[str] | None = None):
    """``HfArgumentParser`` over the argument dataclasses; a single ``.json`` argument is a config file.
    Returns ``(model_args, data_args, training_args, mst_args)``."""
    argv = sys.argv[1:] if argv is None else argv
    parser = HfArgumentParser(  # MST: the MST arguments first, so that --help shows them first
        (MSTArguments, ModelArguments, DataTrainingArguments, TrainingArguments),
        description=HELP_DESCRIPTION, usage="%(prog)s [--mst_* ...] [run_clm.py and TrainingArguments flags] | "
        "%(prog)s args.json",
    )
    defaults = dict(EXAMPLE_DEFAULTS)  # MST: this script's defaults
    if len(argv) == 1 and argv[0].endswith(".json"):
        with open(argv[0], encoding="utf-8") as f:
            given = file_values(json.load(f))  # MST: `null` for an mst_ field means None, as `none` on the CLI
        mst_args, model_args, data_args, training_args = parser.parse_dict(_with_defaults(defaults, given))
    else:
        flags = {arg.split("=")[0].lstrip("-").replace("-", "_"): None for arg in argv if arg.startswith("--")}
        parser.set_defaults(**_with_defaults(defaults, flags, only_defaults=True))
        mst_args, model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    return model_args, data_args, training_args, mst_args


def _with_defaults(defaults: dict, given: dict, only_defaults: bool = False) -> dict:  # MST
    """The script's defaults under the given arguments: ``max_steps`` is dropped when epochs are asked for, and with
    neither ``do_train`` nor ``do_eval`` given both are on (run_clm.py does nothing then; this script's no-argument
    run trains and evaluates)."""
    defaults = dict(defaults)
    if "num_train_epochs" in given:
        defaults.pop("max_steps")
    if "do_train" not in given and "do_eval" not in given:
        defaults.update(do_train=True, do_eval=True)
    return defaults if only_defaults else {**defaults, **given}


def uses_embedded_data(data_args: DataTrainingArguments) -> bool:  # MST
    return data_args.dataset_name is None and data_args.train_file is None and data_args.validation_file is None


def uses_embedded_model(model_args: ModelArguments) -> bool:  # MST
    return model_args.model_name_or_path is None and model_args.config_name is None and model_args.model_type is None


# ---------------------------------------------------------------------------------------------------------- data
def load_raw_datasets(data_args: DataTrainingArguments, model_args: ModelArguments) -> DatasetDict:
    """Raw text splits ``train`` and ``validation``: from a Hub dataset or a ``save_to_disk`` folder, from files,
    or (no data argument) the Moby-Dick text shipped with mst_hf."""
    if uses_embedded_data(data_args):  # MST: the shipped corpus, offline
        return load_embedded_dataset(validation_fraction=data_args.validation_split_percentage / 100)
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
        held_out = raw["train"].train_test_split(test_size=data_args.validation_split_percentage / 100, shuffle=False)
        raw = DatasetDict(train=held_out["train"], validation=held_out["test"])
    return raw


def tokenize_and_group(raw: DatasetDict, tokenizer, data_args: DataTrainingArguments, block_size: int, training_args):
    """Tokenize every text, concatenate, cut into ``block_size`` blocks (the remainder is dropped), labels = ids."""
    columns = raw["train"].column_names
    text_column = data_args.text_column_name or ("text" if "text" in columns else columns[0])
    if text_column not in columns:
        raise ValueError(f"`--text_column_name` {text_column!r} is not a column of the data; columns: {columns}.")

    def tokenize_function(examples):
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
            tokenize_function, batched=True, num_proc=data_args.preprocessing_num_workers, remove_columns=columns,
            load_from_cache_file=cache, desc="Tokenizing",
        )
    with training_args.main_process_first(desc="grouping texts"):
        grouped = tokenized.map(
            group_texts, batched=True, num_proc=data_args.preprocessing_num_workers, load_from_cache_file=cache,
            desc=f"Grouping texts in blocks of {block_size}",
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
    else:  # MST: no tokenizer given: the GPT-2 tokenizer shipped with mst_hf (run_clm.py refuses)
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
    model_type = model_args.model_type or "gpt2"  # MST: gpt2 when no model type is given
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
    # Grow the token embedding when the tokenizer knows more tokens than the model has rows (never shrink it).
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


def check_mst_fits_model(mst_config, shapes_model) -> None:  # MST
    """The layer-wise allocation at the run's peak sparsity on the model's shapes, so that a setting this model
    cannot meet (a cap on its LM head's sparsity) fails now, naming the flag to change, not after the data is
    loaded."""
    peak = max(mst_config.initial_sparsity, mst_config.ultra_sparsity, mst_config.final_sparsity)
    try:
        layer_sparsities(shapes_model, mst_config, peak)
    except ValueError as err:
        flag = next((f"--mst_{k}" for k in mst_config.mst_dict() if f"`{k}`" in str(err)), "--mst_*")
        raise ValueError(f"{flag}: {err}") from err


# ---------------------------------------------------------------------------------------------------------- metrics
def preprocess_logits_for_metrics(logits, labels):
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(dim=-1)  # (B, T): keep only the predicted ids, not the (B, T, vocab) logits


def make_compute_metrics(training_args):
    with training_args.main_process_first(desc="loading the token_accuracy metric"):
        metric = evaluate.load(TOKEN_ACCURACY_PATH)  # MST: the metric shipped with mst_hf (offline), not "accuracy"

    def compute_metrics(eval_preds):
        preds, labels = eval_preds
        # The prediction at position t is for the token at t + 1.
        return metric.compute(predictions=preds[:, :-1].reshape(-1), references=labels[:, 1:].reshape(-1))

    return compute_metrics


# ---------------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    start = psutil.Process().create_time()  # MST: the summary's wall time includes the imports
    model_args, data_args, training_args, mst_args = parse_arguments(argv)

    # The main process logs at info level unless --log_level says otherwise; the other processes at warning.
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)])
    if training_args.should_log:
        transformers.utils.logging.set_verbosity_info()
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    logger.warning(
        f"Process rank {training_args.process_index} of {training_args.world_size}, device {training_args.device}"
    )
    logger.info(f"Training arguments: {training_args}")
    if training_args.do_train and training_args.max_steps <= 0:  # MST
        raise ValueError(
            f"MST needs the number of optimizer steps up front for its schedule: pass `--max_steps N` (got "
            f"{training_args.max_steps}; `--num_train_epochs` alone is not enough)."
        )
    # MST: check the MST arguments before any data is loaded.
    to_mst_config(mst_args, training_args.max_steps, data_args.block_size or DEFAULT_BLOCK_SIZE)

    # Training into an output_dir that holds checkpoints continues from the newest one, unless
    # --resume_from_checkpoint names another.
    last_checkpoint = None
    if training_args.do_train and training_args.resume_from_checkpoint is None and os.path.isdir(
        training_args.output_dir
    ):
        last_checkpoint = get_last_checkpoint(training_args.output_dir)
        if last_checkpoint is not None:
            logger.warning(f"{training_args.output_dir} holds checkpoints: training resumes from {last_checkpoint}. "
                           "To start afresh, pass another `--output_dir` or empty this one.")

    set_seed(training_args.seed)
    tokenizer = load_tokenizer(model_args)  # MST: tokenizer and config before the data (for the check below)
    if data_args.block_size is None and uses_embedded_model(model_args):  # MST: the embedded default run
        data_args.block_size = DEFAULT_BLOCK_SIZE
    config = load_config(model_args, data_args.block_size)
    block_size = resolve_block_size(data_args, tokenizer, config)
    with torch.device("meta"):  # MST: the model's shapes, for the default preset's LM-head cap (no weights built)
        shapes_model = AutoModelForCausalLM.from_config(config, trust_remote_code=model_args.trust_remote_code)
    mst_config = to_mst_config(mst_args, training_args.max_steps, block_size, model=shapes_model)  # MST
    check_mst_fits_model(mst_config, shapes_model)  # MST: before any data is loaded
    if not training_args.do_train:  # MST: evaluation only: never prune the given model's weights
        mst_config.initial_sparsity = 0.0
    logger.info(f"MST config: {json.dumps(mst_config.mst_dict(), sort_keys=True)}")  # MST
    raw_datasets = load_raw_datasets(data_args, model_args)
    train_dataset, eval_dataset = tokenize_and_group(raw_datasets, tokenizer, data_args, block_size, training_args)

    dense_config = copy.deepcopy(config)  # MST: the dense baseline's, untouched by MSTTrainer's HSA settings
    set_seed(training_args.seed)  # MST: the dense baseline starts from the same initial weights
    model = build_model(model_args, config, tokenizer)
    trainer = MSTTrainer(  # MST: MSTTrainer instead of Trainer
        model=model,
        args=training_args,
        mst_config=mst_config,  # MST
        train_dataset=train_dataset if training_args.do_train else None,
        eval_dataset=eval_dataset if training_args.do_eval else None,
        processing_class=tokenizer,
        data_collator=default_data_collator,
        compute_metrics=make_compute_metrics(training_args) if training_args.do_eval else None,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics if training_args.do_eval else None,
    )
    trace = reporting.RunTrace(trainer.mst)  # MST: the per-step schedule, for trace.json and schedule.png
    trainer.add_callback(trace)  # MST
    if mst_args.mst_mask_digest_file is not None:  # MST
        trainer.add_callback(reporting.MaskDigestCallback(
            trainer.mst, mst_args.mst_mask_digest_file, training_args.process_index))

    summary = {"untrained_perplexity": None}  # MST
    train_seconds = None  # MST
    if training_args.do_train:
        checkpoint = training_args.resume_from_checkpoint or last_checkpoint
        if training_args.do_eval and checkpoint is None:  # MST: the untrained model's loss, for the summary
            # Through `predict`, which logs nothing: a log before `train` would open the TensorBoard writer in the
            # working directory instead of output_dir.
            untrained = trainer.predict(eval_dataset, metric_key_prefix="eval_untrained").metrics
            summary["untrained_perplexity"] = reporting.perplexity(untrained["eval_untrained_loss"])
        t0 = time.time()  # MST
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        train_seconds = time.time() - t0  # MST
        trainer.save_model()  # weights, tokenizer and (MSTTrainer) the MST files
        metrics = train_result.metrics
        metrics["train_samples"] = len(train_dataset)
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
        summary["resumed_from"] = checkpoint  # MST

    eval_metrics = None
    if training_args.do_eval:
        eval_metrics = trainer.evaluate()
        eval_metrics["eval_samples"] = len(eval_dataset)
        eval_metrics["perplexity"] = reporting.perplexity(eval_metrics["eval_loss"])
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)

    if training_args.do_train:  # MST: the summary, the trace and its plot, and the dense baseline
        summary.update(
            model=f"{config.model_type} ({model_args.model_name_or_path or 'from scratch'})",
            parameters=model.num_parameters(),
            data="embedded Moby-Dick" if uses_embedded_data(data_args) else (
                data_args.dataset_name or data_args.train_file),
            train_blocks=len(train_dataset), eval_blocks=len(eval_dataset), block_size=block_size,
            max_steps=training_args.max_steps, world_size=training_args.world_size,  # MST: the config the run used
            mst_config=trainer.mst.config.mst_dict(), hsa=trainer.mst.config.hsa_pattern != "dense",
            mst=reporting.mst_summary(trainer, block_size, eval_metrics, train_seconds),
        )
        summary["tokens_per_step"] = summary["mst"]["tokens_per_step"]
        if training_args.should_save:
            reporting.write_trace(trace, training_args.output_dir, training_args.max_steps, title=(
                f"MST run: counted FLOP reduction {summary['mst']['counted_flop_reduction']:.2f}x"))
        if mst_args.compare_dense:
            summary["dense"] = reporting.train_dense_baseline(
                lambda: build_model(model_args, dense_config, tokenizer), training_args,
                dense_total_flops=summary["mst"]["dense_total_flops"], lr_config=mst_config,  # same LR schedule
                train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=tokenizer,
                data_collator=default_data_collator,
                compute_metrics=make_compute_metrics(training_args) if training_args.do_eval else None,
                preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            )
        summary["wall_seconds"] = time.time() - start
        if training_args.should_save:
            print(reporting.write_summary(training_args.output_dir, summary))

    kwargs = {"finetuned_from": model_args.model_name_or_path, "tasks": "text-generation"}
    if data_args.dataset_name is not None:
        kwargs["dataset_tags"] = data_args.dataset_name
        if data_args.dataset_config_name is not None:
            kwargs["dataset_args"] = data_args.dataset_config_name
            kwargs["dataset"] = f"{data_args.dataset_name} {data_args.dataset_config_name}"
        else:
            kwargs["dataset"] = data_args.dataset_name
    elif uses_embedded_data(data_args):  # MST
        kwargs["dataset"] = "Moby-Dick (Project Gutenberg text shipped with mst_hf)"
    if training_args.do_train:  # MST: a card describes a trained model (MSTTrainer adds the MST section and tags)
        if training_args.push_to_hub:
            trainer.push_to_hub(**kwargs)
        else:
            trainer.create_model_card(**kwargs)
    return summary


if __name__ == "__main__":
    main()
