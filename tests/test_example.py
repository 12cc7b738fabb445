"""examples/run_clm_mst.py end to end (a tiny offline run in a subprocess, a resume of it in another, evaluation
only and a push in this process), its generated MST arguments, and the data and metric shipped with the package."""

import dataclasses
import importlib.util
import json
import math
import os
import re
import subprocess
import sys

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402

import mst_hf  # noqa: E402
from mst_hf import MSTConfig  # noqa: E402
from mst_hf.arguments import config_fields, to_mst_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "run_clm_mst.py")

# A handful of steps on a 2-layer, 32-wide GPT-2 with 32-token blocks: seconds, not minutes. The run ends at 50%
# sparsity so that the saved masks and weights say something.
TINY_RUN = [
    "--max_steps", "12", "--block_size", "32", "--max_train_samples", "96", "--max_eval_samples", "8",
    "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8", "--eval_steps", "6",
    "--logging_steps", "2", "--config_overrides", "n_layer=2,n_embd=32,n_head=2",
    "--mst_update_interval", "2", "--mst_final_sparsity", "0.5", "--report_to", "none",
]
SAVE_STEP = 6  # the tiny run saves checkpoint-6 and checkpoint-12; the resume test restarts from checkpoint-6


def offline_env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def load_example():
    spec = importlib.util.spec_from_file_location("run_clm_mst", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example():
    return load_example()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Output folder of one tiny run of the example (a subprocess, offline)."""
    out = tmp_path_factory.mktemp("run_clm_mst")
    run_example(["--output_dir", str(out), *TINY_RUN, "--save_strategy", "steps", "--save_steps", str(SAVE_STEP)])
    return out


@pytest.fixture(scope="module")
def resumed_run(tiny_run, tmp_path_factory):
    """Output folder of the tiny run restarted, in a new process, from its checkpoint at SAVE_STEP."""
    out = tmp_path_factory.mktemp("run_clm_mst_resumed")
    checkpoint = os.path.join(tiny_run, f"checkpoint-{SAVE_STEP}")
    run_example(["--output_dir", str(out), *TINY_RUN, "--resume_from_checkpoint", checkpoint])
    return out


def run_example(args: list[str]) -> None:
    cmd = [sys.executable, EXAMPLE, *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=offline_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def run_in_process(example, args: list[str]) -> dict:
    """``main(args)`` in this process (no interpreter start-up), restoring transformers' log level afterwards."""
    import transformers

    verbosity = transformers.utils.logging.get_verbosity()
    try:
        return example.main(args)
    finally:
        transformers.utils.logging.set_verbosity(verbosity)


def read_json(*path) -> dict:
    with open(os.path.join(*path), encoding="utf-8") as f:
        return json.load(f)


def read_summary(out) -> dict:
    with open(os.path.join(out, "summary.json"), encoding="utf-8") as f:
        return json.load(f)


# ------------------------------------------------------------------------------------------ the shipped data
def test_embedded_tokenizer_encodes_like_gpt2():
    from mst_hf.embedded import embedded_tokenizer

    tokenizer = embedded_tokenizer()
    assert (tokenizer("Hello world").input_ids, tokenizer.convert_tokens_to_ids("<|endoftext|>"),
            tokenizer.pad_token_id) == ([15496, 995], 50256, 50256)


def test_embedded_validation_split_is_the_end_of_the_book():
    from mst_hf.embedded import embedded_corpus_path, load_embedded_dataset

    splits = load_embedded_dataset(validation_fraction=0.05)
    with open(embedded_corpus_path(), encoding="utf-8") as f:
        text = f.read()
    train, validation = "".join(splits["train"]["text"]), "".join(splits["validation"]["text"])
    assert text.startswith(train) and text.endswith(validation) and 0.04 < len(validation) / len(text) < 0.06


@pytest.mark.slow
def test_embedded_lm_dataset_is_blocks_with_labels():
    from mst_hf.embedded import load_embedded_lm_dataset

    data = load_embedded_lm_dataset(block_size=256)
    rows = data["validation"][:3]
    assert {len(ids) for ids in data["train"][:50]["input_ids"]} == {256} and rows["labels"] == rows["input_ids"]


def test_embedded_split_rejects_a_bad_fraction():
    from mst_hf.embedded import load_embedded_dataset

    with pytest.raises(ValueError, match="validation_fraction"):
        load_embedded_dataset(validation_fraction=5)


def test_token_accuracy_metric_loads_offline_from_the_installed_package():
    import evaluate

    path = os.path.join(os.path.dirname(mst_hf.__file__), "metrics", "token_accuracy")
    metric = evaluate.load(path)
    # 2 of the 3 counted positions agree; -100 (padding) is not counted.
    assert metric.compute(predictions=[3, 5, 7, 9], references=[3, 5, 0, -100]) == {"accuracy": pytest.approx(2 / 3)}


def test_compute_metrics_shifts_predictions_against_labels(example):
    import numpy as np

    training_args = example.TrainingArguments(output_dir="unused", report_to="none")
    compute_metrics = example.make_compute_metrics(training_args)
    labels = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    preds = np.array([[2, 3, 0, 9], [6, 7, 8, 9]])  # predicts the next label, except one position
    assert compute_metrics((preds, labels)) == {"accuracy": pytest.approx(5 / 6)}


# ------------------------------------------------------------------------------------------ arguments
def test_argument_names_do_not_clash(example):
    groups = [example.ModelArguments, example.DataTrainingArguments, example.TrainingArguments, example.MSTArguments]
    names = [{f.name for f in dataclasses.fields(g)} for g in groups]
    clashes = {(groups[i].__name__, groups[j].__name__): names[i] & names[j]
               for i in range(len(groups)) for j in range(i + 1, len(groups)) if names[i] & names[j]}
    assert clashes == {}


def test_every_mst_config_field_has_an_argument(example):
    fields = set(mst_hf.MSTConfig().mst_dict()) - {"model_type"}
    arguments = {f.name for f in dataclasses.fields(example.MSTArguments)}
    assert sorted(name for name in fields if f"mst_{name}" not in arguments) == []


def test_mst_flags_are_generated_from_the_config_fields_with_their_help(example):
    """Every MSTConfig field declares help text, and its flag's help starts with it (nothing copied by hand)."""
    flags = {f.name: f for f in dataclasses.fields(example.MSTArguments)}
    declared = {f.name: f.metadata.get("help", "") for f in config_fields()}
    assert set(declared) == set(mst_hf.MSTConfig().mst_dict()) - {"model_type"}
    bad = sorted(name for name, text in declared.items()
                 if not text or not flags[f"mst_{name}"].metadata["help"].startswith(text))
    assert bad == []


def test_a_field_without_a_text_rule_takes_json():
    import dataclasses as dc

    from mst_hf.arguments import text_parser

    field = dc.field(default=None)
    field.name, field.type = "some_future_list", list | None
    assert text_parser(field)('["warmup", "ultra"]') == ["warmup", "ultra"]
    with pytest.raises(ValueError, match="--mst_some_future_list"):
        text_parser(field)("warmup,ultra")


def test_help_lists_the_mst_flags_first(example, capsys):
    with pytest.raises(SystemExit) as stop:
        example.parse_arguments(["--help"])
    text = capsys.readouterr().out
    order = [text.find(f"\n  {flag} ") for flag in ("--mst_preset", "--mst_ultra_sparsity", "--compare_dense",
                                                     "--model_name_or_path", "--dataset_name", "--output_dir")]
    missing = [f"--mst_{f.name}" for f in config_fields() if f"--mst_{f.name} " not in text]
    assert (stop.value.code, missing, min(order) >= 0, order == sorted(order)) == (0, [], True, True)


def test_a_single_json_argument_is_a_config_file(example, tmp_path):
    path = tmp_path / "args.json"
    path.write_text(json.dumps({"max_steps": 7, "block_size": 16, "mst_ultra_sparsity": 0.8, "compare_dense": True}))
    model_args, data_args, training_args, mst_args = example.parse_arguments([str(path)])
    got = (training_args.max_steps, data_args.block_size, mst_args.mst_ultra_sparsity, mst_args.compare_dense,
           training_args.output_dir)
    assert got == (7, 16, 0.8, True, example.EXAMPLE_DEFAULTS["output_dir"])


def test_neither_do_train_nor_do_eval_means_both_and_one_means_only_that_one(example):
    default, only_eval = example.parse_arguments([]), example.parse_arguments(["--do_eval"])
    flags = [(t.do_train, t.do_eval) for t in (default[2], only_eval[2])]
    assert flags == [(True, True), (False, True)]


def test_bad_mst_argument_names_the_flag(example):
    with pytest.raises(ValueError, match="--mst_ultra_sparsity"):
        to_mst_config(example.MSTArguments(mst_ultra_sparsity=1.5), max_steps=100, block_size=128)


def test_an_optional_number_flag_can_unset_a_presets_value(example):
    """`--mst_lm_head_max_sparsity none` removes a named preset's cap (a float flag could not say None)."""
    def config(*flags):
        mst_args = example.parse_arguments(["--mst_preset", "mst-3phase", *flags])[3]
        return to_mst_config(mst_args, max_steps=100, block_size=128)

    assert config().lm_head_max_sparsity == 0.8
    assert config("--mst_lm_head_max_sparsity", "None").lm_head_max_sparsity is None
    assert config("--mst_lm_head_max_sparsity", "0.9").lm_head_max_sparsity == 0.9
    assert config("--mst_lr_decay_start", "0.5").lr_decay_start == 0.5
    with pytest.raises(ValueError, match="--mst_lm_head_max_sparsity.*float or `none`"):
        config("--mst_lm_head_max_sparsity", "high")


def test_null_in_a_json_arguments_file_means_none_as_on_the_command_line(example, tmp_path):
    """A preset's head cap and learning-rate schedule are removed by `null` in an args.json as by `none` on the
    command line; a flag left out of the file keeps the preset's value."""
    path = tmp_path / "args.json"
    path.write_text(json.dumps({"mst_preset": "mst-3phase", "mst_lm_head_max_sparsity": None,
                                "mst_lr_schedule": None}))
    config = to_mst_config(example.parse_arguments([str(path)])[3], max_steps=100, block_size=128)
    flags = ["--mst_preset", "mst-3phase", "--mst_lm_head_max_sparsity", "none", "--mst_lr_schedule", "none"]
    cli = to_mst_config(example.parse_arguments(flags)[3], max_steps=100, block_size=128)
    assert (config.lm_head_max_sparsity, config.lr_schedule, config.lr_floor) == (None, None, 0.1)
    assert config.mst_dict() == cli.mst_dict()


def test_none_on_a_list_flag_means_the_model_type_default(example):
    flags = ["--mst_target_modules", "none", "--mst_exclude_modules", "NULL"]
    config = to_mst_config(example.parse_arguments(flags)[3], max_steps=100, block_size=128)
    assert (config.target_modules, config.exclude_modules) == (None, None)


def test_a_grow_method_phase_without_a_method_is_a_named_error(example):
    mst_args = example.parse_arguments(["--mst_grow_method", "warmup=gradient,ultra"])[3]
    with pytest.raises(ValueError, match=r"`--mst_grow_method` takes one method.*'ultra' has no `=method`"):
        to_mst_config(mst_args, max_steps=100, block_size=128)


def test_mst_config_scales_to_short_runs(example):
    config = to_mst_config(example.MSTArguments(), max_steps=250, block_size=128)
    assert (config.update_interval, config.hsa_window, config.hsa_stride, config.hsa_block) == (10, 16, 16, 16)


def test_no_preset_named_means_the_default_preset(example):
    """Without --mst_preset the example trains the study's best recipe (WSD learning rate, capped LM head, gradient
    growth), not the bare MSTConfig defaults (the paper's); --mst_preset mst-paper gives those."""
    default = to_mst_config(example.MSTArguments(), max_steps=250, block_size=128)
    assert (default.lr_schedule, default.lm_head_max_sparsity, default.grow_method) == ("wsd", 0.8, "gradient")
    paper = to_mst_config(example.MSTArguments(mst_preset="mst-paper"), max_steps=250, block_size=128)
    assert (paper.lr_schedule, paper.lm_head_max_sparsity) == (None, None)
    assert paper.grow_method == MSTConfig().grow_method


def test_default_preset_drops_a_head_cap_the_model_cannot_meet(example, caplog):
    """A GPT-2 whose 50k-token head holds most of the weights cannot keep the head at <= 80% sparsity at 90% overall:
    with no preset named the cap is dropped with a warning; a cap the user asked for is kept (and fails later). At the
    default preset's own 80% the cap is always feasible (every layer at 80%) and stays."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config

    with torch.device("meta"):
        small = AutoModelForCausalLM.from_config(GPT2Config(n_layer=2, n_embd=64, n_head=2))
        big = AutoModelForCausalLM.from_config(GPT2Config(n_layer=12, n_embd=768, n_head=12))
    import logging

    at_90 = dict(mst_initial_sparsity=0.9, mst_ultra_sparsity=0.9, mst_final_sparsity=0.9)
    default = to_mst_config(example.MSTArguments(), max_steps=100, block_size=128, model=small)
    assert default.lm_head_max_sparsity == 0.8
    assert "training without the cap" not in caplog.text
    with caplog.at_level(logging.WARNING):
        dropped = to_mst_config(example.MSTArguments(**at_90), max_steps=100, block_size=128, model=small)
    assert dropped.lm_head_max_sparsity is None and "training without the cap" in caplog.text
    kept = to_mst_config(example.MSTArguments(**at_90), max_steps=100, block_size=128, model=big)
    assert kept.lm_head_max_sparsity == 0.8  # GPT-2 124M: the head is 31% of the weights, the cap fits
    named = to_mst_config(example.MSTArguments(mst_preset="mst-recommended", **at_90), max_steps=100, block_size=128,
                          model=small)
    assert named.lm_head_max_sparsity == 0.8


def test_run_scaling_applies_to_a_preset_and_flags_win(example):
    """A preset's update interval and HSA sizes are written for long runs at 1024 tokens: a short run scales them
    (mst-paper on 200 steps of 128 tokens would otherwise update twice and run a pattern that is dense there)."""
    scaled = to_mst_config(example.MSTArguments(mst_preset="mst-paper"), max_steps=200, block_size=128)
    assert (scaled.update_interval, scaled.hsa_window, scaled.hsa_stride) == (8, 16, 16)
    flagged = to_mst_config(example.MSTArguments(mst_preset="mst-paper", mst_update_interval=50, mst_hsa_window=32),
                            max_steps=200, block_size=128)
    assert (flagged.update_interval, flagged.hsa_window, flagged.hsa_stride) == (50, 32, 16)


def test_help_shows_the_values_of_the_default_preset(example, capsys):
    """An unset flag takes the default preset's value (mst-recommended: constant 80%, WSD), and --help says so, not
    the bare MSTConfig() defaults (the paper's 0.0 / None)."""
    with pytest.raises(SystemExit):
        example.parse_arguments(["--help"])
    text = " ".join(re.sub(r"-\s+", "-", capsys.readouterr().out).split())  # argparse wraps after hyphens
    for expected in ("(0.0: start dense). Default (preset mst-recommended): 0.8.",
                     "(0.0: end dense). Default (preset mst-recommended): 0.8.",
                     "(None: Trainer's). Default (preset mst-recommended): wsd (`none`: None)."):
        assert expected in text


def test_default_run_replaces_no_learning_rate_setting(example, tmp_path, caplog):
    """The default preset's `lr_schedule` (WSD) decides the learning rate; the script's own defaults set no other
    scheduler for it to replace, so a default run warns about none."""
    import logging

    from mst_hf import MSTTrainer

    from .helpers import tiny_gpt2, toy_dataset

    _, _, training_args, mst_args = example.parse_arguments(["--output_dir", str(tmp_path), "--use_cpu"])
    trainer = MSTTrainer(tiny_gpt2(), training_args, mst_config=to_mst_config(mst_args, training_args.max_steps, 32),
                         train_dataset=toy_dataset(), eval_dataset=toy_dataset(8))
    with caplog.at_level(logging.WARNING):
        trainer.create_optimizer_and_scheduler(training_args.max_steps)
    assert trainer.mst_config.lr_schedule == "wsd" and "replaces lr_scheduler_type" not in caplog.text


def test_a_preset_the_model_cannot_meet_fails_before_the_data_naming_the_flag(example, monkeypatch, tmp_path):
    """mst-3phase caps the head at 80% sparsity at 90% overall: the default run's model (its head 89% of the weights)
    cannot meet it. The script says so naming the flag, before it loads (and tokenizes) any data."""
    def no_data(*args, **kwargs):
        raise AssertionError("the data was loaded before the MST settings were checked against the model")

    monkeypatch.setattr(example, "load_raw_datasets", no_data)
    with pytest.raises(ValueError, match=r"^--mst_lm_head_max_sparsity: .*`lm_head_max_sparsity`"):
        run_in_process(example, ["--mst_preset", "mst-3phase", "--output_dir", str(tmp_path)])


def test_explicit_mst_arguments_override_the_preset(example):
    args = example.MSTArguments(mst_preset="gpt2-4x", mst_ultra_sparsity=0.8, mst_grow_method="random",
                                mst_hsa_layers="0,2")
    config = to_mst_config(args, max_steps=1000, block_size=1024)
    assert (config.ultra_sparsity, config.grow_method, config.hsa_layers, config.hsa_window) == (0.8, "random", [0, 2],
                                                                                               128)


# ------------------------------------------------------------------------------------------ a tiny run
@pytest.mark.slow
def test_run_writes_summary_plot_and_model(tiny_run):
    names = ("summary.json", "summary.md", "schedule.png", "trace.json", "model.safetensors", "config.json",
             "mst_masks.safetensors", "mst_config.json", "tokenizer.json")
    assert [n for n in names if not os.path.isfile(os.path.join(tiny_run, n))] == []


@pytest.mark.slow
def test_run_reports_finite_perplexities_and_counted_flops(tiny_run):
    summary = read_summary(tiny_run)
    mst = summary["mst"]
    values = [summary["untrained_perplexity"], mst["perplexity"], mst["counted_flop_reduction"], mst["token_accuracy"]]
    assert all(math.isfinite(v) for v in values) and mst["counted_flop_reduction"] > 1.0


@pytest.mark.slow
def test_run_counted_flops_match_the_plan(tiny_run):
    mst = read_summary(tiny_run)["mst"]
    assert mst["counted_flop_reduction"] == pytest.approx(mst["planned_flop_reduction"], rel=1e-9)


@pytest.mark.slow
def test_run_trace_matches_the_plan_step_by_step(tiny_run):
    """The per-step trace the example records (trace.json, drawn in schedule.png) is what `plan_run` predicts."""
    import numpy as np

    from mst_hf.plan import load_mst_config, plan_run

    summary = read_summary(tiny_run)
    plan = plan_run(os.path.join(tiny_run, "config.json"), load_mst_config(str(tiny_run)), summary["max_steps"],
                    summary["tokens_per_step"], summary["block_size"]).trace()
    with open(os.path.join(tiny_run, "trace.json"), encoding="utf-8") as f:
        trace = json.load(f)
    keys = ("step", "target_sparsity", "sparsity", "attention_density", "mst_cumulative_flops",
            "dense_cumulative_flops")
    assert {k: bool(np.allclose(trace[k], plan[k], rtol=1e-12, atol=1e-12)) for k in keys} == dict.fromkeys(keys, True)


@pytest.mark.slow
def test_run_logs_mst_metrics(tiny_run):
    with open(os.path.join(tiny_run, "all_results.json"), encoding="utf-8") as f:
        results = json.load(f)
    keys = ("mst/total_flops", "mst/dense_total_flops", "mst/flop_reduction", "mst/step_flops", "perplexity")
    assert [k for k in keys if k not in results] == []


@pytest.mark.slow
def test_run_summary_sparsity_is_the_saved_masks_sparsity(tiny_run):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_run)
    masks = mst_hf.load_masks(model, str(tiny_run), apply=False)
    summary = read_summary(tiny_run)
    assert summary["mst"]["final_sparsity"] == pytest.approx(masks.sparsity(), abs=1e-12) and masks.sparsity() > 0.4


@pytest.mark.slow
def test_run_saved_weights_are_zero_where_pruned(tiny_run):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_run)
    masks = mst_hf.load_masks(model, str(tiny_run), apply=False)
    params = dict(model.named_parameters())
    nonzero_pruned = {name: int((params[name].detach()[~mask] != 0).sum()) for name, mask in masks.masks.items()}
    assert sum(nonzero_pruned.values()) == 0


@pytest.mark.slow
def test_run_writes_a_model_card_with_the_mst_tags(tiny_run):
    from huggingface_hub import ModelCard

    card = ModelCard.load(os.path.join(tiny_run, "README.md"))
    assert {"mst", "sparse"} <= set(card.data.tags or [])


# ------------------------------------------------------------------------------------------ resume, eval, push
@pytest.mark.slow
def test_resume_continues_the_global_step(resumed_run):
    trace = read_json(resumed_run, "trace.json")
    state = read_json(resumed_run, "trainer_state.json")
    assert (trace["step"], state["global_step"]) == (list(range(SAVE_STEP, 12)), 12)


@pytest.mark.slow
def test_resume_ends_with_the_masks_and_weights_of_the_uninterrupted_run(tiny_run, resumed_run):
    from safetensors.torch import load_file

    def unequal(name):
        a, b = load_file(os.path.join(tiny_run, name)), load_file(os.path.join(resumed_run, name))
        return sorted(set(a) ^ set(b)) + sorted(k for k in a if k in b and not bool((a[k] == b[k]).all()))

    assert (unequal("mst_masks.safetensors"), unequal("model.safetensors")) == ([], [])


@pytest.mark.slow
def test_resumed_run_counts_the_flops_of_the_whole_run(tiny_run, resumed_run):
    full, resumed = read_summary(tiny_run)["mst"], read_summary(resumed_run)["mst"]
    assert resumed["total_flops"] == full["total_flops"] and resumed["counted_flop_reduction"] == pytest.approx(
        resumed["planned_flop_reduction"], rel=1e-9)


@pytest.mark.slow
def test_do_eval_alone_evaluates_the_given_model(example, tiny_run, tmp_path):
    """Evaluation only, of the tiny run's model, reproduces that run's final perplexity; nothing is trained or saved
    (an initial sparsity asked for must not prune the model it evaluates)."""
    out = tmp_path / "eval_only"
    run_in_process(example, [
        "--do_eval", "--model_name_or_path", str(tiny_run), "--output_dir", str(out), "--block_size", "32",
        "--max_eval_samples", "8", "--per_device_eval_batch_size", "8", "--report_to", "none",
        "--mst_initial_sparsity", "0.5",
    ])
    evaluated = read_json(out, "eval_results.json")
    trained = [n for n in ("train_results.json", "model.safetensors", "summary.json") if os.path.exists(out / n)]
    assert trained == [] and evaluated["perplexity"] == pytest.approx(read_summary(tiny_run)["mst"]["perplexity"],
                                                                      rel=1e-6)


@pytest.mark.slow
def test_continuing_from_a_saved_model_starts_from_its_masks(example, tiny_run, tmp_path):
    """Training the tiny run's model further (the default preset asks for 80% sparsity from step 0) starts from its
    saved masks: the model evaluated before training is the saved one, so its perplexity is the one the tiny run
    ended with (random masks drawn at 80% would prune the trained weights)."""
    summary = run_in_process(example, [
        "--model_name_or_path", str(tiny_run), "--output_dir", str(tmp_path / "continued"), "--block_size", "32",
        "--max_steps", "2", "--max_train_samples", "16", "--max_eval_samples", "8", "--per_device_eval_batch_size",
        "8", "--per_device_train_batch_size", "4", "--eval_strategy", "no", "--report_to", "none",
    ])
    assert summary["untrained_perplexity"] == pytest.approx(read_summary(tiny_run)["mst"]["perplexity"], rel=1e-6)


@pytest.mark.slow
def test_push_to_hub_uploads_model_masks_and_card(example, tmp_path, monkeypatch):
    """--push_to_hub goes through MSTTrainer's push (Hub calls replaced by a recorder: no network)."""
    from types import SimpleNamespace

    from huggingface_hub import HfApi, ModelCard

    uploads = []

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        card = ModelCard.load(os.path.join(folder_path, "README.md"))
        uploads.append((repo_id, sorted(os.listdir(folder_path)), set(card.data.tags or [])))
        return SimpleNamespace(is_done=lambda: True)

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: SimpleNamespace(repo_id=repo_id))
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    out = tmp_path / "pushed"
    tiny = [a for a in TINY_RUN]
    tiny[tiny.index("--max_steps") + 1] = "4"
    run_in_process(example, ["--output_dir", str(out), *tiny, "--do_train", "--push_to_hub",
                             "--hub_model_id", "someone/tiny-mst"])
    repo, files, tags = uploads[-1]
    needed = {"model.safetensors", "mst_masks.safetensors", "mst_config.json", "README.md"}
    assert (repo, sorted(needed - set(files)), {"mst", "sparse"} <= tags) == ("someone/tiny-mst", [], True)
