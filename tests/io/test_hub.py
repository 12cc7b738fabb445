"""Pushing MST models: the exact files each upload path sends, and the model card, with the Hub client intercepted
(no network: HfApi.create_repo and HfApi.upload_folder are replaced, every other request path raises)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import math  # noqa: E402
import re  # noqa: E402
from concurrent.futures import Future  # noqa: E402
from pathlib import Path  # noqa: E402

import huggingface_hub  # noqa: E402
import pytest  # noqa: E402
from huggingface_hub import ModelCard, RepoUrl  # noqa: E402
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects  # noqa: E402
from transformers import TrainingArguments  # noqa: E402

import mst_hf  # noqa: E402
from mst_hf import MSTConfig, MSTTrainer  # noqa: E402
from mst_hf.io import MASKS_NAME  # noqa: E402

from ..helpers import tiny_gpt2, toy_dataset  # noqa: E402

MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors"}
MST_FILES = {"mst_config.json", "mst_masks.safetensors", "mst_state.json"}


class FakeHub:
    """Records what would be uploaded: for each upload_folder call, the files it selects (with the real pattern
    filter and default ignores of huggingface_hub) and their bytes at call time."""

    def __init__(self, monkeypatch):
        self.repos, self.uploads = [], []
        hub = self

        def create_repo(api, repo_id, *args, **kwargs):
            hub.repos.append(repo_id)
            return RepoUrl(f"https://huggingface.co/{repo_id if '/' in repo_id else 'me/' + repo_id}")

        def upload_folder(api, *, repo_id, folder_path, path_in_repo=None, allow_patterns=None, ignore_patterns=None,
                          run_as_future=False, commit_message=None, **kwargs):
            ignore = [ignore_patterns] if isinstance(ignore_patterns, str) else list(ignore_patterns or [])
            root = Path(folder_path)
            files = sorted(p.relative_to(root).as_posix() for p in root.glob("**/*") if p.is_file())
            ignore += DEFAULT_IGNORE_PATTERNS
            kept = filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore)
            hub.uploads.append({"repo_id": repo_id, "path_in_repo": path_in_repo, "message": commit_message,
                                "files": {f: (root / f).read_bytes() for f in kept}})
            if run_as_future:
                future = Future()
                future.set_result(None)
                return future
            return f"https://huggingface.co/{repo_id}/commit/0"

        def no_network(*args, **kwargs):
            raise AssertionError("a Hub request escaped the interception")

        monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
        monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
        for name in ("create_commit", "upload_file", "preupload_lfs_files", "model_info"):
            monkeypatch.setattr(huggingface_hub.HfApi, name, no_network)



def mst_config():
    return MSTConfig(initial_sparsity=0.5, ultra_sparsity=0.8, final_sparsity=0.6, warmup_ratio=0.2,
                     restoration_ratio=0.2, update_interval=2, hsa_pattern="dense")


def pushing_trainer(tmp_path, **args_kw):
    args = dict(output_dir=str(tmp_path / "run"), max_steps=10, per_device_train_batch_size=4, learning_rate=1e-2,
                report_to=[], use_cpu=True, seed=0, disable_tqdm=True, logging_steps=5, push_to_hub=True,
                hub_model_id="me/mst-tiny", hub_strategy="every_save", save_strategy="steps", save_steps=5)
    args.update(args_kw)
    return MSTTrainer(tiny_gpt2(), TrainingArguments(**args), mst_config=mst_config(),
                      train_dataset=toy_dataset(40, seq_len=16), eval_dataset=toy_dataset(8, seq_len=16, seed=1))


def test_trainer_push_uploads_model_mst_files_and_card(tmp_path, monkeypatch):
    hub = FakeHub(monkeypatch)
    trainer = pushing_trainer(tmp_path)
    trainer.train()
    eval_loss = trainer.evaluate()["eval_loss"]

    # Every checkpoint push carries the masks of that checkpoint (Trainer alone would copy only its own files).
    checkpoint_pushes = [u for u in hub.uploads if u["message"].startswith("Training in progress")]
    assert len(checkpoint_pushes) == 2
    for upload, step in zip(checkpoint_pushes, (5, 10)):
        masks = (tmp_path / "run" / f"checkpoint-{step}" / MASKS_NAME).read_bytes()
        assert upload["files"][MASKS_NAME] == masks and MST_FILES <= set(upload["files"])

    trainer.push_to_hub()
    final = hub.uploads[-1]
    assert final["repo_id"] == "me/mst-tiny"
    assert set(final["files"]) == MODEL_FILES | MST_FILES | {"README.md", "training_args.bin"}
    card = ModelCard(final["files"]["README.md"].decode())
    assert {"mst", "sparse"} <= set(card.data.tags)
    reduction = trainer.mst.flops.flop_reduction
    assert reduction > 1.0
    assert f"{reduction:.3f}x (counted matmul FLOPs, not a measured time)" in card.text
    assert f"| Perplexity (exp of eval loss) | {math.exp(eval_loss):.4g} |" in card.text
    sparsity = 100 * trainer.mst.masks.sparsity()
    assert f"| Final global sparsity of the sparsified weights | {sparsity:.2f}% |" in card.text
    assert "| `ultra_sparsity` | `0.8` |" in card.text and "| `update_interval` | `2` |" in card.text
    assert card.text.count("## Mixed Sparsity Training") == 1


def test_push_sparse_to_hub_from_a_model_with_compact_file(tmp_path, monkeypatch):
    hub = FakeHub(monkeypatch)
    model = tiny_gpt2()
    controller = mst_hf.MSTController(model, mst_config())
    mst_hf.push_sparse_to_hub(model, "me/compact", masks=controller, compact=True,
                              metrics={"mst/flop_reduction": 3.25, "eval_loss": 2.0})
    upload = hub.uploads[-1]
    assert hub.repos == ["me/compact"] and upload["repo_id"] == "me/compact"
    assert set(upload["files"]) == MODEL_FILES | MST_FILES | {"README.md", "mst_sparse.safetensors"}
    card = ModelCard(upload["files"]["README.md"].decode())
    assert "3.250x (counted matmul FLOPs" in card.text and f"{math.exp(2.0):.4g}" in card.text
    assert "`initial_sparsity` | `0.5`" in card.text and {"mst", "sparse"} <= set(card.data.tags)
    saved = tmp_path / "masks.safetensors"
    saved.write_bytes(upload["files"][MASKS_NAME])
    assert mst_hf.load_masks(tiny_gpt2(), str(saved)).digest() == controller.masks.digest()


def test_push_sparse_to_hub_from_a_saved_directory_skips_checkpoints(tmp_path, monkeypatch):
    hub = FakeHub(monkeypatch)
    trainer = pushing_trainer(tmp_path, push_to_hub=False, save_strategy="no", max_steps=4)
    trainer.train()
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    (out / "checkpoint-2").mkdir()
    (out / "checkpoint-2" / "optimizer.pt").write_bytes(b"x")
    (out / "_scratch.txt").write_text("temporary")
    mst_hf.push_sparse_to_hub(str(out), "me/from-dir")
    assert set(hub.uploads[-1]["files"]) == MODEL_FILES | MST_FILES | {"README.md", "training_args.bin"}


def test_push_refuses_a_corrupt_mask_file_before_uploading(tmp_path, monkeypatch):
    hub = FakeHub(monkeypatch)
    model = tiny_gpt2()
    controller = mst_hf.MSTController(model, mst_config())
    out = tmp_path / "saved"
    model.save_pretrained(str(out))
    mst_hf.io.save_mst_files(str(out), controller)
    data = bytearray((out / MASKS_NAME).read_bytes())
    data[-1] ^= 0xFF
    (out / MASKS_NAME).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt"):
        mst_hf.push_sparse_to_hub(str(out), "me/bad")
    assert hub.uploads == [] and hub.repos == []


def test_card_says_how_to_load_a_model_saved_with_sparse_attention_on(tmp_path):
    """A model saved while HSA was on is evaluated as trained only with the "mst_hsa" attention: the card says so,
    and that load does reproduce the saved model's outputs (a plain load does not)."""
    import torch
    from transformers import AutoModelForCausalLM

    from mst_hf.io.hub import model_card_section

    assert 'attn_implementation="mst_hsa"' in model_card_section({"hsa_active": True})
    assert "mst_hsa" not in model_card_section({"hsa_active": False})
    model = tiny_gpt2()
    model.set_attn_implementation("mst_hsa")
    mst_hf.configure_hsa(model, pattern="local", window=4, stride=4, block=4, active=True)
    x = torch.randint(0, model.config.vocab_size, (1, 32))
    model.eval().save_pretrained(tmp_path)
    with torch.no_grad():
        saved = model(x).logits
        as_trained = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="mst_hsa").eval()(x).logits
        plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()(x).logits
    assert torch.allclose(saved, as_trained, atol=1e-5) and not torch.allclose(saved, plain, atol=1e-3)


# ---------------------------------------------------------------------------------------------- crafted card values
CRAFTED = {  # a value in the files (or the info dict) the card is built from, and the field the error names
    "a metric that is text": ({"metrics": {"eval_loss": "low"}}, r"`metrics\['eval_loss'\]`"),
    "a FLOP reduction that is a list": ({"metrics": {"mst/flop_reduction": [3]}},
                                        r"`metrics\['mst/flop_reduction'\]`"),
    "a sparsity that is text": ({"sparsity": "80%"}, "`sparsity`"),
    "a step that is text": ({"saved_at_step": "ten"}, "`saved_at_step`"),
    "a config value JSON cannot write": ({"target_modules": {"c_attn"}}, "`target_modules`"),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_a_crafted_card_value_is_refused_naming_it(case, tmp_path):
    info, field = CRAFTED[case]
    with pytest.raises(ValueError, match=rf"{field}.*is"):
        mst_hf.io.write_model_card(str(tmp_path), info)


def test_card_values_cannot_break_the_card(tmp_path):
    """A regex with `|`, a backtick, a newline or the section's end marker stays inside its table cell, and a huge
    eval loss gives an infinite perplexity instead of an OverflowError."""
    from mst_hf.io.hub import CARD_END, CARD_START

    regex = "h\\.\\d+\\.(attn|mlp)`x`\n" + CARD_END
    info = {"target_modules": regex, "metrics": {"eval_loss": 1e6}}
    mst_hf.io.write_model_card(str(tmp_path), info, title="two\nlines | title")
    path = mst_hf.io.write_model_card(str(tmp_path), info)  # rewritten: the earlier section is replaced, not kept
    text = Path(path).read_text()
    assert text.count(CARD_START) == 1 and text.count(CARD_END) == 1
    row = next(line for line in text.splitlines() if line.startswith("| `target_modules`"))
    assert len(re.findall(r"(?<!\\)\|", row)) == 3  # two cells: every `|` of the value is escaped
    assert "| Perplexity (exp of eval loss) | inf |" in text and "# two lines" in text


def test_an_existing_card_with_unreadable_metadata_is_refused_naming_it(tmp_path):
    (tmp_path / "README.md").write_text("---\ntags: 5\n---\n\n# model\n")
    with pytest.raises(ValueError, match=r"README\.md.*tags"):
        mst_hf.io.write_model_card(str(tmp_path), {"sparsity": 0.5})


def test_card_of_an_incomplete_flop_count_says_so_instead_of_a_reduction():
    """Steps closed with no batch counted leave the FLOP totals incomplete: the card and the saved metrics carry no
    reduction (a NaN would print as `nanx`, and a partial count as a wrong one) but say how many steps are missing."""
    import torch

    from mst_hf import MSTController
    from mst_hf.io.hub import collect_metrics, controller_card_info, model_card_section

    model = tiny_gpt2()
    ctl = MSTController(model, MSTConfig(hsa_pattern="dense"))
    batch = {k: torch.stack([r[k] for r in toy_dataset(2)]) for k in ("input_ids", "labels")}
    for step in range(3):
        ctl.before_forward(step, 10, batch if step < 2 else None)
        model(**batch).loss.backward()
        ctl.after_backward(step, 10)
    metrics = collect_metrics([{"mst/flop_reduction": float("nan"), "eval_loss": 3.0}], ctl)
    assert "mst/flop_reduction" not in metrics and metrics["mst/uncounted_steps"] == 1
    section = model_card_section(controller_card_info(ctl, 3, 10, metrics))
    assert "| Counted training FLOP reduction vs. dense | not known: 1 optimizer step(s) ran without" in section
    assert "nan" not in section.lower()
