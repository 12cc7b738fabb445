"""Predicted matmul time of a plan (`mst_hf.predict`, `python -m mst_hf.plan --gpu`): hand-computed numbers on a
small synthetic table written here, the dense update steps, the 1.00x of masked dense kernels, and "no measurement"
where the table has nothing for the GPU or the shape."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from mst_hf import MSTConfig  # noqa: E402
from mst_hf.flops import FlopModel, Matmul  # noqa: E402
from mst_hf.plan import main, plan_run  # noqa: E402
from mst_hf.predict import predict_times  # noqa: E402

GPU = "Test GPU 80GB"
# 80 x 128 at block 16: a 5 x 8 grid of 40 tiles; density 0.175 is exactly 7 tiles
SHAPE = (80, 128)


def row(density, block_ms, layout="linear", n_in=80, n_out=128, dense_ms=1.0, **extra):
    return {"shape": "x", "layout": layout, "n_in": n_in, "n_out": n_out, "block_size": 16, "density": density,
            "tokens": 1024, "dense_ms": dense_ms, "block_ms": block_ms, **extra}


def write_table(tmp_path, measurements, break_even=0.4, name="table.json", n_in=80, n_out=128):
    path = tmp_path / name
    table = {"tokens": 1024, "break_even": [{"n_in": n_in, "n_out": n_out, "block_size": 16,
                                             "break_even_density": break_even}], "measurements": measurements}
    path.write_text(json.dumps({"devices": {GPU: table}}))
    return str(path)


def one_layer(n_in=80, n_out=128):
    return FlopModel(matmuls=(Matmul("w", "lin", n_in, n_out, True),), n_layers=0, attn_dim=0)


def constant_config(**kw):
    """Sparsity 0.825 (density 0.175) in every step; topology updates at steps 0 and 5 of a 10-step run."""
    fields = dict(initial_sparsity=0.825, ultra_sparsity=0.825, final_sparsity=0.825, warmup_ratio=0.0,
                  restoration_ratio=0.0, update_interval=5, sparsity_structure="block", block_size=16,
                  weight_kernels="auto")
    return MSTConfig(**{**fields, **kw})


def predict(tmp_path, cfg=None, rows=None, tokens=1024, fm=None, **kw):
    cfg = cfg or constant_config()
    plan = plan_run(fm or one_layer(), cfg, 10, tokens, 16)
    rows = [row(0.1, 0.25), row(0.25, 0.5)] if rows is None else rows
    return predict_times(plan, cfg, kw.pop("gpu", GPU), write_table(tmp_path, rows), **kw)


def test_interpolated_block_time_and_dense_update_steps(tmp_path):
    pred = predict(tmp_path, other_ms=1.0)
    (ultra,) = pred.phases
    # block time at 0.175 halfway between 0.25 ms (0.1) and 0.5 ms (0.25): 0.375 ms on 8 steps, dense 1.0 ms on the
    # 2 update steps: (2 * 1.0 + 8 * 0.375) / 10 = 0.5 ms a step against 1.0 dense
    assert (ultra.name, ultra.update_steps, pred.timing) == ("ultra", 2, "eager")
    assert ultra.mst_ms == pytest.approx(0.5) and ultra.dense_ms == pytest.approx(1.0)
    assert ultra.speedup == pytest.approx(2.0) and ultra.block_share == pytest.approx(0.8)
    assert ultra.whole_step_speedup == pytest.approx(2.0 / 1.5)  # (1 + 1) / (0.5 + 1)
    assert "norms, the loss and the optimizer are not predicted" in pred.markdown()


def test_tokens_and_gpus_scale_linearly(tmp_path):
    one = predict(tmp_path, tokens=4096).total  # 4x the measured tokens on one GPU
    two = predict(tmp_path, tokens=4096, gpus=2).total  # 2x on each of two GPUs
    assert (one.dense_ms, one.mst_ms) == pytest.approx((4.0, 2.0))
    assert (two.dense_ms, two.mst_ms) == pytest.approx((2.0, 1.0))


def test_graph_times_are_used_when_every_row_has_them(tmp_path):
    rows = [row(0.1, 0.25, graph_dense_ms=2.0, graph_block_ms=0.5), row(0.25, 0.5, graph_dense_ms=2.0,
                                                                        graph_block_ms=1.0)]
    pred = predict(tmp_path, rows=rows)
    assert pred.timing == "graph"
    assert pred.total.mst_ms == pytest.approx((2 * 2.0 + 8 * 0.75) / 10)  # graph block at 0.175: 0.75


def test_model_layout_rows_are_preferred(tmp_path):
    rows = [row(0.1, 0.25), row(0.25, 0.5), row(0.1, 0.1, "conv1d", dense_ms=2.0), row(0.25, 0.2, "conv1d",
                                                                                        dense_ms=2.0)]
    conv = predict(tmp_path, rows=rows, layout="conv1d").total
    assert (conv.dense_ms, conv.mst_ms) == pytest.approx((2.0, (2 * 2.0 + 8 * 0.15) / 10))


def test_below_the_smallest_density_uses_its_time_above_the_largest_predicts_nothing(tmp_path):
    low = predict(tmp_path, cfg=constant_config(initial_sparsity=0.95, ultra_sparsity=0.95, final_sparsity=0.95))
    assert low.total.mst_ms == pytest.approx((2 * 1.0 + 8 * 0.25) / 10)
    dense_ish = dict(initial_sparsity=0.5, ultra_sparsity=0.5, final_sparsity=0.5, weight_kernels="block")
    high = predict(tmp_path, cfg=constant_config(**dense_ish))  # forced block kernel at density 0.5 > 0.25
    assert (high.total.mst_ms, high.total.speedup, high.total.block_share) == (None, None, pytest.approx(0.8))


def test_auto_keeps_a_layer_above_break_even_dense(tmp_path):
    cfg = constant_config()
    plan = plan_run(one_layer(), cfg, 10, 1024, 16)
    path = write_table(tmp_path, [row(0.1, 0.25), row(0.25, 0.5)], break_even=0.15)  # 0.175 is above it
    pred = predict_times(plan, cfg, GPU, path)
    assert (pred.total.block_share, pred.total.speedup, pred.total.mst_ms) == (0.0, 1.0, pytest.approx(1.0))


def test_unstructured_masks_run_masked_dense_kernels(tmp_path):
    pred = predict(tmp_path, cfg=constant_config(sparsity_structure="unstructured", weight_kernels="dense"))
    assert [(p.speedup, p.block_share) for p in [*pred.phases, pred.total]] == [(1.0, 0.0), (1.0, 0.0)]
    assert pred.total.mst_ms == pytest.approx(1.0) and "1.00x" in pred.markdown()
    assert "sparsity_structure='unstructured'" in pred.kernels


def test_unknown_gpu_says_no_measurement(tmp_path):
    auto = predict(tmp_path, gpu="Some Other GPU")
    forced = predict(tmp_path, gpu="Some Other GPU", cfg=constant_config(weight_kernels="block"))
    assert (auto.total.mst_ms, auto.total.dense_ms, auto.timing) == (None, None, None)
    assert auto.total.speedup == 1.0  # "auto" finds no table: every layer stays dense
    assert forced.total.speedup is None
    assert "no measurement" in forced.markdown().lower() and "Some Other GPU" in forced.markdown()


def test_shape_outside_a_factor_4_is_not_predicted(tmp_path):
    far = one_layer(80 * 8, 128)  # log distance log 8 > log 4
    pred = predict(tmp_path, fm=far)
    assert pred.total.mst_ms is None and pred.not_predicted == [
        {"n_in": 640, "n_out": 128, "layers": 1, "reason": "no measured shape within a factor 4"}]
    two = FlopModel(matmuls=(Matmul("w", "a", 80, 128, True), Matmul("h", "b", 640, 128, False)), n_layers=0,
                    attn_dim=0)
    mixed = predict(tmp_path, fm=two)  # the measured layer is predicted, the other listed and left out
    assert mixed.total.dense_ms == pytest.approx(1.0) and len(mixed.not_predicted) == 1


def test_missing_table_file_is_a_clear_error(tmp_path):
    plan = plan_run(one_layer(), constant_config(), 10, 1024, 16)
    with pytest.raises(ValueError, match="kernel-table"):
        predict_times(plan, constant_config(), GPU, str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="gpus"):
        predict_times(plan, constant_config(), GPU, gpus=0)


def test_cli_gpu_prints_the_table_and_adds_predicted_time(tmp_path, capsys):
    # gpt2-tiny: 128 x 384, 128 x 128, 128 x 512, 512 x 128 per layer; the table measures 128 x 512 only
    rows = [row(d, ms, "conv1d", 128, 512, dense_ms=1.0) for d, ms in ((0.1, 0.25), (0.25, 0.5))]
    table = write_table(tmp_path, rows, break_even=0.25, n_in=128, n_out=512)
    constant_config(block_size=16).save_pretrained(tmp_path / "cfg")
    args = ["--config", str(tmp_path / "cfg"), "--model", "gpt2-tiny", "--steps", "10", "--tokens-per-step", "1024",
            "--seq-len", "16"]
    main(args + ["--gpu", GPU, "--kernel-table", table])
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])
    assert any(line.startswith("## Predicted weight-matmul and attention time on") for line in out)
    assert summary["predicted_time"]["timing"] == "eager" and summary["predicted_time"]["total"]["matmul_speedup"] > 1
    main(args + ["--json"])
    assert "predicted_time" not in json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    with pytest.raises(ValueError, match="kernel-table"):
        main(args + ["--gpu", GPU, "--kernel-table", str(tmp_path / "nope.json")])
