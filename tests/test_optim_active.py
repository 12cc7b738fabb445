"""`ActiveTileAdamW` (optimizer_state="active"): torch's AdamW bit for bit on the active elements through mask
changes, pruned weights at +0.0, compact state that survives save/load, and the refusals."""

import io

import pytest
import torch
from transformers import TrainerCallback, TrainingArguments

from mst_hf import MSTConfig, MSTTrainer, topology
from mst_hf.controller import keeps_pruned_zero
from mst_hf.masks import MaskState
from mst_hf.optim_active import TILE_INDEX, ActiveTileAdamW, optimizer_state_bytes

from .helpers import tiny_llama, toy_dataset

B = 16
SHAPES = {"even": (64, 48), "edge": (40, 24)}  # "edge": B divides neither side, so edge tiles are partial


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits (``torch.equal`` alone calls -0.0 and +0.0 equal)."""
    return t.detach().contiguous().view(torch.int32)


def _block_mask(shape, n_tiles, seed):
    return topology.random_block_mask(shape, n_tiles, B, torch.Generator().manual_seed(seed))


def _model(seed=0):
    """Two block-masked weights (one with partial edge tiles) in a decayed group, an untracked bias in another."""
    g = torch.Generator().manual_seed(seed)
    weights = {n: torch.nn.Parameter(torch.randn(s, generator=g)) for n, s in SHAPES.items()}
    bias = torch.nn.Parameter(torch.randn(8, generator=g))
    return weights, bias


def _setup(cls, seed=0, **kw):
    weights, bias = _model(seed)
    masks = MaskState(weights)
    for i, (n, s) in enumerate(SHAPES.items()):
        masks.set_mask(n, _block_mask(s, 3, 100 + i))
    opt = cls([{"params": list(weights.values()), "weight_decay": 0.1}, {"params": [bias], "weight_decay": 0.0}],
              lr=1e-2, betas=(0.9, 0.95), eps=1e-8, **kw)
    if cls is ActiveTileAdamW:
        for n, p in weights.items():
            opt.track(p, topology.tile_mask(masks.masks[n], B), B)
    return weights, bias, masks, opt


def _train(weights, bias, masks, opt, steps, first=0, mask_every=3):
    """Deterministic gradients per step; every ``mask_every`` steps new block masks that keep some tiles, drop some
    and grow others."""
    for step in range(first, first + steps):
        g = torch.Generator().manual_seed(1000 + step)
        for p in (*weights.values(), bias):
            p.grad = torch.randn(p.shape, generator=g)
        if step % mask_every == mask_every - 1:
            for i, (n, s) in enumerate(SHAPES.items()):
                masks.set_mask(n, _block_mask(s, 3, 10 * step + i), opt)
        masks.apply_to_grads()
        opt.step()


def test_matches_torch_adamw_bit_for_bit_through_mask_changes():
    ours = _setup(ActiveTileAdamW)
    theirs = _setup(torch.optim.AdamW, foreach=False)
    _train(*ours, steps=14)
    _train(*theirs, steps=14)
    (w1, b1, m1, _), (w2, b2, _, _) = ours, theirs
    assert all(torch.equal(_bits(w1[n]), _bits(w2[n])) for n in SHAPES) and torch.equal(_bits(b1), _bits(b2))
    assert all(not w1[n][~m1.masks[n]].any() for n in SHAPES)  # not vacuous: pruned entries exist and are +0.0


def test_compact_moments_are_the_dense_moments_of_the_active_tiles():
    ours = _setup(ActiveTileAdamW)
    theirs = _setup(torch.optim.AdamW, foreach=False)
    _train(*ours, steps=8)
    _train(*theirs, steps=8)
    for n, s in SHAPES.items():
        state, dense = ours[3].state[ours[0][n]], theirs[3].state[theirs[0][n]]
        rows, cols = topology.block_grid(s, B)
        padded = torch.nn.functional.pad(dense["exp_avg_sq"], (0, cols * B - s[1], 0, rows * B - s[0]))
        tiles = padded.view(rows, B, cols, B).transpose(1, 2).reshape(rows * cols, B, B)[state[TILE_INDEX]]
        assert state["exp_avg_sq"].shape == (3, B, B) and torch.equal(_bits(state["exp_avg_sq"]), _bits(tiles))
        assert int(state["step"]) == int(dense["step"]) == 8


def test_a_regrown_tile_starts_from_zero_moments_under_the_shared_step():
    weights, bias, masks, opt = _setup(ActiveTileAdamW)
    _train(weights, bias, masks, opt, steps=2, mask_every=100)
    old = topology.tile_mask(masks.masks["even"], B)
    new = ~old  # every tile changes: all kept tiles are dropped, every other tile grows
    masks.set_mask("even", topology.expand_blocks(new, B, SHAPES["even"]), opt)
    state = opt.state[weights["even"]]
    assert torch.equal(state[TILE_INDEX], new.reshape(-1).nonzero().squeeze(1))
    assert not state["exp_avg"].any() and not state["exp_avg_sq"].any() and int(state["step"]) == 2


def test_an_unstructured_mask_is_refused_and_nothing_changes():
    weights, bias, masks, opt = _setup(ActiveTileAdamW)
    before = masks.masks["even"].clone()
    unstructured = torch.rand(SHAPES["even"], generator=torch.Generator().manual_seed(3)) < 0.5
    with pytest.raises(ValueError, match="not constant on its tiles"):
        masks.set_mask("even", unstructured, opt)
    assert torch.equal(masks.masks["even"], before)


@pytest.mark.parametrize("mode", ["warm", "restart"])
def test_warm_and_restart_are_refused(mode):
    weights, bias, masks, opt = _setup(ActiveTileAdamW)
    with pytest.raises(ValueError, match="regrow_optimizer_state"):
        masks.set_mask("even", _block_mask(SHAPES["even"], 3, 7), opt, regrow_optimizer_state=mode)


def _round_trip(opt):
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)  # as Trainer saves optimizer.pt, and loads it (weights_only)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_save_load_round_trip_continues_bit_for_bit():
    full = _setup(ActiveTileAdamW)
    _train(*full, steps=10)
    first = _setup(ActiveTileAdamW)
    _train(*first, steps=5)
    resumed = _setup(ActiveTileAdamW, seed=1)  # other weights, other tracked tiles: the saved state must win
    for n in SHAPES:
        resumed[2].set_mask(n, first[2].masks[n])
        resumed[0][n].data.copy_(first[0][n].data)
    resumed[1].data.copy_(first[1].data)
    resumed[3].load_state_dict(_round_trip(first[3]))
    _train(*resumed, steps=5, first=5)
    assert all(torch.equal(_bits(full[0][n]), _bits(resumed[0][n])) for n in SHAPES)


def test_the_tile_index_survives_a_low_precision_parameter():
    # Optimizer.load_state_dict casts state tensors to the parameter's dtype: bf16 holds integers exactly only to 256
    w = torch.nn.Parameter(torch.zeros(20 * B, 20 * B, dtype=torch.bfloat16))
    opt = ActiveTileAdamW([w])
    tiles = torch.zeros(20, 20, dtype=torch.bool)
    tiles[19, 17] = tiles[18, 3] = True  # flat indices 397 and 363
    opt.track(w, tiles, B)
    restored = ActiveTileAdamW([torch.nn.Parameter(w.detach().clone())])
    restored.load_state_dict(_round_trip(opt))
    index = next(iter(restored.state.values()))[TILE_INDEX]
    assert index.dtype == torch.int64 and index.tolist() == [363, 397]


def test_dense_state_from_torch_adamw_is_cut_down_to_the_tracked_tiles():
    # a checkpoint of optimizer_state="dense" resumed with "active": the run goes on as torch's AdamW would
    theirs = _setup(torch.optim.AdamW, foreach=False)
    _train(*theirs, steps=5)
    ours = _setup(ActiveTileAdamW, seed=1)
    for n in SHAPES:
        ours[2].set_mask(n, theirs[2].masks[n], ours[3])
        ours[0][n].data.copy_(theirs[0][n].data)
    ours[1].data.copy_(theirs[1].data)
    ours[3].load_state_dict(_round_trip(theirs[3]))
    assert all(ours[3].tracks(p) for p in ours[0].values())
    _train(*theirs, steps=5, first=5)
    _train(*ours, steps=5, first=5)
    assert all(torch.equal(_bits(theirs[0][n]), _bits(ours[0][n])) for n in SHAPES)


def test_a_state_whose_index_does_not_fit_its_moments_is_refused():
    weights, bias, masks, opt = _setup(ActiveTileAdamW)
    _train(weights, bias, masks, opt, steps=1)
    saved = _round_trip(opt)
    saved["state"][0][TILE_INDEX] = saved["state"][0][TILE_INDEX][:2]  # 2 tiles for 3 tiles of moments
    with pytest.raises(ValueError, match="does not fit its moments"):
        _setup(ActiveTileAdamW)[3].load_state_dict(saved)


def test_state_bytes_shrink_to_the_active_tiles():
    (_, _, _, ours), (_, _, _, theirs) = _setup(ActiveTileAdamW), _setup(torch.optim.AdamW, foreach=False)
    for opt in (ours, theirs):
        for p in opt.param_groups[0]["params"] + opt.param_groups[1]["params"]:
            p.grad = torch.zeros_like(p)
        opt.step()
    weights = ours.param_groups[0]["params"]
    # 3 active tiles per weight: two fp32 moments of B*B, an int64 index entry, a float32 step
    assert optimizer_state_bytes(ours, weights) == 2 * (3 * (2 * B * B * 4 + 8) + 4)
    dense = optimizer_state_bytes(theirs, theirs.param_groups[0]["params"])
    assert dense == sum(8 * p.numel() + 4 for p in theirs.param_groups[0]["params"])


def test_config_refuses_active_state_without_tiles_or_with_per_element_regrowth():
    with pytest.raises(ValueError, match="sparsity_structure='block'"):
        MSTConfig(optimizer_state="active")
    with pytest.raises(ValueError, match="regrow_optimizer_state='warm'"):
        MSTConfig(optimizer_state="active", sparsity_structure="block", regrow_optimizer_state="warm")


# ---------------------------------------------------------------------------------------------- with MSTTrainer
N = 12


def _run_config(optimizer_state="active", **kw):
    fields = dict(initial_sparsity=0.5, ultra_sparsity=0.8, final_sparsity=0.5, warmup_ratio=0.25,
                  restoration_ratio=0.25, update_interval=2, hsa_pattern="dense", sparsity_structure="block",
                  block_size=B, grow_method={"warmup": "gradient", "ultra": "mixed", "restoration": "random"},
                  drop_fraction_schedule="constant", optimizer_state=optimizer_state)
    return MSTConfig(**{**fields, **kw})


class _SaveAt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        control.should_save = control.should_save or state.global_step == N // 2


def _trainer(out, mst_config, model_seed=0, **args_kw):
    args = dict(output_dir=str(out), max_steps=N, per_device_train_batch_size=4, learning_rate=1e-2,
                weight_decay=0.1, warmup_steps=2, report_to=[], save_strategy="no", use_cpu=True, seed=0,
                disable_tqdm=True, optim="adamw_torch")
    model = tiny_llama(seed=model_seed, hidden_size=64, intermediate_size=128)  # every side a multiple of 16
    return MSTTrainer(model, TrainingArguments(**{**args, **args_kw}), mst_config=mst_config,
                      train_dataset=toy_dataset(48, seq_len=16), callbacks=[_SaveAt()])


@pytest.fixture(scope="module")
def active_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("active")
    trainer = _trainer(out, _run_config())
    trainer.train()
    return trainer, out


def _weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_trainer_builds_it_and_tracks_every_target(active_run):
    trainer, _ = active_run
    opt = trainer.optimizer.optimizer
    assert isinstance(opt, ActiveTileAdamW) and all(opt.tracks(p) for p in trainer.mst.masks.params.values())
    after = [r for r in trainer.mst.history if r["step"] >= N // 2]  # tiles drop and grow after the checkpoint too
    assert len(after) >= 2 and all(r["dropped"] and r["grown"] for r in after)


def test_pruned_weights_stay_positive_zero_without_re_masking(active_run):
    trainer, _ = active_run
    assert keeps_pruned_zero(trainer.optimizer)  # the controller skips the per-step re-masking for it
    pruned = [t.param.detach()[~trainer.mst.masks.masks[n]] for n, t in trainer.mst.targets.items()]
    assert sum(p.numel() for p in pruned) > 0 and all(not _bits(p).any() for p in pruned)  # +0.0: all bits 0


def test_resume_is_bit_identical_to_the_uninterrupted_run(active_run, tmp_path):
    full, out = active_run
    resumed = _trainer(tmp_path, _run_config(), model_seed=1)  # other weights and first masks: all must be replaced
    resumed.train(resume_from_checkpoint=str(out / f"checkpoint-{N // 2}"))
    a, b = _weights(full), _weights(resumed)
    assert all(torch.equal(_bits(a[k].float()), _bits(b[k].float())) for k in a)
    sa, sb = full.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i]
                                          if torch.is_tensor(sa[i][k]))


def test_the_run_equals_one_with_torch_adamw(active_run, tmp_path):
    active, _ = active_run
    dense = _trainer(tmp_path, _run_config("dense"))
    dense.train()
    assert type(dense.optimizer.optimizer) is torch.optim.AdamW
    assert all(torch.equal(active.mst.masks.masks[n], m) for n, m in dense.mst.masks.masks.items())
    a, b = _weights(active), _weights(dense)
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)


def test_trainer_refuses_another_optimizer(tmp_path):
    with pytest.raises(ValueError, match="optim='sgd'"):
        _trainer(tmp_path, _run_config(), optim="sgd").create_optimizer()
    model = tiny_llama(hidden_size=64, intermediate_size=128)
    passed_in = MSTTrainer(model, TrainingArguments(output_dir=str(tmp_path), max_steps=2, report_to=[],
                                                    use_cpu=True), mst_config=_run_config(),
                           train_dataset=toy_dataset(8, seq_len=16),
                           optimizers=(torch.optim.AdamW(model.parameters()), None))
    with pytest.raises(TypeError, match="ActiveTileAdamW"):
        passed_in.create_optimizer()


def test_an_active_checkpoint_does_not_resume_with_dense_moments(active_run, tmp_path):
    _, out = active_run
    dense = _trainer(tmp_path, _run_config("dense"))
    with pytest.raises(ValueError, match="optimizer_state='active'"):
        dense.train(resume_from_checkpoint=str(out / f"checkpoint-{N // 2}"))


@pytest.mark.parametrize("sparsity", [0.8, 0.9])
def test_optimizer_bytes_per_weight_are_density_plus_the_index(sparsity, tmp_path):
    cfg = dict(initial_sparsity=sparsity, ultra_sparsity=sparsity, final_sparsity=sparsity, warmup_ratio=0.0,
               restoration_ratio=0.0, sparsity_distribution="uniform")
    per_weight = {}
    for state in ("dense", "active"):
        trainer = _trainer(tmp_path / state, _run_config(state, **cfg), max_steps=4)
        trainer.train()
        targets = list(trainer.mst.masks.params.values())
        per_weight[state] = optimizer_state_bytes(trainer.optimizer, targets) / sum(p.numel() for p in targets)
    n_weights = sum(p.numel() for p in targets)
    density = sum(trainer.mst.masks.active(n) for n in trainer.mst.masks.params) / n_weights  # whole tiles
    steps = 4 * len(targets) / n_weights  # one float32 step count per weight matrix
    print(f"sparsity {sparsity}: dense {per_weight['dense']:.4f} B/weight, active {per_weight['active']:.4f} "
          f"B/weight (tile density {density:.4f}, block {B})")
    assert per_weight["dense"] == pytest.approx(8 + steps, rel=1e-12)
    assert per_weight["active"] == pytest.approx(8 * density * (1 + 1 / B**2) + steps, rel=1e-12)
    assert abs(density - (1 - sparsity)) < 0.02
