"""The public names: what `import mst_hf` promises (written out by hand: a removed or renamed name fails here)."""

import importlib

import pytest

import mst_hf

PUBLIC = {
    "FlopMeter", "MSTConfig", "MSTController", "MSTTrainer", "MST_CONFIG_NAME", "MaskState", "PRESETS", "attention",
    "configure_hsa", "find_targets", "get_hsa_state", "last_complete_checkpoint", "layer_sparsities", "load_masks",
    "load_sparse", "merge_lora_sparse", "model_flop_shapes", "plan_run", "pruned_nonzeros", "push_sparse_to_hub",
    "save_masks", "save_sparse", "schedule", "set_hsa_active",
}
SUBMODULES = ["mst_hf.schedule", "mst_hf.topology", "mst_hf.masks", "mst_hf.targets", "mst_hf.config",
              "mst_hf.controller", "mst_hf.trainer", "mst_hf.flops", "mst_hf.plan", "mst_hf.attention",
              "mst_hf.attention.patterns", "mst_hf.io", "mst_hf.io.formats", "mst_hf.io.checkpoint", "mst_hf.io.hub"]


def test_all_is_sorted_and_complete():
    assert list(mst_hf.__all__) == sorted(mst_hf.__all__)
    assert PUBLIC <= set(mst_hf.__all__)
    assert all(hasattr(mst_hf, name) for name in mst_hf.__all__)


@pytest.mark.parametrize("name", SUBMODULES)
def test_documented_modules_import(name):
    assert importlib.import_module(name).__name__ == name


def test_import_registers_the_attention_implementation():
    from transformers import AttentionInterface, AttentionMaskInterface

    assert "mst_hsa" in AttentionInterface._global_mapping and "mst_hsa" in AttentionMaskInterface._global_mapping


def test_public_classes_are_the_documented_bases():
    from transformers import PretrainedConfig, Trainer

    assert issubclass(mst_hf.MSTConfig, PretrainedConfig) and issubclass(mst_hf.MSTTrainer, Trainer)
    assert mst_hf.MSTConfig.model_type == "mst" and mst_hf.MST_CONFIG_NAME == "mst_config.json"


def test_every_config_field_is_documented():
    import dataclasses
    import pathlib

    from mst_hf.config import _MST_FIELDS

    api = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text(encoding="utf-8")
    missing = [f.name for f in dataclasses.fields(mst_hf.MSTConfig) if f.name in _MST_FIELDS
               and f"| `{f.name}` |" not in api]
    assert missing == []
