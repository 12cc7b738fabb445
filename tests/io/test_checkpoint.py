"""Sparse checkpoints: resume equivalence in every phase, kill-and-resume, refusal of bad mask files, plain
transformers loading, and the compact format.

One subprocess (started once the reference run has saved its model, so it overlaps the in-process tests) first
loads that model with plain transformers, mst_hf never imported, and writes its logits; then it imports mst_hf and
becomes the training run that the kill-and-resume test kills with SIGKILL.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import TrainerCallback, TrainingArguments  # noqa: E402

import mst_hf  # noqa: E402
from mst_hf import MSTConfig, MSTController, MSTTrainer, schedule  # noqa: E402
from mst_hf.io import MASKS_NAME, STATE_NAME, load_mst_files, save_mst_files  # noqa: E402

from ..helpers import tiny_gpt2, tiny_llama, toy_dataset  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
N = 20
SAVE_AT = {"warmup": 3, "ultra": 9, "restoration": 16}
KILL_AFTER = 8  # the child saves every 4 steps and is killed one step after checkpoint-8 is complete


def mst_config():
    return MSTConfig(initial_sparsity=0.3, ultra_sparsity=0.8, final_sparsity=0.2, warmup_ratio=0.25,
                     restoration_ratio=0.3, update_interval=2, hsa_pattern="dense",
                     grow_method={"warmup": "gradient", "ultra": "mixed", "restoration": "random"})


class SaveAt(TrainerCallback):
    def __init__(self, steps):
        self.steps = set(steps)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.steps:
            control.should_save = True


def build_trainer(output_dir, model_seed=0, callbacks=(), eval_dataset=None, **args_kw):
    """Same data, schedule and seeds every time; dropout on, so the restored RNG state matters."""
    args = dict(output_dir=str(output_dir), max_steps=N, per_device_train_batch_size=4, learning_rate=1e-2,
                weight_decay=0.1, warmup_steps=2, report_to=[], save_strategy="no", logging_steps=5, use_cpu=True,
                seed=0, full_determinism=True, disable_tqdm=True)
    args.update(args_kw)
    return MSTTrainer(tiny_gpt2(seed=model_seed), TrainingArguments(**args), mst_config=mst_config(),
                      train_dataset=toy_dataset(48, seq_len=16), eval_dataset=eval_dataset, callbacks=list(callbacks))


def snapshot(trainer):
    """Everything a resumed run must reproduce bit for bit."""
    opt = trainer.optimizer.state_dict()
    return {
        "weights": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
        "masks": {k: v.clone() for k, v in trainer.mst.masks.masks.items()},
        "optimizer": {(i, k): v.clone() for i, s in opt["state"].items() for k, v in s.items()},
        "flops": dict(trainer.mst.flops.state_dict()),
        "history": [dict(r) for r in trainer.mst.history],
        "last_update_step": trainer.mst.last_update_step,
    }


def assert_same(a, b):
    for key in ("weights", "masks", "optimizer"):
        assert a[key].keys() == b[key].keys(), key
        different = [k for k in a[key] if not torch.equal(a[key][k], b[key][k])]
        assert not different, f"{key} differ: {different[:5]}"
    assert a["flops"] == b["flops"]
    assert a["history"] == b["history"]
    assert a["last_update_step"] == b["last_update_step"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread here and in the subprocesses: the same reduction order everywhere (bit-exact comparisons
    across processes), and no OpenMP spin contention on a busy 2-core machine (40x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CHILD = """
import sys, torch
from transformers import AutoModelForCausalLM
torch.set_num_threads(1)
model_dir, logits_path, train_dir, repo = sys.argv[1:5]
model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
with torch.no_grad():
    logits = model(input_ids=torch.arange(32).remainder(64).view(2, 16)).logits
if any(m == "mst_hf" or m.startswith("mst_hf.") for m in sys.modules):
    sys.exit("mst_hf was imported")
torch.save(logits, logits_path + ".tmp")
import os; os.replace(logits_path + ".tmp", logits_path)
sys.path.insert(0, repo)
from tests.io.test_checkpoint import train_until_killed
train_until_killed(train_dir)
"""


def train_until_killed(out):
    """The child's training run: a checkpoint every 4 steps; after step KILL_AFTER + 1 it waits to be killed."""

    class Stall(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step > KILL_AFTER:
                time.sleep(600)

    build_trainer(out, callbacks=[Stall()], save_strategy="steps", save_steps=4).train()
    open(os.path.join(out, "finished"), "w").close()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run of N steps that leaves checkpoints at a step inside each phase; then its saved model
    and the subprocess (plain load, then the run to kill)."""
    out = tmp_path_factory.mktemp("reference")
    trainer = build_trainer(out, callbacks=[SaveAt(SAVE_AT.values())])
    trainer.train()
    expected = snapshot(trainer)
    trainer.save_model(str(out / "model"))
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "OMP_NUM_THREADS": "1"}
    with open(out / "child.log", "w") as log:  # a file, not a pipe: a full pipe would block the child
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(out / "model"), str(out / "logits.pt"), str(out / "killed"), REPO],
            cwd=str(out), env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    yield trainer, expected, out, child
    if child.poll() is None:
        child.kill()
        child.wait()


def _wait_for(path, child, log, timeout=300):
    deadline = time.time() + timeout
    while not path.exists() and child.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    if not path.exists():
        child.kill()
        child.wait()
        raise AssertionError(f"{path.name} never appeared; the subprocess said: {log.read_text()[-3000:]}")


@pytest.mark.parametrize("phase", list(SAVE_AT))
def test_resume_in_each_phase_is_bit_identical(phase, reference, tmp_path):
    _, expected, out, _ = reference
    step = SAVE_AT[phase]
    assert schedule.phase(step, N, mst_config()) == phase
    checkpoint = out / f"checkpoint-{step}"
    assert {MASKS_NAME, STATE_NAME, "mst_config.json", "optimizer.pt", "rng_state.pth"} <= set(os.listdir(checkpoint))
    # A different initial model: its weights and initial random masks must be replaced by the checkpoint's.
    trainer = build_trainer(tmp_path, model_seed=1)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert_same(snapshot(trainer), expected)


def test_restore_resets_the_attention_cache_and_keeps_the_update_step(reference):
    _, _, out, _ = reference
    controller = MSTController(tiny_gpt2(seed=1), mst_config())
    controller.hsa_on = True  # stale: the model's attention state is not in the checkpoint
    state = load_mst_files(str(out / f"checkpoint-{SAVE_AT['ultra']}"), controller)
    assert controller.hsa_on is None
    assert controller.last_update_step == state["last_update_step"] == 8
    assert controller.flops.total_flops == state["flops"]["total_flops"] > 0


def test_last_complete_checkpoint_skips_an_interrupted_save(reference, tmp_path):
    _, _, out, _ = reference  # real files: the MST files and trainer_state.json are validated, not only present
    shutil.copytree(out / f"checkpoint-{SAVE_AT['warmup']}", tmp_path / "checkpoint-4")
    (tmp_path / "checkpoint-8").mkdir()
    shutil.copy(out / f"checkpoint-{SAVE_AT['ultra']}" / MASKS_NAME, tmp_path / "checkpoint-8" / MASKS_NAME)
    assert mst_hf.last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-4")


def test_load_best_model_at_end_brings_the_best_checkpoints_masks(tmp_path):
    trainer = build_trainer(tmp_path, max_steps=8, eval_strategy="steps", eval_steps=4, save_strategy="steps",
                            save_steps=4, load_best_model_at_end=True, metric_for_best_model="loss",
                            greater_is_better=True, eval_dataset=toy_dataset(8, seq_len=16, seed=1))
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best == str(tmp_path / "checkpoint-4")  # the worse loss "wins": the masks must go back to step 4's
    saved = mst_hf.load_masks(tiny_gpt2(seed=1), best, apply=False)
    assert trainer.mst.masks.digest() == saved.digest()
    assert all(not t.param.detach()[~trainer.mst.masks.masks[n]].any() for n, t in trainer.mst.targets.items())


# ---------------------------------------------------------------------------------------------- refusals
def _masks_of(model, directory):
    controller = MSTController(model, mst_config())
    save_mst_files(str(directory), controller)


def _flip_payload_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "truncated": (lambda ck, tmp: ck.joinpath(MASKS_NAME).write_bytes(ck.joinpath(MASKS_NAME).read_bytes()[:-40]),
                  ValueError, "corrupt"),
    "garbage header": (lambda ck, tmp: ck.joinpath(MASKS_NAME).write_bytes(b"\x13\x37" * 64), ValueError, "corrupt"),
    "flipped bits": (lambda ck, tmp: _flip_payload_byte(ck / MASKS_NAME), ValueError, "digest"),
    "not a mask file": (lambda ck, tmp: save_file({"x": torch.zeros(3)}, str(ck / MASKS_NAME)), ValueError,
                        "not an mst_hf mask file"),
    "other shapes": (lambda ck, tmp: (_masks_of(tiny_gpt2(n_embd=48), tmp),
                                      shutil.copy(tmp / MASKS_NAME, ck / MASKS_NAME)), ValueError, "shape"),
    "other names": (lambda ck, tmp: (_masks_of(tiny_llama(), tmp), shutil.copy(tmp / MASKS_NAME, ck / MASKS_NAME)),
                    ValueError, "does not match the model"),
    "another run": (lambda ck, tmp: shutil.copy(ck.parent / f"checkpoint-{SAVE_AT['warmup']}" / MASKS_NAME,
                                                ck / MASKS_NAME), ValueError, "another run"),
    "missing": (lambda ck, tmp: os.remove(ck / MASKS_NAME), FileNotFoundError, "no mst_masks"),
    "state of another save": (lambda ck, tmp: shutil.copy(ck.parent / f"checkpoint-{SAVE_AT['warmup']}" / STATE_NAME,
                                                          ck / STATE_NAME), ValueError, "different saves"),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_bad_mask_files_are_refused_before_anything_changes(kind, reference, tmp_path):
    _, _, out, _ = reference
    corrupt, error, message = CORRUPTIONS[kind]
    root = tmp_path / "run"
    shutil.copytree(out / f"checkpoint-{SAVE_AT['warmup']}", root / f"checkpoint-{SAVE_AT['warmup']}")
    checkpoint = root / f"checkpoint-{SAVE_AT['ultra']}"
    shutil.copytree(out / checkpoint.name, checkpoint)
    (tmp_path / "other").mkdir()
    corrupt(checkpoint, tmp_path / "other")
    trainer = build_trainer(tmp_path / "new", model_seed=1)
    before = snapshot_weights_and_masks(trainer)
    with pytest.raises(error, match=message):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    after = snapshot_weights_and_masks(trainer)
    assert all(torch.equal(before[k], after[k]) for k in before) and trainer.state.global_step == 0


def snapshot_weights_and_masks(trainer):
    out = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    out.update({"mask:" + k: v.clone() for k, v in trainer.mst.masks.masks.items()})
    return out


# ---------------------------------------------------------------------------------------------- compact format
def _bitwise_equal(a, b):
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))


def _sparse_model(sparsity, dtype):
    model = tiny_gpt2(n_embd=128, vocab_size=512, n_positions=32).to(dtype)
    cfg = MSTConfig(initial_sparsity=sparsity, sparsity_distribution="uniform", hsa_pattern="dense")
    controller = MSTController(model, cfg)
    weight, mask = controller.masks.params["transformer.h.0.mlp.c_fc.weight"], controller.masks.masks[
        "transformer.h.0.mlp.c_fc.weight"]
    active = mask.flatten().nonzero().flatten()
    with torch.no_grad():  # active weights that are exactly +0.0 and -0.0 must survive bit for bit
        weight.view(-1)[active[0]] = 0.0
        weight.view(-1)[active[1]] = -0.0
    return model, controller


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_compact_round_trip_is_bit_exact(sparsity, dtype, tmp_path, capsys):
    model, controller = _sparse_model(sparsity, dtype)
    model.save_pretrained(str(tmp_path / "dense"))
    path = mst_hf.save_sparse(model, str(tmp_path / "compact"), masks=controller)
    ratio = os.path.getsize(path) / os.path.getsize(tmp_path / "dense" / "model.safetensors")
    with capsys.disabled():
        print(f"\ncompact/dense safetensors size at sparsity {sparsity} ({dtype}): {ratio:.3f}")
    assert ratio < {0.5: 0.6, 0.9: 0.2}[sparsity]
    assert "lm_head.weight:values" not in load_file(path) and "lm_head.weight" not in load_file(path)  # tied: once

    fresh = tiny_gpt2(seed=7, n_embd=128, vocab_size=512, n_positions=32).to(dtype)
    loaded = mst_hf.load_sparse(str(tmp_path / "compact"), fresh)
    rebuilt = mst_hf.load_sparse(str(tmp_path / "compact"))  # model built from the saved config.json, saved dtype
    original = model.state_dict()
    for other in (loaded, rebuilt):
        state = other.state_dict()
        assert state.keys() == original.keys()
        assert all(_bitwise_equal(state[k], original[k]) for k in original)
    assert rebuilt.lm_head.weight.data_ptr() == rebuilt.transformer.wte.weight.data_ptr()
    assert mst_hf.load_masks(fresh, path, apply=False).digest() == controller.masks.digest()


def test_compact_without_masks_is_bit_exact_and_rejects_corruption(tmp_path):
    model, _ = _sparse_model(0.9, torch.float32)
    path = mst_hf.save_sparse(model, str(tmp_path / "m.safetensors"))
    state = mst_hf.load_sparse(path, tiny_gpt2(seed=3, n_embd=128, vocab_size=512, n_positions=32)).state_dict()
    assert all(_bitwise_equal(state[k], v) for k, v in model.state_dict().items())
    _flip_payload_byte(tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="corrupt"):
        mst_hf.load_sparse(path, model)


def test_compact_refuses_masks_that_would_lose_weights(tmp_path):
    model, controller = _sparse_model(0.5, torch.float32)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.fill_(1.0)  # non-zero where pruned
    with pytest.raises(ValueError, match="lose them"):
        mst_hf.save_sparse(model, str(tmp_path), masks=controller)
    with pytest.raises(ValueError, match="dtype|float"):
        mst_hf.save_sparse(tiny_gpt2(n_embd=128, vocab_size=512, n_positions=32), str(tmp_path / "ok"))
        mst_hf.load_sparse(str(tmp_path / "ok"), tiny_gpt2(n_embd=128, vocab_size=512, n_positions=32).half())


# ---------------------------------------------------------------------------------------------- saved models
# These two wait for the subprocess: last in the file, so it starts up while the tests above run.
def test_saved_model_loads_in_plain_transformers_with_same_logits(reference):
    trainer, _, out, child = reference
    model_dir = out / "model"
    expected_files = {"config.json", "model.safetensors", "mst_config.json", MASKS_NAME, STATE_NAME}
    assert expected_files <= set(os.listdir(model_dir))
    saved = json.loads((model_dir / "mst_config.json").read_text())
    assert (saved["saved_at_step"], saved["saved_in_phase"], saved["hsa_active"]) == (N, "restoration", False)
    assert saved["ultra_sparsity"] == 0.8
    weights = load_file(str(model_dir / "model.safetensors"))
    masks = trainer.mst.masks.masks
    assert all(not weights[n][~m].any() for n, m in masks.items()) and trainer.mst.masks.sparsity() > 0.1

    _wait_for(out / "logits.pt", child, out / "child.log")  # written by the subprocess that never imported mst_hf
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(input_ids=torch.arange(32).remainder(64).view(2, 16)).logits
    assert torch.equal(torch.load(out / "logits.pt"), expected)


def test_load_masks_reattaches_saved_masks(reference, tmp_path):
    trainer, _, _, _ = reference
    trainer.save_model(str(tmp_path))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    masks = mst_hf.load_masks(model, str(tmp_path))
    assert masks.digest() == trainer.mst.masks.digest()
    assert masks.params["transformer.h.0.attn.c_attn.weight"] is model.transformer.h[0].attn.c_attn.weight
    fresh = build_trainer(tmp_path / "continue", model_seed=1)  # continue MST training from the saved masks
    mst_hf.load_masks(fresh, str(tmp_path))
    assert fresh.mst.masks.digest() == trainer.mst.masks.digest()
    with pytest.raises(ValueError, match="shape"):
        mst_hf.load_masks(tiny_gpt2(n_embd=48), str(tmp_path))


# ---------------------------------------------------------------------------------------------- kill and resume
def test_sigkill_then_resume_from_last_checkpoint(reference, tmp_path):
    _, expected, out, child = reference
    marker = out / "killed" / f"checkpoint-{KILL_AFTER}" / "trainer_state.json"
    _wait_for(marker, child, out / "child.log")
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL and not (out / "killed" / "finished").exists()
    last = mst_hf.last_complete_checkpoint(str(out / "killed"))
    assert last == str(out / "killed" / f"checkpoint-{KILL_AFTER}")
    trainer = build_trainer(out / "killed", model_seed=1)
    trainer.train(resume_from_checkpoint=last)
    assert_same(snapshot(trainer), expected)
