"""The run planner: its integral equals a real MSTTrainer run's logged total and a step-by-step count, the
vectorised schedule equals `mst_hf.schedule`, the CLI shows the gpt2-4x preset's >= 4x reduction, and plots."""

import json
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from mst_hf import MSTConfig, MSTTrainer, schedule  # noqa: E402
from mst_hf.flops import dense_token_flops, model_flop_shapes, step_flops  # noqa: E402
from mst_hf.plan import fast_update_steps, load_mst_config, main, plan_run, target_sparsity_array  # noqa: E402
from mst_hf.plotting import plot_schedule  # noqa: E402
from mst_hf.topology import allocate  # noqa: E402

from .helpers import tiny_gpt2, toy_dataset  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", autouse=True)
def cli_run(tmp_path_factory):
    """`python -m mst_hf.plan --preset gpt2-4x`, started in the background before the module's first test (it
    spends its time importing transformers, so it overlaps the other tests); the CLI tests at the end wait for it."""
    png = tmp_path_factory.mktemp("plan") / "plan.png"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mst_hf.plan", "--preset", "gpt2-4x", "--plot", str(png)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    result = {}

    def wait():
        if not result:
            out, err = proc.communicate(timeout=300)
            result.update(returncode=proc.returncode, stdout=out, stderr=err, png=png)
        return result

    yield wait
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


# --------------------------------------------------------------------------- plan == a real run


def hsa_pattern_for_tests() -> str:
    """A sparse pattern when the attention module imports (the count follows the schedule either way)."""
    try:
        import mst_hf.attention  # noqa: F401
    except Exception:  # noqa: BLE001 - attention is another module's work in progress
        return "dense"
    return "local"


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine: intra-op threads only contend (a 1 s run takes a minute with 2)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_plan_equals_trainer_total(tmp_path, one_thread):
    from transformers import TrainingArguments

    cfg = MSTConfig(initial_sparsity=0.0, ultra_sparsity=0.8, final_sparsity=0.0, warmup_ratio=0.2,
                    restoration_ratio=0.3, update_interval=4, hsa_pattern=hsa_pattern_for_tests(), hsa_window=4)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=20, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=1e-3, logging_steps=10, save_strategy="no", report_to="none", use_cpu=True, seed=0,
        disable_tqdm=True,
    )
    model = tiny_gpt2()
    trainer = MSTTrainer(model=model, args=args, mst_config=cfg, train_dataset=toy_dataset(64, seq_len=16))
    metrics = trainer.train().metrics
    plan = plan_run(model, cfg, total_steps=20, tokens_per_step=2 * 2 * 16, seq_len=16)
    logged = [log["mst/total_flops"] for log in trainer.state.log_history if "mst/total_flops" in log]
    assert (metrics["mst/total_flops"], metrics["mst/dense_total_flops"], logged[-1]) == (
        plan.mst_total_flops, plan.dense_total_flops, plan.mst_total_flops)


# --------------------------------------------------------------------------- plan == a step-by-step count

CONFIGS = {
    "spec-default": dict(update_interval=7),
    "cosine-alternate-hsa": dict(warmup_curve="cosine", restoration_curve="linear", update_interval=10,
                                 hsa_pattern="local_strided", hsa_window=8, hsa_stride=4, hsa_layers="alternate",
                                 hsa_phases=["ultra", "restoration"], initial_sparsity=0.3, final_sparsity=0.1),
    "uniform-fixed": dict(sparsity_distribution="uniform", hsa_pattern="fixed", hsa_block=8, update_interval=3,
                          warmup_ratio=0.0, restoration_ratio=0.5),
}


def step_by_step(model, cfg, steps, tokens, seq_len):
    """The controller's semantics, one step at a time: masks set at the last update before the step."""
    fm = model_flop_shapes(model, cfg)
    names = list(dict.fromkeys(m.name for m in fm.targets))
    shapes = [(m.n_in, m.n_out) for m in {m.name: m for m in fm.targets}.values()]
    densities = dict(zip(names, allocate(shapes, cfg.initial_sparsity, cfg.sparsity_distribution)))
    per_step = []
    for t in range(steps):
        update = schedule.is_update_step(t, steps, cfg)
        hsa = schedule.hsa_active(t, steps, cfg)
        per_step.append(step_flops(fm, densities, tokens, seq_len, hsa_on=hsa, update_step=update))
        if update:
            s = schedule.target_sparsity(t, steps, cfg)
            densities = dict(zip(names, allocate(shapes, s, cfg.sparsity_distribution)))
    return per_step


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_plan_equals_step_by_step_sum(name):
    cfg = MSTConfig(**CONFIGS[name])
    model = tiny_gpt2(n_layer=3)
    per_step = step_by_step(model, cfg, 97, 96, 32)
    plan = plan_run(model, cfg, 97, 96, 32)
    assert (plan.mst_total_flops, plan.arrays["step_flops"].tolist()) == (sum(per_step), per_step)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_vectorised_schedule_equals_schedule(name):
    cfg = MSTConfig(**CONFIGS[name])
    expected = [schedule.target_sparsity(t, 211, cfg) for t in range(211)]
    assert fast_update_steps(211, cfg) == schedule.update_steps(211, cfg)
    np.testing.assert_allclose(target_sparsity_array(211, cfg), expected, rtol=0, atol=1e-12)


def test_all_dense_plan_is_the_closed_form():
    cfg = MSTConfig(ultra_sparsity=0.0, hsa_pattern="dense")
    model = tiny_gpt2()
    plan = plan_run(model, cfg, 50, 128, 64)
    expected = 50 * 128 * dense_token_flops(model_flop_shapes(model, cfg), 64)
    assert (plan.mst_total_flops, plan.dense_total_flops, plan.flop_reduction) == (expected, expected, 1.0)


def test_phase_breakdown_adds_up():
    plan = plan_run(tiny_gpt2(), MSTConfig(update_interval=10), 200, 64, 32)
    assert [(p.name, p.steps) for p in plan.phases] == [("warmup", 20), ("ultra", 140), ("restoration", 40)]
    assert sum(p.mst_flops for p in plan.phases) == plan.mst_total_flops


# --------------------------------------------------------------------------- CLI pieces and the plot


@pytest.mark.slow
def test_cli_config_file_and_folder(tmp_path, capsys):
    MSTConfig(ultra_sparsity=0.8, update_interval=50).save_pretrained(tmp_path)
    loaded = [load_mst_config(str(tmp_path)).ultra_sparsity,
              load_mst_config(str(tmp_path / "mst_config.json")).ultra_sparsity]
    main(["--config", str(tmp_path), "--model", "gpt2-tiny", "--steps", "300", "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    assert (loaded, len(out), json.loads(out[-1])["total_steps"]) == ([0.8, 0.8], 1, 300)


def test_plot_schedule_partial_trace(tmp_path):
    path = tmp_path / "run.png"
    plot_schedule({"step": [0, 10, 20], "sparsity": [0.0, 0.5, 0.9], "phase_bounds": (10, 20)}, str(path), "run")
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_plot_schedule_refuses_ragged_trace(tmp_path):
    with pytest.raises(ValueError, match="attention_density"):
        plot_schedule({"step": [0, 1, 2], "attention_density": [1.0, 0.5]}, str(tmp_path / "x.png"))


@pytest.mark.slow
def test_cli_preset_reaches_4x(cli_run):
    run = cli_run()
    assert run["returncode"] == 0, run["stderr"][-2000:]
    assert json.loads(run["stdout"].strip().splitlines()[-1])["flop_reduction"] >= 4.0


@pytest.mark.slow
def test_cli_writes_png(cli_run):
    assert cli_run()["png"].read_bytes()[:8] == PNG_MAGIC


def test_recommended_preset_keeps_the_counted_4x_on_gpt2_124m():
    from mst_hf import MSTConfig
    from mst_hf.plan import plan_run

    cfg = MSTConfig.from_preset("mst-recommended")
    assert (cfg.lr_schedule, cfg.lm_head_max_sparsity, cfg.grow_method) == ("wsd", 0.8, "gradient")
    assert plan_run("gpt2-124m", cfg, 10_000, 512 * 1024, 1024).flop_reduction >= 4.0


def test_cli_prints_the_measured_quality_next_to_the_counted_reduction(capsys):
    from mst_hf.plan import MEASURED_QUALITY

    main(["--model", "gpt2-tiny", "--steps", "100", "--tokens-per-step", "2048", "--seq-len", "128"])
    out = capsys.readouterr().out
    assert MEASURED_QUALITY in out and out.index("Counted FLOP reduction") < out.index(MEASURED_QUALITY)


def test_a_sequence_beyond_the_models_context_is_planned_with_a_warning(caplog):
    import logging

    from mst_hf import MSTConfig
    from mst_hf.plan import plan_run

    with caplog.at_level(logging.WARNING):
        plan_run("gpt2-tiny", MSTConfig.from_preset(), 10, 8192, 4096)
    assert "context is 1024 positions" in caplog.text
