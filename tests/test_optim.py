"""`ElementwiseAdamW` (regrow_optimizer_state="restart"): torch's AdamW while no count is reset, a fresh Adam's first
step for a regrown weight, counts that survive save/load and a Trainer resume."""

import pytest
import torch
from transformers import TrainerCallback, TrainingArguments

from mst_hf import MSTConfig, MSTTrainer
from mst_hf.masks import MaskState
from mst_hf.optim import ELEMENT_STEP, ElementwiseAdamW

from .helpers import tiny_gpt2, toy_dataset


def _regression(opt_cls, steps: int = 12, **kw):
    """Two layers in two param groups (decay / none) trained ``steps`` steps on a fixed regression."""
    torch.manual_seed(0)
    a, b = torch.nn.Linear(16, 16), torch.nn.Linear(16, 4)
    opt = opt_cls([{"params": [a.weight, b.weight], "weight_decay": 0.1},
                   {"params": [a.bias, b.bias], "weight_decay": 0.0}], lr=3e-3, betas=(0.9, 0.95), **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(32, 16, generator=g)
        loss = (b(torch.tanh(a(x))) - x[:, :4]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return [p.detach() for p in (a.weight, a.bias, b.weight, b.bias)], opt


def test_matches_torch_adamw_without_regrowth():
    ours, _ = _regression(ElementwiseAdamW)
    theirs, _ = _regression(torch.optim.AdamW, foreach=False)
    assert all(torch.allclose(x, y, rtol=0, atol=1e-6) for x, y in zip(ours, theirs))


def _regrown_first_update(mode: str, opt_cls):
    """|first update| / lr of weights regrown after 30 steps, with gradients of one sign per weight."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 8))
    masks = MaskState({"w": w})
    keep = torch.rand(8, 8, generator=torch.Generator().manual_seed(1)) < 0.5
    masks.set_mask("w", keep)
    opt = opt_cls([w], lr=1e-2, betas=(0.9, 0.999), weight_decay=0.0)
    grad = torch.randn(8, 8, generator=torch.Generator().manual_seed(2))
    for _ in range(30):
        w.grad = grad.clone()
        masks.apply_to_grads()
        opt.step()
        masks.apply_to_weights()
    masks.set_mask("w", torch.ones(8, 8, dtype=torch.bool), opt, regrow_optimizer_state=mode)
    before = w.detach().clone()
    w.grad = grad.clone()
    opt.step()
    return ((w.detach() - before)[~keep].abs() / 1e-2), opt.state[w]


def test_restart_gives_a_regrown_weight_a_fresh_adams_first_step():
    update, state = _regrown_first_update("restart", ElementwiseAdamW)
    assert torch.allclose(update, torch.ones_like(update), rtol=1e-5)  # |lr g / (|g| + eps)| = lr
    assert int(state["step"]) == 31 and (state[ELEMENT_STEP] >= 1).all()


def test_zeroed_moments_under_a_shared_count_do_not():
    # the same regrowth under torch's AdamW ("zero"): zeroed moments under the corrections of step 31, a first update
    # of (1 - b1) / (1 - b1^31) * sqrt((1 - b2^31) / (1 - b2)) lr = 0.57 lr
    update, _ = _regrown_first_update("zero", torch.optim.AdamW)
    expected = 0.1 / (1 - 0.9**31) * ((1 - 0.999**31) / 0.001) ** 0.5
    assert torch.allclose(update, torch.full_like(update, expected), rtol=1e-4)


def test_restart_refuses_an_optimizer_without_per_element_counts():
    w = torch.nn.Parameter(torch.ones(4, 4))
    masks = MaskState({"w": w})
    with pytest.raises(ValueError, match="ElementwiseAdamW"):
        masks.set_mask("w", torch.eye(4, dtype=torch.bool), torch.optim.AdamW([w]), regrow_optimizer_state="restart")


def test_state_dict_round_trip_keeps_the_counts_exactly():
    # a bf16 parameter: Optimizer.load_state_dict casts state tensors to the parameter's dtype, where 1001 -> 1000
    w = torch.nn.Parameter(torch.zeros(4, 4, dtype=torch.bfloat16))
    opt = ElementwiseAdamW([w], lr=1e-3)
    w.grad = torch.ones_like(w)
    opt.step()
    opt.state[w][ELEMENT_STEP].fill_(1001)[0, 0] = 3
    w2 = torch.nn.Parameter(w.detach().clone())
    restored = ElementwiseAdamW([w2], lr=1e-3)
    restored.load_state_dict(opt.state_dict())
    counts = restored.state[w2][ELEMENT_STEP]
    assert counts.dtype == torch.int32 and torch.equal(counts, opt.state[w][ELEMENT_STEP])


class _SaveAt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        control.should_save = state.global_step == 4


def _trainer(out, **kw):
    cfg = MSTConfig(initial_sparsity=0.5, ultra_sparsity=0.5, final_sparsity=0.5, warmup_ratio=0.0,
                    restoration_ratio=0.0, update_interval=2, hsa_pattern="dense", regrow_optimizer_state="restart")
    args = TrainingArguments(output_dir=str(out), max_steps=8, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True,
                             **{"optim": "adamw_torch", **kw})
    return MSTTrainer(tiny_gpt2(), args, mst_config=cfg, train_dataset=toy_dataset(32, seq_len=16),
                      callbacks=[_SaveAt()])


def test_trainer_uses_elementwise_adamw_and_resume_keeps_the_counts(tmp_path):
    full = _trainer(tmp_path / "a")
    full.train()
    assert isinstance(full.optimizer.optimizer, ElementwiseAdamW)
    counts = {i: s[ELEMENT_STEP] for i, s in full.optimizer.state_dict()["state"].items()}
    assert any(bool((c < 8).any()) for c in counts.values())  # regrown weights restarted their counts
    resumed = _trainer(tmp_path / "b")
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-4"))
    again = {i: s[ELEMENT_STEP] for i, s in resumed.optimizer.state_dict()["state"].items()}
    assert counts.keys() == again.keys() and all(torch.equal(counts[i], again[i]) for i in counts)


def test_trainer_refuses_restart_with_another_optimizer(tmp_path):
    trainer = _trainer(tmp_path, optim="sgd")
    with pytest.raises(ValueError, match="optim='sgd'"):
        trainer.create_optimizer()
