"""The three-phase schedule at and around every phase boundary; expected values from the formulas in SPEC."""

import math

import pytest

from mst_hf import MSTConfig, schedule

T = 1000  # warm-up [0, 100), ultra [100, 800), restoration [800, 1000); updates every 100 steps


@pytest.fixture
def cfg():
    return MSTConfig(initial_sparsity=0.0, ultra_sparsity=0.9, final_sparsity=0.0, warmup_ratio=0.1,
                     restoration_ratio=0.2, update_interval=100, drop_fraction=0.3)


@pytest.mark.parametrize(
    "step, phase",
    [(0, "warmup"), (99, "warmup"), (100, "ultra"), (101, "ultra"), (799, "ultra"), (800, "restoration"),
     (999, "restoration")],
)
def test_phase_at_boundaries(cfg, step, phase):
    assert schedule.phase(step, T, cfg) == phase


@pytest.mark.parametrize(
    "step, expected",
    [
        (0, 0.0),
        (50, 0.9 - 0.9 * 0.5**3),  # s_u + (s_0 - s_u)(1 - t/Tw)^3
        (99, 0.9 - 0.9 * 0.01**3),
        (100, 0.9),
        (799, 0.9),
        (800, 0.9),  # restoration starts at s_u (tau = 0)
        (850, 0.9 - 0.9 * 0.5**3),  # s_u + (s_f - s_u) tau^3, tau over the restoration's updates [800, 900]
        (900, 0.0),  # the last update of the run reaches final_sparsity
        (999, 0.0),
    ],
)
def test_target_sparsity_cubic(cfg, step, expected):
    assert schedule.target_sparsity(step, T, cfg) == pytest.approx(expected, abs=1e-12)


def test_linear_and_cosine_curves():
    lin = MSTConfig(warmup_curve="linear", restoration_curve="linear", update_interval=100)
    cos = MSTConfig(warmup_curve="cosine", restoration_curve="cosine", update_interval=100)
    assert schedule.target_sparsity(25, T, lin) == pytest.approx(0.9 * 0.25)
    assert schedule.target_sparsity(875, T, lin) == pytest.approx(0.9 * 0.25)
    assert schedule.target_sparsity(25, T, cos) == pytest.approx(0.9 * (1 - math.cos(math.pi * 0.25)) / 2)


def test_update_steps_include_phase_starts_off_the_interval():
    cfg = MSTConfig(warmup_ratio=0.1, restoration_ratio=0.2, update_interval=100)
    steps = schedule.update_steps(1050, cfg)  # warm-up ends at 105, restoration starts at 840
    assert steps == [0, 100, 105, 200, 300, 400, 500, 600, 700, 800, 840, 900, 1000]
    assert not schedule.is_update_step(101, 1050, cfg)


def test_restoration_reaches_final_sparsity_at_last_update_off_the_interval():
    cfg = MSTConfig(warmup_ratio=0.1, restoration_ratio=0.2, update_interval=100, final_sparsity=0.1)
    assert schedule.target_sparsity(1000, 1050, cfg) == pytest.approx(0.1)
    assert schedule.target_sparsity(900, 1050, cfg) > 0.1


@pytest.mark.parametrize("step, expected", [(0, 0.3), (500, 0.15), (250, 0.15 * (1 + math.cos(math.pi / 4)))])
def test_drop_fraction_cosine(cfg, step, expected):
    assert schedule.drop_fraction(step, T, cfg) == pytest.approx(expected)


def test_drop_fraction_restarts_per_phase():
    cfg = MSTConfig(drop_fraction_schedule="cosine_per_phase", drop_fraction=0.4)
    assert schedule.drop_fraction(100, T, cfg) == pytest.approx(0.4)  # ultra phase starts
    assert schedule.drop_fraction(450, T, cfg) == pytest.approx(0.2)  # half way through ultra [100, 800)
    assert schedule.drop_fraction(800, T, cfg) == pytest.approx(0.4)


def test_default_grow_method_per_phase(cfg):
    assert [schedule.grow_method(t, T, cfg) for t in (0, 100, 800)] == ["gradient", "mixed", "gradient"]


def test_hsa_on_only_in_listed_phases(cfg):
    assert [schedule.hsa_active(t, T, cfg) for t in (99, 100, 799, 800)] == [False, True, True, False]
    dense = MSTConfig(hsa_pattern="dense")
    assert not schedule.hsa_active(500, T, dense)


def test_no_warmup_starts_ultra_sparse():
    cfg = MSTConfig(warmup_ratio=0.0, initial_sparsity=0.5)
    assert schedule.phase(0, T, cfg) == "ultra"
    assert schedule.target_sparsity(0, T, cfg) == pytest.approx(0.9)


def test_schedule_module_does_not_import_torch():
    import subprocess
    import sys

    code = (
        "import sys, importlib.util as u;"
        f"spec = u.spec_from_file_location('s', {schedule.__file__!r}); m = u.module_from_spec(spec);"
        "spec.loader.exec_module(m); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
