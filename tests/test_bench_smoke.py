"""GPU benchmark scripts run end to end on CPU with ``--smoke`` (tiny model, a few steps), so a GPU session is never
spent on a script that cannot run."""

import json
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(__file__), "..", "bench")

pytestmark = pytest.mark.slow


@pytest.fixture
def bench_path():
    sys.path.insert(0, BENCH)
    try:
        yield
    finally:
        sys.path.remove(BENCH)


def test_hsa_step_smoke_times_both_arms_with_the_pattern_on(bench_path, tmp_path):
    import hsa_step

    from mst_hf.attention import HSASpec

    out = tmp_path / "hsa_step.md"
    rows = hsa_step.main(["--smoke", "--profile", "1", "--out", str(out)])
    with open(tmp_path / "hsa_step.json") as f:
        saved = json.load(f)
    assert [r["arm"] for r in saved["rows"]] == ["dense", "hsa"] and saved["rows"] == json.loads(json.dumps(rows))
    assert all(r["s_per_step"] > 0 and "profile" in r for r in rows)
    assert rows[1]["hsa_density"] == HSASpec("local_strided", window=32, stride=32).density(256) < 1.0
    assert "| tiny | 256 | 2 | 0 |" in out.read_text()
