"""MSTConfig(weight_kernels=...): which layers run on the block-sparse kernel, and that training on it equals the
dense masked run (CPU: the block-sparse ops' plain-torch implementation; no triton needed)."""

import json
import logging

import pytest
import torch

from mst_hf import MSTConfig, MSTController

from .helpers import tiny_llama, toy_dataset


def _cfg(**kw):
    base = dict(initial_sparsity=0.5, ultra_sparsity=0.5, final_sparsity=0.5, warmup_ratio=0.0,
                restoration_ratio=0.0, update_interval=3, hsa_pattern="dense", sparsity_structure="block",
                block_size=16, grow_method="gradient")
    base.update(kw)
    return MSTConfig(**base)


def _run(weight_kernels, steps=4):
    model = tiny_llama()
    ctl = MSTController(model, _cfg(weight_kernels=weight_kernels))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data, on_kernel = toy_dataset(n=4 * steps), []
    for step in range(steps):
        rows = data[step * 4 : (step + 1) * 4]
        batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
        ctl.before_forward(step, steps, batch)
        on_kernel.append(0 if ctl.weight_kernels is None else ctl.weight_kernels.block_layers())
        model(**batch).loss.backward()
        ctl.after_backward(step, steps, optimizer)
        optimizer.step()
        optimizer.zero_grad()
        ctl.after_optimizer_step()
    return model, ctl, on_kernel


def test_block_kernels_train_like_the_masked_dense_run_and_update_steps_run_dense():
    dense_model, dense_ctl, _ = _run("dense")
    block_model, block_ctl, on_kernel = _run("block")
    # steps 0 and 3 update the topology (dense kernels); steps 1 and 2 run every divisible target on the kernel
    divisible = sum(t.n_in % 16 == 0 and t.n_out % 16 == 0 for t in block_ctl.targets.values())
    assert on_kernel == [0, divisible, divisible, 0] and divisible > 0
    assert all(torch.equal(block_ctl.masks.masks[n], m) for n, m in dense_ctl.masks.masks.items())
    for (name, p), q in zip(dense_model.named_parameters(), block_model.parameters()):
        assert torch.allclose(p, q, atol=1e-5), name


def test_kernels_need_block_masks():
    with pytest.raises(ValueError, match="sparsity_structure='block'"):
        MSTConfig(weight_kernels="auto")
    with pytest.raises(ValueError, match="block_size"):
        MSTConfig(sparsity_structure="block", block_size=8, weight_kernels="block")


def test_auto_on_cpu_stays_dense():
    _, ctl, on_kernel = _run("auto", steps=2)
    assert on_kernel == [0, 0] and set(ctl.weight_kernels.choice.values()) == {"dense"}


def test_auto_never_picks_the_block_kernel_off_cuda_whatever_the_table_says(tmp_path, monkeypatch):
    # a table that measures "cpu" and says the kernel always pays: the weights are on a CPU, so still dense
    table = {"devices": {"cpu": {"tokens": 1, "break_even": [
        {"n_in": 32, "n_out": 32, "block_size": 16, "break_even_density": 1.0}]}}}
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps(table))
    monkeypatch.setenv("MST_KERNEL_TABLE", str(path))
    _, ctl, on_kernel = _run("auto", steps=2)
    assert on_kernel == [0, 0] and set(ctl.weight_kernels.choice.values()) == {"dense"}


def test_block_on_cpu_weights_runs_without_triton(monkeypatch):
    """CPU weights take the ops' plain-torch implementation: neither triton nor a Triton launch is needed."""
    from mst_hf.kernels import dispatch
    from mst_hf.kernels.triton import launch

    monkeypatch.setattr(dispatch, "triton_installed", lambda: False)
    for name in ("forward", "grad_input", "grad_weight"):
        monkeypatch.setattr(launch, name, None)  # calling one would fail
    _, ctl, on_kernel = _run("block", steps=2)
    assert on_kernel[1] > 0 and set(ctl.weight_kernels.choice.values()) == {"block"}


def test_block_without_triton_is_refused_at_construction_for_weights_off_the_cpu(monkeypatch):
    from mst_hf.kernels import dispatch

    monkeypatch.setattr(dispatch, "triton_installed", lambda: False)
    model = tiny_llama().to("meta")  # stands for a GPU: any device but the CPU needs the Triton kernels
    with pytest.raises(NotImplementedError, match=r"`weight_kernels='block'`.*\['meta'\].*triton is not installed.*"
                                                  r"`weight_kernels='dense'`"):
        MSTController(model, _cfg(weight_kernels="block"))


def test_layers_the_tile_does_not_divide_are_named_in_a_warning(caplog):
    model = tiny_llama(intermediate_size=48, num_key_value_heads=4)  # the MLP (32 x 48, 48 x 32) is not 32-divisible
    with caplog.at_level(logging.WARNING):
        ctl = MSTController(model, _cfg(weight_kernels="block", block_size=32))
    assert "block_size=32 does not divide 6 of 15" in caplog.text and "mlp.down_proj (48x32)" in caplog.text
    assert ctl.weight_kernels is not None


def test_block_size_that_divides_no_layer_is_refused():
    model = tiny_llama(hidden_size=40, intermediate_size=48, num_key_value_heads=4)  # no side a multiple of 16 ...
    with pytest.raises(ValueError, match=r"block_size=16 divides the shape of no target layer.*`block_size`"):
        MSTController(model, _cfg(weight_kernels="block", target_modules=["gate_proj", "up_proj", "down_proj"],
                                  sparsify_lm_head=False))  # ... among the MLP's 40 x 48 and 48 x 40
