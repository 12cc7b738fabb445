"""The break-even table (mst_hf.kernels.table): every malformed or missing table is refused when it is read, by one
reader that the controller (`MST_KERNEL_TABLE`, at construction) and the planner (`--kernel-table`) share, with
an error naming the file, the row and the field."""

import json

import pytest

from mst_hf import MSTConfig, MSTController
from mst_hf.flops import FlopModel, Matmul
from mst_hf.kernels.table import load_table
from mst_hf.plan import plan_run
from mst_hf.predict import predict_times

from ..helpers import tiny_llama

ROW = {"n_in": 64, "n_out": 64, "block_size": 16, "break_even_density": 0.5}


def device(**change):
    table = {"tokens": 64, "break_even": [dict(ROW)]}
    table.update(change)
    return {"devices": {"GPU": table}}


def with_row(**change):
    return device(break_even=[{**ROW, **change}])


def without(field):
    return device(break_even=[{k: v for k, v in ROW.items() if k != field}])


MEASURED = {"n_in": 64, "n_out": 64, "block_size": 16, "density": 0.1, "tokens": 64, "dense_ms": 1.0, "block_ms": 0.5}
BAD = [
    ("invalid json", "{devices: ", "not valid JSON"),
    ("a list", [], r'must be a JSON object \{"devices"'),
    ("no devices", {"break_even": []}, r"got an object with keys \['break_even'\]"),
    ("device not an object", {"devices": {"GPU": [1]}}, r"devices\['GPU'\] must be an object"),
    ("no tokens", {"devices": {"GPU": {"break_even": []}}}, r"devices\['GPU'\] has no `tokens`"),
    ("tokens as text", device(tokens="64"), r"`tokens` must be a positive number, got '64'"),
    ("break_even not a list", device(break_even={"n_in": 64}), r"`break_even` must be a list"),
    ("row without break_even_density", without("break_even_density"),
     r"devices\['GPU'\]\.break_even\[0\] has no `break_even_density`"),
    ("n_in as text", with_row(n_in="64"), r"break_even\[0\]: `n_in` must be a positive int, got '64'"),
    ("n_in zero", with_row(n_in=0), r"break_even\[0\]: `n_in` must be a positive int, got 0"),
    ("n_out negative", with_row(n_out=-64), r"`n_out` must be a positive int, got -64"),
    ("density as text", with_row(break_even_density="0.5"), r"`break_even_density` must be a number in \[0, 1\]"),
    ("measurement without tokens", device(measurements=[{k: v for k, v in MEASURED.items() if k != "tokens"}]),
     r"measurements\[0\] has no `tokens`"),
    ("measurement ms as text", device(measurements=[{**MEASURED, "block_ms": "fast"}]),
     r"measurements\[0\]: `block_ms` must be a non-negative number"),
]


def write(tmp_path, content, name="table.json"):
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


@pytest.mark.parametrize("content, match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_malformed_table_names_the_file_and_the_field(tmp_path, content, match):
    path = write(tmp_path, content)
    with pytest.raises(ValueError, match=match) as info:
        load_table(path)
    assert path in str(info.value)


def test_directory_and_missing_file_are_refused(tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        load_table(str(tmp_path))
    with pytest.raises(ValueError, match="does not exist"):
        load_table(str(tmp_path / "missing.json"))


def test_shipped_table_is_valid():
    assert load_table()  # the default: every field of the measured GPUs passes the checks


def _auto():
    return MSTConfig(initial_sparsity=0.5, ultra_sparsity=0.5, final_sparsity=0.5, warmup_ratio=0.0,
                     restoration_ratio=0.0, hsa_pattern="dense", sparsity_structure="block", block_size=16,
                     weight_kernels="auto")


@pytest.mark.parametrize("content", [with_row(n_in=0), None], ids=["malformed", "missing"])
def test_controller_and_planner_refuse_the_same_table_at_construction(tmp_path, monkeypatch, content):
    path = write(tmp_path, content) if content is not None else str(tmp_path / "missing.json")
    monkeypatch.setenv("MST_KERNEL_TABLE", path)
    with pytest.raises(ValueError, match="named by MST_KERNEL_TABLE") as trainer_path:
        MSTController(tiny_llama(), _auto())  # not at the first step: before any weight is pruned
    cfg = _auto()
    plan = plan_run(FlopModel(matmuls=(Matmul("w", "lin", 64, 64, True),), n_layers=0, attn_dim=0), cfg, 10, 64, 16)
    with pytest.raises(ValueError, match="kernel-table") as cli_path:
        predict_times(plan, cfg, "GPU", path)
    problem = str(cli_path.value).split(path)[1]  # what is wrong, after the file name: the same words
    assert path in str(trainer_path.value) and problem in str(trainer_path.value)
