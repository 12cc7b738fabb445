"""`mst_hf.model_sizes`: the one table of named model sizes. Each name builds the model it says (parameter count),
the planner builds every name, overrides apply, and no benchmark script redefines a library name."""

import ast
import os
import pathlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from mst_hf.model_sizes import MODEL_SIZES, model_config  # noqa: E402
from mst_hf.plan import build_meta_model  # noqa: E402

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench"
# parameters (millions, embeddings included) each name promises, from its name or the comment beside it
SIZES_M = {"gpt2-tiny": 7, "gpt2-124m": 124, "gpt2-350m": 355, "gpt2-774m": 774, "gpt2-1558m": 1558,
           "gpt2-d2048": 1300, "llama-d2048": 1000, "llama-1b": 1100}


@pytest.mark.parametrize("name", sorted(SIZES_M))
def test_each_name_builds_the_size_it_names(name):
    model = build_meta_model(name)  # what `python -m mst_hf.plan --model NAME` plans, on the meta device
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(millions - SIZES_M[name]) / SIZES_M[name] < 0.06


def test_every_name_has_its_expected_size_listed():
    assert set(MODEL_SIZES) == set(SIZES_M)


def test_overrides_apply_and_the_table_stays_unchanged():
    cfg = model_config("gpt2-124m", n_positions=2048, attn_pdrop=0.0)
    assert (cfg.n_positions, cfg.attn_pdrop, cfg.n_layer) == (2048, 0.0, 12)
    assert model_config("gpt2-124m").n_positions == 1024


def test_an_unknown_name_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="gpt2-124m"):
        model_config("gpt2-125m")


def _library_names_redefined(path: pathlib.Path) -> list[str]:
    """Module-level table entries of a bench script keyed by a library size name whose value does not pass that
    name on to the library (e.g. a `GPT2Config(...)` or a dict of dimensions under "gpt2-124m")."""
    found = []
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if not (isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)):
            continue
        for key, value in zip(node.value.keys, node.value.values):
            if isinstance(key, ast.Constant) and key.value in MODEL_SIZES:
                strings = {n.value for n in ast.walk(value) if isinstance(n, ast.Constant)}
                if key.value not in strings:
                    found.append(f"{path.name}:{key.lineno} {key.value!r}")
    return found


def test_bench_scripts_take_library_sizes_from_the_library():
    scripts = sorted(BENCH.rglob("*.py"))
    assert scripts, f"no benchmark scripts under {BENCH}"
    assert [hit for path in scripts for hit in _library_names_redefined(path)] == []
