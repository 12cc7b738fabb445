"""Every way a resume or a load could go silently wrong becomes a clear error (naming the file, the value and the
fix) before anything is loaded, or a warning naming both values: damaged or missing files, a changed run length,
masks or compact files that do not fit the model, hand-edited records."""

import json
import logging
import os
import shutil
import signal
import subprocess
import time
from contextlib import contextmanager

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import TrainingArguments

import mst_hf
from mst_hf import MSTConfig, MSTController, MSTTrainer
from mst_hf.io import MASKS_NAME, STATE_NAME, check_mst_checkpoint

from ..helpers import tiny_gpt2, toy_dataset

N, EVERY = 6, 3


def mst_config():
    return MSTConfig(initial_sparsity=0.4, ultra_sparsity=0.7, final_sparsity=0.3, warmup_ratio=0.3,
                     restoration_ratio=0.3, update_interval=2, hsa_pattern="dense")


def build_trainer(output_dir, model_seed=0, **args_kw):
    args = dict(output_dir=str(output_dir), max_steps=N, per_device_train_batch_size=4, learning_rate=1e-2,
                report_to=[], save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True)
    args.update(args_kw)
    return MSTTrainer(tiny_gpt2(seed=model_seed), TrainingArguments(**args), mst_config=mst_config(),
                      train_dataset=toy_dataset(24, seq_len=16))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished run with checkpoints after steps 3 and 6."""
    out = tmp_path_factory.mktemp("run")
    build_trainer(out, save_strategy="steps", save_steps=EVERY).train()
    return out


@pytest.fixture
def copy(run, tmp_path):
    """A fresh copy of the run's checkpoints to damage."""
    shutil.copytree(run, tmp_path / "run", ignore=shutil.ignore_patterns("runs"))
    return tmp_path / "run"


def weights_and_masks(trainer):
    out = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    out.update({"mask:" + k: v.clone() for k, v in trainer.mst.masks.masks.items()})
    return out


def refused_before_loading(trainer, checkpoint, error, match):
    before = weights_and_masks(trainer)
    with pytest.raises(error, match=match):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    after = weights_and_masks(trainer)
    assert all(torch.equal(before[k], after[k]) for k in before) and trainer.state.global_step == 0


# ---------------------------------------------------------------------------------------------- which checkpoint
DAMAGE = {
    "empty trainer_state.json": lambda ck: (ck / "trainer_state.json").write_text(""),
    "truncated trainer_state.json": lambda ck: (ck / "trainer_state.json").write_text(
        (ck / "trainer_state.json").read_text()[:40]),
    "truncated mask file": lambda ck: (ck / MASKS_NAME).write_bytes((ck / MASKS_NAME).read_bytes()[:-16]),
    "truncated weights": lambda ck: (ck / "model.safetensors").write_bytes(
        (ck / "model.safetensors").read_bytes()[:-100]),
    "empty mst_state.json": lambda ck: (ck / STATE_NAME).write_text(""),
    "no weights": lambda ck: os.remove(ck / "model.safetensors"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_last_complete_checkpoint_skips_a_damaged_newest_checkpoint(damage, copy, caplog):
    DAMAGE[damage](copy / f"checkpoint-{N}")
    with caplog.at_level(logging.WARNING):
        assert mst_hf.last_complete_checkpoint(str(copy)) == str(copy / f"checkpoint-{EVERY}")
    assert f"checkpoint-{N}" in caplog.text  # the skipped folder is named, with its reason


def test_a_save_cut_before_trainer_state_is_refused_before_loading_naming_the_previous_checkpoint(copy, tmp_path):
    os.remove(copy / f"checkpoint-{N}" / "trainer_state.json")  # killed after the MST files, before Trainer's state
    trainer = build_trainer(tmp_path / "new", model_seed=1)
    refused_before_loading(trainer, copy / f"checkpoint-{N}", FileNotFoundError,
                           rf"trainer_state.json.*checkpoint-{EVERY}")


def test_resume_from_a_folder_that_does_not_exist_says_so(copy, tmp_path):
    trainer = build_trainer(tmp_path / "new", model_seed=1)
    with pytest.raises(FileNotFoundError, match="does not exist") as err:
        trainer.train(resume_from_checkpoint=str(copy / "checkpoint-99"))
    assert "not written by MSTTrainer" not in str(err.value) and f"checkpoint-{N}" in str(err.value)


def test_corrupt_weights_are_refused_naming_the_file(copy, tmp_path):
    DAMAGE["truncated weights"](copy / f"checkpoint-{N}")
    trainer = build_trainer(tmp_path / "new", model_seed=1)
    refused_before_loading(trainer, copy / f"checkpoint-{N}", ValueError, r"model\.safetensors.*corrupt")


def test_masks_switched_on_by_hand_without_digests_are_not_resumed(copy, tmp_path):
    """64 pruned positions switched on, the mask file's digest and mst_state.json's `masks_digest` dropped: nothing
    is left to show the edit, so the mask file is refused (a resume never reads an unverified one)."""
    checkpoint = copy / f"checkpoint-{N}"
    with safe_open(str(checkpoint / MASKS_NAME), framework="pt") as f:
        packed = {k: f.get_tensor(k) for k in f.keys()}
    name = next(k for k in packed if not k.endswith(".__shape__"))
    mask = mst_hf.masks.unpack_mask(packed[name], tuple(packed[name + ".__shape__"].tolist()))
    mask.view(-1)[(~mask).view(-1).nonzero()[:64, 0]] = True
    packed[name] = mst_hf.masks.pack_mask(mask)
    save_file(packed, str(checkpoint / MASKS_NAME), metadata={"format": "mst_hf", "version": "1"})
    state = json.loads((checkpoint / STATE_NAME).read_text())
    del state["masks_digest"]
    (checkpoint / STATE_NAME).write_text(json.dumps(state))
    trainer = build_trainer(tmp_path / "new", model_seed=1)
    refused_before_loading(trainer, checkpoint, ValueError, r"mst_masks\.safetensors.*no `digest`")


# ---------------------------------------------------------------------------------------------- crafted folders
def index_to(checkpoint, shard):
    """Give the checkpoint a weight index naming ``shard`` for every weight (as a sharded save would)."""
    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
    index = {"metadata": {}, "weight_map": dict.fromkeys(names, str(shard))}
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps(index))


def without_blocking(fn, fifo, seconds=10):
    """``fn()``'s result or exception, after checking that it took less than ``seconds``. Opening a FIFO blocks
    until a writer comes (holding the GIL, so no thread can watch it): a helper process opens ``fifo`` for writing
    after ``2 * seconds`` to release a blocked call, which then fails the time check."""
    writer = subprocess.Popen(["sh", "-c", f"sleep {2 * seconds}; exec 3> '{fifo}'"])
    start = time.monotonic()
    try:
        out = {"result": fn()}
    except Exception as err:  # handed to the test
        out = {"error": err}
    finally:
        writer.kill()
        writer.wait()
    assert time.monotonic() - start < seconds, f"blocked opening the FIFO {fifo}"
    return out


def test_a_weight_index_naming_a_fifo_neither_blocks_nor_is_read(copy):
    checkpoint = copy / f"checkpoint-{N}"
    os.mkfifo(checkpoint / "shard.safetensors")
    index_to(checkpoint, "shard.safetensors")
    found = without_blocking(lambda: mst_hf.last_complete_checkpoint(str(copy)), checkpoint / "shard.safetensors")
    assert found == {"result": str(copy / f"checkpoint-{EVERY}")}
    controller = MSTController(tiny_gpt2(seed=1), mst_config())
    args = TrainingArguments("unused", max_steps=N, report_to=[], use_cpu=True)
    checked = without_blocking(lambda: check_mst_checkpoint(str(checkpoint), controller, args=args),
                               checkpoint / "shard.safetensors")
    assert isinstance(checked.get("error"), ValueError)
    assert "shard.safetensors" in str(checked["error"]) and "not a regular file" in str(checked["error"])


OUTSIDE = {"absolute path": "{copy}/outside.safetensors", "parent folder": "../outside.safetensors",
           "symlink out": "link.safetensors", "NUL byte": "outside.safetensors\0"}


@pytest.mark.parametrize("where", list(OUTSIDE))
def test_a_weight_index_naming_a_file_outside_the_checkpoint_is_refused(where, copy, tmp_path):
    checkpoint = copy / f"checkpoint-{N}"
    index_to(checkpoint, OUTSIDE[where].format(copy=copy))
    shutil.move(checkpoint / "model.safetensors", copy / "outside.safetensors")
    os.symlink(copy / "outside.safetensors", checkpoint / "link.safetensors")
    trainer = build_trainer(tmp_path / "new", model_seed=1)
    refused_before_loading(trainer, checkpoint, ValueError, r"`weight_map`.*safetensors.*outside the checkpoint")


# ---------------------------------------------------------------------------------------------- silent differences
def test_a_different_run_length_warns_with_both_values(run, caplog):
    controller = MSTController(tiny_gpt2(seed=1), mst_config())
    args = TrainingArguments("unused", max_steps=2 * N, report_to=[], use_cpu=True)
    with caplog.at_level(logging.WARNING):
        check_mst_checkpoint(str(run / f"checkpoint-{EVERY}"), controller, args=args)
    assert f"max_steps={2 * N}" in caplog.text and f"max_steps={N}" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        check_mst_checkpoint(str(run / f"checkpoint-{EVERY}"), controller,
                             args=TrainingArguments("unused", max_steps=N, report_to=[], use_cpu=True))
    assert "max_steps" not in caplog.text


def test_a_different_epoch_count_warns_with_both_values(run, caplog):
    saved_epochs = json.loads((run / f"checkpoint-{EVERY}" / "trainer_state.json").read_text())["num_train_epochs"]
    controller = MSTController(tiny_gpt2(seed=1), mst_config())
    args = TrainingArguments("unused", num_train_epochs=saved_epochs + 2, report_to=[], use_cpu=True)
    with caplog.at_level(logging.WARNING):
        check_mst_checkpoint(str(run / f"checkpoint-{EVERY}"), controller, args=args)
    assert f"num_train_epochs={saved_epochs + 2}" in caplog.text and f"num_train_epochs={saved_epochs}" in caplog.text


@pytest.mark.parametrize("missing", ["optimizer.pt", "scheduler.pt"])
def test_a_missing_optimizer_or_scheduler_file_warns_naming_it(missing, copy, caplog):
    os.remove(copy / f"checkpoint-{EVERY}" / missing)
    controller = MSTController(tiny_gpt2(seed=1), mst_config())
    args = TrainingArguments("unused", max_steps=N, report_to=[], use_cpu=True)
    with caplog.at_level(logging.WARNING):
        check_mst_checkpoint(str(copy / f"checkpoint-{EVERY}"), controller, args=args)
    assert missing in caplog.text and "fresh optimizer state" in caplog.text


# ---------------------------------------------------------------------------------------------- hand-edited records
EDITS = {
    "negative update step": (STATE_NAME, "last_update_step", -3, "last_update_step"),
    "sparsity above 1": (STATE_NAME, "sparsity", 1.5, "sparsity"),
    "history not a list": (STATE_NAME, "history", "none", "history"),
    "FLOPs a string": (STATE_NAME, "flops", {"total_flops": "many"}, "flops.total_flops"),
    "ultra sparsity 5": ("mst_config.json", "ultra_sparsity", 5.0, "ultra_sparsity"),
    "unknown phase": ("mst_config.json", "saved_in_phase", "ultar", "saved_in_phase"),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_hand_edited_records_are_refused_naming_file_and_field(edit, copy, tmp_path):
    name, key, value, field = EDITS[edit]
    path = copy / f"checkpoint-{N}" / name
    data = json.loads(path.read_text())
    data[key] = value
    path.write_text(json.dumps(data))
    trainer = build_trainer(tmp_path / "new", model_seed=1)
    refused_before_loading(trainer, copy / f"checkpoint-{N}", ValueError, rf"{name}.*`{field}`")


# ---------------------------------------------------------------------------------------------- loads that do not fit
def test_load_masks_onto_a_larger_model_is_refused_naming_the_unmasked_weights(run):
    saved = str(run / f"checkpoint-{N}")
    with pytest.raises(ValueError, match=r"transformer\.h\.2\..*strict=False"):
        mst_hf.load_masks(tiny_gpt2(n_layer=3), saved)
    larger = tiny_gpt2(n_layer=3)
    masks = mst_hf.load_masks(larger, saved, strict=False)  # asked for: the two saved layers only
    assert not any(n.startswith("transformer.h.2.") for n in masks.masks) and len(masks.masks) > 0
    assert len(mst_hf.load_masks(tiny_gpt2(), saved).masks) == len(masks.masks)  # same model: accepted


def test_load_sparse_from_an_untied_file_into_a_tied_model_is_refused(tmp_path):
    untied = tiny_gpt2(seed=2, tie_word_embeddings=False)
    with torch.no_grad():
        untied.lm_head.weight.mul_(-1.0)  # differs from the input embedding
    mst_hf.save_sparse(untied, str(tmp_path))
    with pytest.raises(ValueError, match=r"lm_head\.weight.*tied.*tie_word_embeddings=False"):
        mst_hf.load_sparse(str(tmp_path), tiny_gpt2())
    rebuilt = mst_hf.load_sparse(str(tmp_path))  # from the saved config.json: untied, both tensors kept
    assert torch.equal(rebuilt.lm_head.weight, untied.lm_head.weight)
    assert torch.equal(rebuilt.transformer.wte.weight, untied.transformer.wte.weight)


@contextmanager
def time_limit(seconds):
    """Fail (``TimeoutError``) when the block runs longer than ``seconds``; regex matching checks for signals."""
    def expire(*_):
        raise TimeoutError(f"took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("pattern", ["(.*)*Z", "(a+)+$", "(x|x)*y"])
def test_load_masks_refuses_a_saved_catastrophic_target_regex_at_once(pattern, copy):
    """A downloaded folder's mst_config.json is user input: a regex with nested quantifiers would take minutes per
    module name to fail. It is refused before any name is matched."""
    saved = copy / f"checkpoint-{N}"
    data = json.loads((saved / "mst_config.json").read_text())
    data["target_modules"] = pattern
    (saved / "mst_config.json").write_text(json.dumps(data))
    with time_limit(10), pytest.raises(ValueError, match=r"mst_config\.json.*`target_modules`.*nested"):
        mst_hf.load_masks(tiny_gpt2(), str(saved))
