"""The study (``python -m study``) end to end on CPU (a tiny model on Moby Dick): its custom loop counts what the
library plans."""

import json
import os

import pytest
import torch

from mst_hf import MSTConfig
from mst_hf.plan import plan_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def study_out(tmp_path_factory):
    pytest.importorskip("tokenizers")
    out = str(tmp_path_factory.mktemp("study"))
    from study.run import main

    main(["--smoke", "--arms", "dense,mst,static", "--steps", "20", "--seeds", "0", "--out", out,
          "--arm", "dense2=dense:lr=4e-3:passes=2", "--arm", "restart=mst:regrow_optimizer_state=restart",
          "--arm", "hsaonly=mst:initial_sparsity=0:ultra_sparsity=0:final_sparsity=0"])
    runs = {}
    for name in ("dense-s0", "mst-s0", "static-s0", "dense2-s0", "restart-s0", "hsaonly-s0"):
        with open(os.path.join(out, f"{name}.json")) as f:
            runs[name.split("-")[0]] = json.load(f)
    return out, runs


def test_dense_count_is_the_causal_formula(study_out):
    _, runs = study_out
    r = runs["dense"]
    m, L, d, T, V = r["model"], r["model"]["n_layer"], r["model"]["n_embd"], 64, r["model"]["vocab"]
    n_matmul = V * d + L * (d * 3 * d + d * d + d * 4 * d + 4 * d * d)  # tied head once, qkv, proj, fc, fc-proj
    assert m["matmul_params"] == n_matmul
    assert r["counted_flops"] == r["tokens"] * (6 * n_matmul + 6 * L * d * (T + 1))
    assert all(v == 1.0 for v in r["reduction"].values())


def test_mst_loop_counts_exactly_the_plan(study_out):
    _, runs = study_out
    r = runs["mst"]
    cfg = MSTConfig(**{k: v for k, v in r["mst_config"].items() if k != "model_type"})
    from transformers import GPT2Config

    m = r["model"]
    model_cfg = GPT2Config(vocab_size=m["vocab"], n_positions=64, n_layer=m["n_layer"], n_embd=m["n_embd"],
                           n_head=m["n_head"])
    plan = plan_run(model_cfg, cfg, r["steps"], 8 * 64, 64)
    assert r["counted_flops"] == float(plan.mst_total_flops)
    assert r["final_sparsity"] == 0.0  # the schedule ends dense
    red = r["reduction"]
    assert red["headline"] > red["no_attention_credit"] >= red["strictest"]  # HSA was on in the ultra phase
    assert red["headline"] > red["dense_lm_head"] >= red["strictest"]


def test_the_run_is_priced_at_the_tiles_the_planner_counts(study_out):
    _, runs = study_out
    r = runs["mst"]  # local_strided, window and stride 16, at 64 tokens: HSA on in the ultra phase
    assert r["reduction"]["attention_tiles"] == pytest.approx(r["planned_conventions"]["attention_tiles"], rel=1e-12)


def test_static_keeps_its_density_and_outputs_exist(study_out):
    out, runs = study_out
    plan = json.load(open(os.path.join(out, "study_plan.json")))
    assert abs((1 - runs["static"]["final_sparsity"]) - plan["mst_mean_density"]) < 0.01
    assert runs["static"]["topology_updates"] == 1
    text = open(os.path.join(out, "study.md")).read()
    # the arms table, the per-arm table and the wall-clock table
    assert text.count("| dense | 0 |") == 3 and "| mst | 0 |" in text and "| static | 0 |" in text
    assert os.path.getsize(os.path.join(out, "study.png")) > 10_000


def test_report_measures_gaps_against_the_named_reference_arm(study_out, tmp_path):
    out, runs = study_out
    from study.report import study_report

    text = study_report(out, str(tmp_path), reference="static", compare="dense")
    with pytest.raises(ValueError, match="reference='dense_wsd'"):
        study_report(out, str(tmp_path), reference="dense_wsd")
    assert "gap to static (same seed)" in text and "val - dense" in text
    gap = (runs["mst"]["final"]["val"] - runs["static"]["final"]["val"]) / runs["static"]["final"]["val"] * 100
    mst_row = next(line for line in text.splitlines() if line.startswith("| mst | 0 |"))
    assert f"{gap:+.2f}%" in mst_row


# --------------------------------------------------------------------------- multi-pass, per-arm LR, recipe keys


def test_two_passes_double_the_steps_and_flops_at_the_arms_lr(study_out):
    _, runs = study_out
    one, two = runs["dense"], runs["dense2"]
    assert (two["steps"], two["planned_steps"], two["passes"], two["lr"]) == (40, 40, 2, 4e-3)
    assert two["counted_flops"] == 2 * one["counted_flops"] and two["curve"][-1]["step"] == 40
    assert one["lr"] == 2e-3 and not one["unstable"] and one["spike_rule"]["threshold_nats"] == 0.3


def test_restart_arm_trains_with_elementwise_adamw(study_out):
    _, runs = study_out
    r = runs["restart"]
    assert r["mst_config"]["regrow_optimizer_state"] == "restart" and r["complete"] and r["topology_updates"] > 1


def test_hsa_alone_keeps_dense_weights_and_every_curve_point_has_its_training_seconds(study_out):
    out, runs = study_out
    r = runs["hsaonly"]
    assert r["final_sparsity"] == 0.0 and r["topology_updates"] == 0 and r["complete"]
    assert r["reduction"]["headline"] > 1.0  # the sparse attention is counted
    for run in runs.values():
        seconds = [c["train_s"] for c in run["curve"]]
        assert seconds[0] == 0.0 and all(b >= a for a, b in zip(seconds, seconds[1:]))
        assert seconds[-1] == pytest.approx(run["wall_train_s"])
    with open(os.path.join(out, "study.md")) as f:
        assert "Wall-clock time, each run alone on the GPU" in f.read()


def test_training_order_keeps_one_pass_and_reshuffles_the_same_blocks():
    from study.loop import training_order

    single = training_order(100, 40, seed=3)
    assert torch.equal(single, torch.randperm(100, generator=torch.Generator().manual_seed(3))[:40])
    three = training_order(100, 40, seed=3, passes=3).view(3, 40)
    assert torch.equal(three[0], single)
    assert all(torch.equal(p.sort().values, single.sort().values) for p in three)  # the same blocks
    assert not torch.equal(three[1], three[0]) and not torch.equal(three[2], three[1])  # in fresh orders


def _args(**kw):
    from study.run import parser

    return parser().parse_args([x for k, v in kw.items() for x in (f"--{k}", v)])


def test_lr_and_passes_are_study_keys_not_mstconfig_fields():
    from study.arms import parse_arms
    from study.loop import lr_config

    args = _args(arms="", arm="fast=dense:lr=4e-3:passes=2:lr_schedule=wsd:lr_decay_start=0.8")
    base, overrides = parse_arms(args)["fast"]
    assert overrides == {"lr": 4e-3, "passes": 2, "lr_schedule": "wsd", "lr_decay_start": 0.8}
    assert lr_config(args, None, {k: v for k, v in overrides.items() if k not in ("lr", "passes")},
                     "fast").lr_schedule == "wsd"
    for bad in ("x=dense:lr=-1", "x=dense:passes=1.5", "x=dense:lr_density_exponent=0.5", "x=mst:adam_beta2=1"):
        with pytest.raises(ValueError, match="--arm x="):
            parse_arms(_args(arms="", arm=bad))


def test_sweep_runs_every_arm_at_every_lr_once_and_repeats_a_seed():
    from study.run import tasks
    from study.sweep import sweep_lrs

    assert sweep_lrs(_args(lr="2e-3", sweep_factor="2", sweep_points="4")) == [1e-3, 2e-3, 4e-3, 8e-3]
    todo = tasks(_args(arms="dense,mst", sweep_lrs="1e-3,4e-3", seeds="5,6", repeat="dense@lr=0.001"))
    assert [(label, ov["lr"], seed) for label, _, ov, seed in todo] == [
        ("dense@lr=0.001", 1e-3, 5), ("dense@lr=0.004", 4e-3, 5), ("mst@lr=0.001", 1e-3, 5),
        ("mst@lr=0.004", 4e-3, 5), ("dense@lr=0.001#rep", 1e-3, 5)]


def test_density_exponent_and_masked_decay_reach_the_masked_matrices():
    from mst_hf import MSTConfig, MSTController
    from study.loop import lr_lambdas, param_groups

    from .helpers import tiny_gpt2

    model = tiny_gpt2()
    ctl = MSTController(model, MSTConfig(initial_sparsity=0.75, ultra_sparsity=0.75, final_sparsity=0.75,
                                         warmup_ratio=0.0, restoration_ratio=0.0, hsa_pattern="dense"))
    overrides = {"lr_density_exponent": 0.5, "masked_weight_decay": 0}
    groups, names = param_groups(model, ctl, overrides)
    opt = torch.optim.AdamW(groups, lr=1e-3)
    torch.optim.lr_scheduler.LambdaLR(opt, lr_lambdas(lambda t: 1.0, ctl, names, 0.5))
    masked = [(g["lr"], g["weight_decay"], n) for g, n in zip(opt.param_groups, names) if n is not None]
    assert len(masked) == len(ctl.masks.masks) and max(lr for lr, _, _ in masked) > 1.5e-3
    assert all(lr == pytest.approx(1e-3 / ctl.masks.density(n) ** 0.5) and wd == 0 for lr, wd, n in masked)
    assert all(g["lr"] == 1e-3 for g, n in zip(opt.param_groups, names) if n is None)


# --------------------------------------------------------------------------- report: spikes, noise, sweep, frontier


def test_spikes_are_rises_of_the_smoothed_loss_above_its_minimum_after_the_first_tenth():
    from study.spikes import detect_spikes

    falling = [(s, 4.0 + 0.995**s) for s in range(10, 1010, 10)]  # 100 logs of a run of 1000 steps
    assert detect_spikes(falling, 1000) == []
    jump = [(s, v + (1.0 if 500 <= s < 560 else 0.0)) for s, v in falling]
    spikes = detect_spikes(jump, 1000)
    assert len(spikes) == 1 and 500 <= spikes[0]["step"] < 560 and spikes[0]["loss"] - spikes[0]["min_so_far"] > 0.3
    assert detect_spikes([(s, v + (0.3 if 500 <= s < 560 else 0.0)) for s, v in falling], 1000) == []  # smoothed
    early = [(s, v + (2.0 if 30 <= s < 60 else 0.0)) for s, v in falling]
    assert detect_spikes(early, 1000) == [] and len(detect_spikes(early, 100)) == 1  # only after the first 10%
    assert detect_spikes(falling[:5] + [(60, float("nan"))], 1000)[0]["step"] == 60


def _record(label, seed, val, flops=1e12, dense=True, unstable=False, passes=1, curve=None):
    curve = curve or [{"step": 0, "flops": 0.0, "val": 8.0}, {"step": 10, "flops": flops, "val": val}]
    return {"label": label, "seed": seed, "final": {"val": val}, "counted_flops": flops, "unstable": unstable,
            "mst_config": None if dense else {"ultra_sparsity": 0.8}, "passes": passes, "curve": curve,
            "model": {"n_layer": 4, "n_embd": 192}, "arm": "dense" if dense else "mst", "overrides": {}}


def test_noise_floor_is_the_largest_spread_or_repeat_of_the_reference_arms():
    from study.noise import diff_text, noise_floor, noise_sources

    rows = [_record("dense", 0, 4.00), _record("dense", 1, 4.03), _record("dense#rep", 0, 4.01),
            _record("mst", 0, 4.50), _record("mst", 1, 4.60), _record("dense_wsd@lr=0.002", 0, 3.9),
            _record("dense_wsd@lr=0.002#rep", 0, 3.94)]
    sources = noise_sources(rows)
    assert noise_floor(sources, ["dense"]) == pytest.approx(0.03)  # spread 0.03 > repeat 0.01; mst's 0.10 not counted
    assert noise_floor(sources, ["dense", "mst"]) == pytest.approx(0.10)
    assert noise_floor(sources, ["dense_wsd"]) == pytest.approx(0.04)  # a sweep run's repeat counts for its arm
    assert (diff_text(0.02, 0.03), diff_text(-0.05, 0.03), diff_text(0.02, None)) == ("~", "-0.0500", "+0.0200")


def test_sweep_picks_the_best_stable_lr_and_prints_the_confirm_command():
    from study.sweep import best_lrs, confirm_command, sweep_cells

    rows = [_record("dense@lr=0.001", 0, 4.2), _record("dense@lr=0.002", 0, 4.1),
            _record("dense@lr=0.004", 0, 3.9, unstable=True), _record("mst@lr=0.004", 0, 4.6, unstable=True)]
    assert best_lrs(sweep_cells(rows)) == {"dense": 0.002, "mst": None}
    argv = ["--data", "d", "--arms", "dense,mst", "--sweep_lrs", "1e-3,2e-3", "--out", "o", "--jobs", "4"]
    assert confirm_command(argv, ["dense=dense:lr=0.002"]) == ("python -m study --data d --jobs 4 --arms '' "
                                                               "--two_seed_arms all --arm dense=dense:lr=0.002 "
                                                               "--out o_confirm")


def test_frontier_picks_the_best_stable_dense_run_within_each_budget():
    from study.frontier import arm_summaries, frontier

    rows = [_record("dense", 0, 4.0, flops=10e12), _record("small", 0, 4.5, flops=3.0e12),
            _record("small_2p", 0, 4.3, flops=6e12, passes=2), _record("small_lr8", 0, 4.2, flops=3.05e12,
                                                                       unstable=True),
            _record("mst", 0, 4.6, flops=2.9e12, dense=False), _record("mst", 1, 4.4, flops=2.9e12, dense=False)]
    table = frontier(arm_summaries(rows))
    assert [(b["budget"], b["best_dense"]["label"]) for b in table] == [(3.05e12, "small"), (6e12, "small_2p"),
                                                                        (10e12, "dense")]
    assert table[0]["skipped_unstable"] == ["small_lr8"] and [s["label"] for s in table[0]["sparse"]] == ["mst"]
    assert table[0]["sparse"][0]["val"] == pytest.approx(4.5)  # the mean over seeds


# --------------------------------------------------------------------------- bad inputs and cut-off records


def test_a_stopped_reference_keeps_its_label_and_its_gaps(study_out, tmp_path):
    import shutil

    from study.report import study_report

    out, runs = study_out
    folder = tmp_path / "stopped"
    shutil.copytree(out, folder)
    record = dict(runs["static"], complete=False, planned_steps=runs["static"]["steps"] + 10)
    (folder / "static-s0.json").write_text(json.dumps(record))
    text = study_report(str(folder), str(tmp_path / "report"), reference="static", compare="dense")
    mst_row = next(line for line in text.splitlines() if line.startswith("| mst | 0 |"))
    assert "%" in mst_row and "stopped at step" in text


def test_a_cut_off_record_is_refused_naming_the_file(study_out, tmp_path):
    import shutil

    from study.report import study_report

    folder = tmp_path / "cut"
    shutil.copytree(study_out[0], folder)
    text = (folder / "mst-s0.json").read_text()
    (folder / "mst-s0.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=r"mst-s0\.json.*not complete JSON"):
        study_report(str(folder), str(tmp_path / "report"))


@pytest.mark.parametrize("seeds", ["", "a,b", "0,,1", "-1"])
def test_bad_seed_lists_are_named(seeds):
    from study.run import tasks

    with pytest.raises(ValueError, match="`--seeds` takes comma-separated seeds"):
        tasks(_args(seeds=seeds))
