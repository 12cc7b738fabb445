"""MSTConfig: validation of every field, presets, and saving under mst_config.json."""

import json
import os

import pytest

from mst_hf import MST_CONFIG_NAME, MSTConfig

INVALID = [
    ("initial_sparsity", -0.1, ValueError),
    ("ultra_sparsity", 1.0, ValueError),
    ("final_sparsity", "0.5", ValueError),
    ("warmup_ratio", 1.5, ValueError),
    ("restoration_ratio", -0.2, ValueError),
    ("warmup_curve", "quadratic", ValueError),
    ("restoration_curve", "exp", ValueError),
    ("update_interval", 0, ValueError),
    ("update_interval", 2.5, ValueError),
    ("drop_fraction", 1.2, ValueError),
    ("drop_fraction_schedule", "linear", ValueError),
    ("grow_method", "magnitude", ValueError),
    ("grow_method", {"warmup": "gradient"}, ValueError),
    ("grow_method", {"warmup": "gradient", "ultra": "mixed", "restoration": "oracle"}, ValueError),
    ("grow_method", 3, TypeError),
    ("mixed_gradient_fraction", 2.0, ValueError),
    ("sparsity_distribution", "erk", ValueError),
    ("optimizer_state", "sparse", ValueError),
    ("target_modules", [1, 2], TypeError),
    ("exclude_modules", 5, TypeError),
    ("target_modules", "(q|k", ValueError),  # not a regex
    ("exclude_modules", "(.*)*Z", ValueError),  # catastrophic backtracking: would not return on a long name
    ("sparsify_lm_head", "yes", TypeError),
    ("seed", 1.5, TypeError),
    ("hsa_pattern", "bigbird", ValueError),
    ("hsa_window", 0, ValueError),
    ("hsa_stride", -4, ValueError),
    ("hsa_block", 1.5, ValueError),
    ("hsa_phases", ["pretraining"], ValueError),
    ("hsa_layers", "even", ValueError),
    ("hsa_layers", [0, -1], ValueError),
    ("hsa_head_split", 1, TypeError),
]


@pytest.mark.parametrize("field, value, error", INVALID, ids=[f"{f}={v!r}" for f, v, _ in INVALID])
def test_invalid_field_names_field_and_value(field, value, error):
    with pytest.raises(error) as info:
        MSTConfig(**{field: value})
    assert f"`{field}" in str(info.value) and repr(value)[:20] in str(info.value)


def test_phases_that_do_not_fit_the_run():
    with pytest.raises(ValueError, match="warmup_ratio.*restoration_ratio"):
        MSTConfig(warmup_ratio=0.6, restoration_ratio=0.5)


def test_head_split_needs_local_strided():
    with pytest.raises(ValueError, match="hsa_head_split"):
        MSTConfig(hsa_head_split=True, hsa_pattern="local")


def test_defaults_match_spec():
    cfg = MSTConfig()
    assert (cfg.initial_sparsity, cfg.ultra_sparsity, cfg.final_sparsity) == (0.0, 0.9, 0.0)
    assert (cfg.warmup_ratio, cfg.restoration_ratio, cfg.update_interval, cfg.drop_fraction) == (0.1, 0.2, 100, 0.3)
    assert cfg.grow_method == {"warmup": "gradient", "ultra": "mixed", "restoration": "gradient"}
    assert cfg.mixed_gradient_fraction == 0.75 and cfg.hsa_phases == ["ultra"]
    assert cfg.model_type == "mst"


def test_round_trip_keeps_model_config_json(tmp_path):
    model_config = tmp_path / "config.json"
    model_config.write_text('{"model_type": "gpt2"}')
    cfg = MSTConfig(ultra_sparsity=0.8, grow_method="random", hsa_layers=[0, 2], target_modules=["c_attn"])
    cfg.save_pretrained(tmp_path)
    assert model_config.read_text() == '{"model_type": "gpt2"}'
    assert os.path.isfile(tmp_path / MST_CONFIG_NAME)
    loaded = MSTConfig.from_pretrained(tmp_path)
    assert loaded.mst_dict() == cfg.mst_dict()


def test_saved_extra_is_kept_apart(tmp_path):
    MSTConfig().save_pretrained(tmp_path, extra={"saved_at_step": 42})
    assert MSTConfig.saved_extra(tmp_path) == {"saved_at_step": 42}
    assert json.loads((tmp_path / MST_CONFIG_NAME).read_text())["ultra_sparsity"] == 0.9


def test_preset_and_override():
    cfg = MSTConfig.from_preset("gpt2-4x", seed=7)
    assert cfg.seed == 7 and cfg.hsa_pattern != "dense"
    with pytest.raises(ValueError, match="Unknown MST preset 'gpt3'"):
        MSTConfig.from_preset("gpt3")


def test_from_preset_without_a_name_is_the_default_preset():
    from mst_hf.presets import DEFAULT_PRESET, PRESETS

    assert DEFAULT_PRESET == "mst-recommended"
    cfg = MSTConfig.from_preset(seed=3)
    assert cfg.seed == 3
    assert cfg.mst_dict() == MSTConfig(**PRESETS["mst-recommended"], seed=3).mst_dict()


def test_default_recipe_is_constant_sparsity_and_ends_on_dense_attention():
    """The default preset's contract (docs/concepts.md): 80% sparsity at every step, sparse attention for the first
    80% of the steps, dense attention (so the saved model needs no sparse pattern at inference) and the learning-rate
    decay in the last 20%."""
    from mst_hf import schedule

    cfg, total = MSTConfig.from_preset(), 1000
    assert {schedule.target_sparsity(t, total, cfg) for t in range(total)} == {0.8}
    on = [schedule.hsa_active(t, total, cfg) for t in range(total)]
    assert all(on[:800]) and not any(on[800:])
    lr = [schedule.lr_multiplier(t, total, cfg) for t in range(total)]
    assert set(lr[:800]) == {1.0} and lr[-1] < 0.11 and all(a >= b for a, b in zip(lr[800:], lr[801:]))


@pytest.mark.parametrize("typo,meant", [("ultra_sparstiy", "ultra_sparsity"), ("hsa_windw", "hsa_window")])
def test_misspelt_keyword_is_refused_with_the_field_meant(typo, meant):
    with pytest.raises(TypeError, match=rf"`{typo}`.*did you mean `{meant}`"):
        MSTConfig(**{typo: 0.5})


def test_field_set_after_construction_is_validated_and_the_old_value_kept():
    cfg = MSTConfig()
    with pytest.raises(ValueError, match="ultra_sparsity.*5.0"):
        cfg.ultra_sparsity = 5.0
    assert cfg.ultra_sparsity == 0.9
    cfg.ultra_sparsity = 0.8
    assert cfg.ultra_sparsity == 0.8 and MSTConfig.from_dict(cfg.to_dict()).ultra_sparsity == 0.8


def test_misspelt_key_in_a_saved_config_is_refused_by_every_reader(tmp_path):
    """`ultra_sparsty` in mst_config.json would train at the default 0.9: from_pretrained, the planner's --config
    and the checkpoint reader refuse it as the constructor does; save information and other extra keys still load."""
    from mst_hf.io.records import read_mst_config
    from mst_hf.plan import load_mst_config

    MSTConfig(ultra_sparsity=0.8).save_pretrained(tmp_path, extra={"saved_at_step": 3, "run_name": "a"})
    assert MSTConfig.from_pretrained(tmp_path).ultra_sparsity == 0.8
    path = tmp_path / MST_CONFIG_NAME
    path.write_text(json.dumps({**json.loads(path.read_text()), "ultra_sparsty": 0.5}))
    for read in (MSTConfig.from_pretrained, load_mst_config, read_mst_config):
        with pytest.raises((TypeError, ValueError), match=r"unknown key `ultra_sparsty`=0\.5; did you mean "
                                                          r"`ultra_sparsity`") as info:
            read(str(tmp_path))
        assert MST_CONFIG_NAME in str(info.value)


def test_one_sparsity_override_of_a_constant_preset_warns_with_the_schedule_it_makes(caplog):
    import logging

    from mst_hf.arguments import MSTArguments, to_mst_config

    with caplog.at_level(logging.WARNING):
        cfg = MSTConfig.from_preset("mst-recommended", ultra_sparsity=0.9)
    assert (cfg.initial_sparsity, cfg.ultra_sparsity, cfg.final_sparsity) == (0.8, 0.9, 0.8)
    assert ("leaves initial_sparsity, final_sparsity at the preset's 0.8, so the schedule is now 0.8 -> 0.9 -> 0.8"
            in caplog.text and "set initial_sparsity, ultra_sparsity and final_sparsity together" in caplog.text)
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # the example's flags go through the same merge
        to_mst_config(MSTArguments(mst_preset="mst-recommended", mst_final_sparsity=0.5))
        assert "schedule is now 0.8 -> 0.8 -> 0.5" in caplog.text
        caplog.clear()
        MSTConfig.from_preset("mst-recommended", initial_sparsity=0.9, ultra_sparsity=0.9, final_sparsity=0.9)
        MSTConfig.from_preset("mst-3phase", ultra_sparsity=0.8)  # a schedule already: nothing surprising
    assert "MST preset" not in caplog.text
