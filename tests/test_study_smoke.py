"""The study (``python -m study``) end to end on CPU (a tiny model on Moby Dick): its custom loop counts what the
library plans."""

import json
import os

import pytest

from mst_hf import MSTConfig
from mst_hf.plan import plan_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def study_out(tmp_path_factory):
    pytest.importorskip("tokenizers")
    out = str(tmp_path_factory.mktemp("study"))
    from study.run import main

    main(["--smoke", "--arms", "dense,mst,static", "--steps", "20", "--seeds", "0", "--out", out])
    runs = {}
    for name in ("dense-s0", "mst-s0", "static-s0"):
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
    assert text.count("| dense | 0 |") == 2 and "| mst | 0 |" in text and "| static | 0 |" in text
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
