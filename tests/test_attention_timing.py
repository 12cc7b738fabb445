"""The measured attention time table (mst_hf.attention.timing) and the planner's attention columns: the shipped JSON
is what the converter writes from the committed Markdown, lookups and scaling match numbers computed by hand from
named rows of that Markdown, and what was not measured reads "no measurement" instead of a guess."""

import importlib.util
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
from transformers import GPT2Config, LlamaConfig  # noqa: E402

from mst_hf import MSTConfig  # noqa: E402
from mst_hf.attention import HSASpec, attention_density  # noqa: E402
from mst_hf.attention.timing import DEFAULT_TIMES, attention_ms, load_times, parse_benchmark  # noqa: E402
from mst_hf.plan import main, plan_run  # noqa: E402
from mst_hf.predict import predict_times  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H200, H100 = "NVIDIA H200", "NVIDIA H100 80GB HBM3"
# docs/results/attention_triton.md (H200), B * T = 32768 tokens, H = 12, D = 64:
#   | 4096 | 8 | local_strided | auto -> triton | 0.652 | 1.840 | ...
#   | 1024 | 32 | local_strided | auto -> triton | 0.633 | 0.684 | ...
#   | 32768 | 1 | local | auto -> triton | 0.416 | 13.435 | ...
LS_4096, SDPA_4096, LS_1024, SDPA_1024 = 0.652, 1.840, 0.633, 0.684


def load_tool():
    spec = importlib.util.spec_from_file_location("attention_table", os.path.join(ROOT, "tools", "attention_table.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_converter_reproduces_the_shipped_table_from_the_committed_markdown():
    with open(DEFAULT_TIMES, encoding="utf-8") as f:
        assert load_tool().build() == f.read()


def test_bench_json_writes_the_same_entry_and_keeps_other_gpus(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_attention", os.path.join(ROOT, "bench", "attention.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "times.json"
    out.write_text(json.dumps({"devices": {H200: shipped()["devices"][H200]}}))
    source = os.path.join(ROOT, "docs", "results", "attention_h100_head_1024.md")
    bench.write_json(source, str(out))
    written = json.loads(out.read_text())["devices"]
    assert written[H200] == shipped()["devices"][H200]
    assert written[H100] == {**shipped()["devices"][H100], "source": source}


def test_the_table_holds_every_auto_row_of_its_sources_and_their_exact_densities():
    for gpu, entry in load_times().items():
        with open(os.path.join(ROOT, entry["source"]), encoding="utf-8") as f:
            autos = [line for line in f if "| auto -> " in line]
        assert len(entry["rows"]) == len(autos), gpu
        for r in entry["rows"]:  # the density column is the library's exact density, rounded as printed
            assert r["density"] == pytest.approx(attention_density(r["pattern"], r["seq_len"]), abs=6e-5)


def test_a_measured_length_gives_the_row_itself():
    t = attention_ms(H200, "local_strided", 4096, 32768, 12, 64, 1)
    assert (t.sparse_ms, t.sdpa_ms, t.measured_seq_len, t.kernel) == (LS_4096, SDPA_4096, 4096, "triton")


def test_tokens_heads_head_dim_and_layers_scale_linearly():
    # 2x tokens, 2x heads, half the head dim: x2 per layer; 3 layers
    t = attention_ms(H200, "local_strided", 4096, 65536, 24, 32, 3)
    assert (t.sparse_ms, t.sdpa_ms) == pytest.approx((3 * 2 * LS_4096, 3 * 2 * SDPA_4096))


def test_only_the_hsa_layers_run_the_pattern():
    t = attention_ms(H200, HSASpec("local_strided", layers="alternate"), 4096, 32768, 12, 64, 3)
    assert t.sparse_ms == pytest.approx(2 * LS_4096 + SDPA_4096)  # layers 0 and 2 sparse, layer 1 SDPA
    listed = attention_ms(H200, HSASpec("local_strided", layers=[1]), 4096, 32768, 12, 64, 3)
    assert listed.sparse_ms == pytest.approx(LS_4096 + 2 * SDPA_4096)


@pytest.mark.parametrize("seq_len, measured", [(3000, 4096), (2048, 1024), (512, 1024), (65536, 32768)])
def test_nearest_measured_length_within_a_factor_2(seq_len, measured):
    # 2048 is a factor 2 from 1024 and from 4096: the tie goes to the shorter length
    t = attention_ms(H200, "local_strided", seq_len, 32768, 12, 64, 1)
    assert t.measured_seq_len == measured
    if measured == 1024:
        assert (t.sparse_ms, t.sdpa_ms) == (LS_1024, SDPA_1024)


@pytest.mark.parametrize("gpu, seq_len", [(H200, 511), (H200, 65537), (H100, 4096), ("NVIDIA A100-SXM4-80GB", 1024)])
def test_no_measurement_outside_a_factor_2_or_for_another_gpu(gpu, seq_len):
    t = attention_ms(gpu, "local", seq_len, 32768, 12, 64, 1)
    assert (t.sparse_ms, t.sdpa_ms) == (None, None) and "no measurement" in t.reason


def test_the_h100_rows_are_used_near_1024():
    # docs/results/attention_h100_head_1024.md: | 1024 | 32 | local | auto -> triton | 0.416 | 0.716 | ...
    t = attention_ms("nvidia  h100 80gb hbm3", "local", 2048, 32768, 12, 64, 1)  # names compared normalised
    assert (t.sparse_ms, t.sdpa_ms, t.measured_seq_len) == (0.416, 0.716, 1024)


@pytest.mark.parametrize("spec, head_dim, why", [
    (HSASpec("local_strided", window=256), 64, "window 256"),
    (HSASpec("strided", stride=64), 64, "stride 64"),
    (HSASpec("fixed", block=64), 64, "block 64"),
    (HSASpec("local_strided", head_split=True), 64, "head_split"),
    (HSASpec("local", backend="flex"), 64, "backend"),
    (HSASpec("local"), 256, "head_dim 256"),
])
def test_settings_that_were_not_measured_give_no_sparse_time(spec, head_dim, why):
    t = attention_ms(H200, spec, 4096, 32768, 12, head_dim, 1)
    assert t.sparse_ms is None and t.sdpa_ms is not None and why in t.reason


def test_sizes_a_pattern_does_not_use_do_not_matter():
    t = attention_ms(H200, HSASpec("local", stride=7, block=9), 4096, 32768, 12, 64, 1)
    assert t.sparse_ms == 0.414  # | 4096 | 8 | local | auto -> triton | 0.414 |


def test_attention_dropout_is_not_predicted():
    t = attention_ms(H200, "local", 4096, 32768, 12, 64, 1, dropout=0.1)
    assert (t.sparse_ms, t.sdpa_ms) == (None, None) and "dropout" in t.reason


def write(tmp_path, data) -> str:
    path = tmp_path / "times.json"
    path.write_text(json.dumps(data))
    return str(path)


def shipped():
    with open(DEFAULT_TIMES, encoding="utf-8") as f:
        return json.load(f)


@pytest.mark.parametrize("change, match", [
    (lambda d: d["devices"][H200]["rows"][3].pop("ms"), r"rows\[3\] has no `ms`"),
    (lambda d: d["devices"][H200]["rows"][0].update(ms=-1.0), r"rows\[0\]: `ms` must be a positive number"),
    (lambda d: d["devices"][H200]["rows"][0].update(pattern="sliding"), r"`pattern` must be one of"),
    (lambda d: d["devices"][H200].update(heads="12"), r"`heads` must be a positive int"),
    (lambda d: d["devices"][H200].update(rows=[]), r"`rows` must be a non-empty list"),
    (lambda d: d["devices"][H200]["rows"].append(d["devices"][H200]["rows"][0]), r"a second row"),
    (lambda d: d["devices"][H200]["rows"][1].update(sdpa_causal_ms=0.7), r"`sdpa_causal_ms` 0.7 differs"),
])
def test_a_malformed_table_names_the_file_the_device_and_the_field(tmp_path, change, match):
    data = shipped()
    change(data)
    path = write(tmp_path, data)
    with pytest.raises(ValueError, match=match) as err:
        attention_ms(H200, "local", 4096, 32768, 12, 64, 1, table_path=path)
    assert path in str(err.value) and repr(H200) in str(err.value)


def test_a_missing_or_unreadable_table_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_times(str(tmp_path / "nope.json"))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_times(str(tmp_path / "bad.json"))


def test_parse_benchmark_refuses_a_file_without_the_header():
    with pytest.raises(ValueError, match="no `date: ...; GPU: ...` header"):
        parse_benchmark("| 1024 | 32 | local | auto -> triton | 0.5 | 0.6 | 1.2 | 0.2343 |  | 1e-3 |", "x.md")


# --------------------------------------------------------------------------- the planner


def llama(layers=2, heads=2, hidden=128, **kw):
    return LlamaConfig(num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                       hidden_size=hidden, intermediate_size=256, vocab_size=256, max_position_embeddings=65536, **kw)


def predict(model_config, seq_len=4096, gpu=H200, **mst):
    cfg = MSTConfig(**{"hsa_pattern": "local_strided", **mst})
    plan = plan_run(model_config, cfg, 100, 8 * seq_len, seq_len)
    return plan, predict_times(plan, cfg, gpu, model_config=model_config)


def test_plan_phases_follow_the_schedule_of_hsa_phases():
    # 2 layers of 2 heads of 64: x 2/12 per layer at 32768 tokens
    plan, pred = predict(llama())
    sparse, dense = 2 * LS_4096 * 2 / 12, 2 * SDPA_4096 * 2 / 12
    assert [(p.name, p.attention_mst_ms, p.attention_dense_ms) for p in pred.phases] == [
        ("warmup", pytest.approx(dense), pytest.approx(dense)), ("ultra", pytest.approx(sparse), pytest.approx(dense)),
        ("restoration", pytest.approx(dense), pytest.approx(dense))]
    steps = [p.steps for p in plan.phases]
    assert pred.total.attention_mst_ms == pytest.approx((steps[0] * dense + steps[1] * sparse + steps[2] * dense)
                                                        / sum(steps))
    _, other = predict(llama(), hsa_phases=["warmup", "restoration"])
    assert [p.attention_mst_ms for p in other.phases] == pytest.approx([sparse, dense, sparse])
    assert pred.phases[1].attention_speedup == pytest.approx(SDPA_4096 / LS_4096)


def test_plan_markdown_says_where_the_attention_numbers_come_from():
    _, pred = predict(llama())
    text = pred.markdown()
    assert "| MST attention ms/step | dense attention ms/step | attention speed-up |" in text
    assert "docs/results/attention_triton.md" in text and "not a measured run" in text
    assert pred.summary()["total"]["dense_attention_ms_per_step"] == pytest.approx(2 * SDPA_4096 * 2 / 12)


@pytest.mark.parametrize("config, seq_len, gpu, why", [
    (llama(), 4096, "Some Other GPU", "no measurement for GPU 'Some Other GPU'"),
    (llama(), 100_000, H200, "no measurement within a factor 2 of seq_len 100000"),
    (GPT2Config(n_layer=2, n_head=2, n_embd=128, vocab_size=256, n_positions=4096), 4096, H200, "dropout 0.1"),
    (llama(sliding_window=1024), 4096, H200, "sliding window"),
])
def test_plan_markdown_says_no_measurement(config, seq_len, gpu, why):
    _, pred = predict(config, seq_len, gpu)
    assert (pred.total.attention_mst_ms, pred.total.attention_dense_ms) == (None, None)
    assert "| no measurement | no measurement | no measurement |" in pred.markdown() and why in pred.markdown()


def test_an_unmeasured_window_keeps_the_dense_column_and_says_why():
    _, pred = predict(llama(), hsa_window=256)
    assert pred.phases[1].attention_mst_ms is None and pred.phases[1].attention_dense_ms is not None
    assert pred.phases[0].attention_mst_ms == pred.phases[0].attention_dense_ms  # HSA off: SDPA, measured
    assert "window 256 (measured 128) not measured" in pred.markdown()


def test_plan_command_line_prints_the_attention_columns(capsys):
    main(["--gpu", H200, "--model", "llama-d2048", "--seq-len", "4096", "--steps", "100", "--tokens-per-step",
          "32768"])
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])["predicted_time"]
    # llama-d2048: 16 layers of 16 heads of 128 -> x 16/12 x 128/64 per layer at 32768 tokens
    per_layer = 16 / 12 * 2
    ultra = next(p for p in summary["phases"] if p["phase"] == "ultra")
    assert "| MST attention ms/step | dense attention ms/step | attention speed-up |" in out
    assert (ultra["mst_attention_ms_per_step"], ultra["dense_attention_ms_per_step"]) == pytest.approx(
        (16 * LS_4096 * per_layer, 16 * SDPA_4096 * per_layer))
