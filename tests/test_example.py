"""examples/run_clm_mst.py end to end (a tiny offline run in a subprocess), its arguments, and the data and metric
shipped with the package."""

import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402

import mst_hf  # noqa: E402

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
    cmd = [sys.executable, EXAMPLE, "--output_dir", str(out), *TINY_RUN]
    proc = subprocess.run(cmd, cwd=ROOT, env=offline_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out


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


def test_a_single_json_argument_is_a_config_file(example, tmp_path):
    path = tmp_path / "args.json"
    path.write_text(json.dumps({"max_steps": 7, "block_size": 16, "mst_ultra_sparsity": 0.8, "compare_dense": True}))
    model_args, data_args, training_args, mst_args = example.parse_arguments([str(path)])
    got = (training_args.max_steps, data_args.block_size, mst_args.mst_ultra_sparsity, mst_args.compare_dense,
           training_args.output_dir)
    assert got == (7, 16, 0.8, True, example.EXAMPLE_DEFAULTS["output_dir"])


def test_bad_mst_argument_names_the_flag(example):
    with pytest.raises(ValueError, match="--mst_ultra_sparsity"):
        example.build_mst_config(example.MSTArguments(mst_ultra_sparsity=1.5), max_steps=100, block_size=128)


def test_mst_config_scales_to_short_runs(example):
    config = example.build_mst_config(example.MSTArguments(), max_steps=250, block_size=128)
    assert (config.update_interval, config.hsa_window, config.hsa_stride, config.hsa_block) == (10, 16, 16, 16)


def test_explicit_mst_arguments_override_the_preset(example):
    args = example.MSTArguments(mst_preset="gpt2-4x", mst_ultra_sparsity=0.8, mst_grow_method="random",
                                mst_hsa_layers="0,2")
    config = example.build_mst_config(args, max_steps=1000, block_size=1024)
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
