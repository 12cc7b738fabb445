"""The hot-path contract: an optimizer step without a topology update makes no host sync in mst_hf code, masks
once (the gradients), builds no HSA spec, and still keeps every pruned weight at exactly +0.0."""

import pathlib
import sys

import pytest
import torch
from transformers import TrainingArguments

from mst_hf import MSTConfig, MSTController, MSTTrainer
from mst_hf.controller import keeps_pruned_zero
from mst_hf.masks import MaskState

from .helpers import tiny_gpt2, tiny_llama, toy_dataset

TOTAL, TRACKED = 200, 10  # one update at step 0 (outside the tracked steps), the next at step 100
PACKAGE = str(pathlib.Path(__file__).resolve().parents[1] / "mst_hf")
TORCH = str(pathlib.Path(torch.__file__).resolve().parent)


def _cfg(**kw):
    base = dict(initial_sparsity=0.8, ultra_sparsity=0.8, final_sparsity=0.8, warmup_ratio=0.0, restoration_ratio=0.2,
                update_interval=100, hsa_pattern="local", hsa_window=4, hsa_stride=4, hsa_block=4,
                hsa_phases=["ultra"])
    base.update(kw)
    return MSTConfig(**base)


def _batch(step: int, seq: int = 16):
    rows = toy_dataset(n=4, seq_len=seq, seed=step)
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def _step(model, ctl, optimizer, step):
    batch = _batch(step)
    ctl.before_forward(step, TOTAL, batch)
    model(**batch).loss.backward()
    ctl.after_backward(step, TOTAL, optimizer)
    optimizer.step()
    optimizer.zero_grad()
    ctl.after_optimizer_step(optimizer)


class _SyncSpy:
    """Counts host syncs (``.item()``, ``bool(t)``, ``.tolist()``, ``.cpu()``, ``.numpy()``, ``int/float(t)``,
    ``torch.cuda.synchronize``) whose first caller outside torch is a file of mst_hf."""

    METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__")

    def __init__(self, monkeypatch):
        self.calls = []
        for name in self.METHODS:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, getattr(torch.Tensor, name)))
        monkeypatch.setattr(torch.cuda, "synchronize", self._wrap("cuda.synchronize", torch.cuda.synchronize))

    def _wrap(self, name, original):
        spy = self

        def wrapper(*args, **kwargs):
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.startswith(TORCH):
                frame = frame.f_back
            if frame is not None and frame.f_code.co_filename.startswith(PACKAGE):
                spy.calls.append(f"{name} at {frame.f_code.co_filename}:{frame.f_lineno}")
            return original(*args, **kwargs)

        return wrapper


@pytest.mark.parametrize("make_model", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_steps_without_update_make_no_host_sync_and_build_no_hsa_spec(monkeypatch, make_model):
    from mst_hf.attention import patterns

    model = make_model()
    ctl = MSTController(model, _cfg())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _step(model, ctl, optimizer, 0)  # the update step, and the first forward at this length
    built = []
    original_init = patterns.HSASpec.__init__

    def counting_init(self, *args, **kwargs):
        built.append(1)
        original_init(self, *args, **kwargs)

    monkeypatch.setattr(patterns.HSASpec, "__init__", counting_init)
    spy = _SyncSpy(monkeypatch)
    for step in range(1, 1 + TRACKED):
        _step(model, ctl, optimizer, step)
    assert ctl.hsa_on and ctl.last_update_step == 0
    assert spy.calls == []
    assert built == []


def _count_masking_passes(monkeypatch, optimizer_type, **opt_kw):
    model = tiny_gpt2()
    ctl = MSTController(model, _cfg(hsa_pattern="dense"))
    optimizer = optimizer_type(model.parameters(), lr=1e-3, **opt_kw)
    _step(model, ctl, optimizer, 0)
    passes = []
    original = MaskState._keep_active
    monkeypatch.setattr(MaskState, "_keep_active", lambda self, t, m: (passes.append(1), original(self, t, m)))
    for step in range(1, 1 + TRACKED):
        _step(model, ctl, optimizer, step)
    return len(passes)


def test_one_masking_pass_per_step_with_adamw(monkeypatch):
    assert _count_masking_passes(monkeypatch, torch.optim.AdamW, weight_decay=0.1) == TRACKED


def test_other_optimizers_are_re_masked_after_each_step(monkeypatch):
    assert _count_masking_passes(monkeypatch, torch.optim.RMSprop) == 2 * TRACKED


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("optimizer_type", [torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD])
def test_pruned_weights_stay_exactly_zero_in_bf16_without_re_masking(optimizer_type, foreach):
    model = tiny_llama().to(torch.bfloat16)
    ctl = MSTController(model, _cfg(hsa_pattern="dense"))
    extra = {"momentum": 0.9} if optimizer_type is torch.optim.SGD else {}
    optimizer = optimizer_type(model.parameters(), lr=1e-2, weight_decay=0.1, foreach=foreach, **extra)
    assert keeps_pruned_zero(optimizer)
    for step in range(TRACKED):
        _step(model, ctl, optimizer, step)
    for name, t in ctl.targets.items():
        pruned = t.param.detach()[~ctl.masks.masks[name]]
        assert pruned.numel() > 0
        assert torch.equal(pruned, torch.zeros_like(pruned)) and not torch.signbit(pruned).any(), name
        assert t.param.detach()[ctl.masks.masks[name]].abs().sum() > 0  # the active weights did train


class _NoisyAdamW(torch.optim.AdamW):
    """An optimizer that writes into every weight (as a non-standard update rule could)."""

    @torch.no_grad()
    def step(self, closure=None):
        out = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(1e-3)
        return out


def test_an_optimizer_of_unknown_behaviour_gets_pruned_weights_re_zeroed():
    model = tiny_gpt2()
    ctl = MSTController(model, _cfg(hsa_pattern="dense"))
    optimizer = _NoisyAdamW(model.parameters(), lr=1e-3)
    assert not keeps_pruned_zero(optimizer)
    for step in range(3):
        _step(model, ctl, optimizer, step)
    for name, t in ctl.targets.items():
        assert not t.param.detach()[~ctl.masks.masks[name]].any(), name


def test_trainer_hands_its_optimizer_to_the_controller(tmp_path, monkeypatch):
    seen = []
    original = MSTController.after_optimizer_step
    monkeypatch.setattr(MSTController, "after_optimizer_step",
                        lambda self, optimizer=None: (seen.append(optimizer), original(self, optimizer)))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, use_cpu=True,
                             report_to=[], save_strategy="no", disable_tqdm=True)
    MSTTrainer(tiny_gpt2(), args, mst_config=_cfg(hsa_pattern="dense"), train_dataset=toy_dataset(12, 16)).train()
    assert len(seen) == 3 and all(keeps_pruned_zero(o) for o in seen)


def _dense_weights_cfg(**kw):
    return _cfg(initial_sparsity=0.0, ultra_sparsity=0.0, final_sparsity=0.0, update_interval=2, **kw)


def test_hsa_alone_does_no_weight_work(monkeypatch):
    model = tiny_gpt2()
    ctl = MSTController(model, _dense_weights_cfg())
    optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-3)  # not zero-keeping: would be re-masked per step
    passes = []
    original = MaskState._keep_active
    monkeypatch.setattr(MaskState, "_keep_active", lambda self, t, m: (passes.append(1), original(self, t, m)))
    for step in range(6):
        _step(model, ctl, optimizer, step)
    assert ctl.weights_stay_dense and ctl.hsa_on
    assert passes == [] and ctl.history == [] and ctl.last_update_step is None
    assert ctl.masks.sparsity() == 0.0


def test_loaded_sparse_masks_are_kept_although_the_schedule_is_dense():
    model = tiny_gpt2()
    sparse = MSTController(tiny_gpt2(), _cfg(hsa_pattern="dense"))  # 80% masks to load
    ctl = MSTController(model, _dense_weights_cfg(hsa_pattern="dense"))
    ctl.masks.load_state_dict(sparse.masks.state_dict())
    assert not ctl.weights_stay_dense
    optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-3)
    _step(model, ctl, optimizer, 1)  # not an update step: the loaded masks hold, pruned weights stay zero
    for name, t in ctl.targets.items():
        assert not t.param.detach()[~ctl.masks.masks[name]].any(), name
    assert ctl.masks.sparsity() > 0.5


def test_an_update_step_counts_each_layer_once_per_change_not_again_after_it(monkeypatch):
    """An update step needs host numbers (how many weights to drop and grow), but the counts a layer already has are
    not taken again: the active count before the update comes from the cache and the one after it from
    ``before - removed + added``. Syncs left per layer: the removed and the added count."""
    model = tiny_llama()
    ctl = MSTController(model, _cfg(hsa_pattern="dense"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(3):
        _step(model, ctl, optimizer, step)
    ctl.masks.sparsity()  # every count cached, as after any earlier update or log
    spy = _SyncSpy(monkeypatch)
    _step(model, ctl, optimizer, 100)  # an update step
    assert ctl.last_update_step == 100
    assert len(spy.calls) <= 2 * len(ctl.targets) + 1  # + the finite-gradient check
    counted = {n: int(m.sum()) for n, m in ctl.masks.masks.items()}
    assert all(ctl.masks.active(n) == c for n, c in counted.items())  # the cached counts are the true ones
