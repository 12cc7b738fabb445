"""The study's wall-clock table: seconds to reach the reference's loss, and a parallel batch never read as a timing."""

import pytest

from study.timing import seconds_to_reach, timing_lines


def _run(label, seed, points, jobs=1):
    curve = [{"step": i, "train_s": s, "flops": 10.0 * i, "val": v} for i, (s, v) in enumerate(points)]
    return {"label": label, "seed": seed, "curve": curve, "final": {"val": points[-1][1]}, "steps": 100,
            "wall_train_s": points[-1][0], "jobs": jobs}


def test_seconds_to_reach_interpolates_between_the_two_evaluations_around_the_crossing():
    run = _run("hsa", 0, [(0.0, 6.0), (10.0, 5.0), (20.0, 4.0), (30.0, 3.5)])
    assert seconds_to_reach(run, 4.5) == pytest.approx(15.0)  # halfway from (10, 5.0) to (20, 4.0)
    assert seconds_to_reach(run, 5.0) == pytest.approx(10.0)
    assert seconds_to_reach(run, 3.0) is None


def test_table_gives_each_arm_its_fraction_of_the_reference_time():
    dense = _run("dense", 0, [(0.0, 6.0), (50.0, 4.5), (100.0, 4.0)])
    hsa = _run("hsa", 0, [(0.0, 6.0), (20.0, 4.4), (40.0, 3.9)])  # reaches 4.0 at 20 + 20 * 0.4 / 0.5 = 36 s
    lines = timing_lines([dense, hsa], "dense", floor=None)
    row = next(x for x in lines if x.startswith("| hsa |"))
    assert "| 36.0 | 0.360 |" in row
    assert "alone on the GPU" in "\n".join(lines)
    assert "not comparable" not in "\n".join(lines)


def test_runs_that_shared_the_gpu_are_flagged_as_not_timings():
    lines = timing_lines([_run("dense", 0, [(0.0, 6.0), (9.0, 4.0)], jobs=8)], "dense", floor=None)
    assert "not comparable" in "\n".join(lines)


def test_no_table_without_timed_reference():
    old = _run("dense", 0, [(0.0, 6.0), (9.0, 4.0)])
    for c in old["curve"]:
        del c["train_s"]  # a record written before curves carried seconds
    assert timing_lines([old], "dense", floor=None) == []
