"""MST under FSDP2 (``fully_shard``: parameters and masks sharded) with 2 CPU processes over gloo.

A tiny Llama and a tiny GPT-2 (dimensions chosen so that some shards are uneven) are trained with the custom loop
of ``MSTController``'s docstring for 10 steps (6 topology updates). The masks after every update must be
bit-identical to those of an unsharded 1-process run (its gradient is the mean of the two ranks' micro-batch
gradients, exactly what the 2-process runs reduce) and to those of a DDP run; the final weights too. Pruned weights
must be exactly +0.0 on every shard. A run saved at step 5 (sharded distributed checkpoint, or full state dicts)
and resumed in fresh models must end bit-identical to the uninterrupted run.

The accelerate path (``accelerate launch`` with ``fsdp_version: 2``) cannot run here: accelerate 1.15 enables FSDP
only on accelerator devices (its MULTI_CPU state never becomes FSDP), so ``MSTTrainer`` under FSDP2 is run on the
GPU by ``bench/fsdp2_check.py``; this file tests its FSDP1 and DeepSpeed refusals.

All 2-process runs share one spawn of two workers (importing transformers dominates the time).
"""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from mst_hf import MSTConfig, MSTController, sharding

STEPS, SAVE_AT, WORLD = 8, 5, 2
MODELS = ("llama", "gpt2")


def mst_config() -> MSTConfig:
    return MSTConfig(update_interval=2, final_sparsity=0.5, initial_sparsity=0.3, grow_method="mixed", seed=3)


def build(kind: str, seed: int = 0):
    """Tiny models with odd sizes: a (37, 24) matrix splits 19 + 18 rows, the GPT-2 vocabulary 31 + 30."""
    torch.manual_seed(seed)
    if kind == "llama":
        config = LlamaConfig(hidden_size=24, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                             num_key_value_heads=1, vocab_size=61, max_position_embeddings=32,
                             tie_word_embeddings=False)
    else:
        config = GPT2Config(n_layer=2, n_embd=24, n_head=2, vocab_size=61, n_positions=32, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0)  # no dropout: the runs draw their micro-batches apart
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model.config.use_cache = False
    return model


def micro_batch(step: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s 2 sequences of step ``step`` (the 1-process run uses both ranks' batches)."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, 61, (2, 12), generator=g)


def optimizer_for(model):
    return torch.optim.AdamW(model.parameters(), lr=2e-2, weight_decay=0.1)


def layers(model):
    inner = getattr(model, "model", None) or model.transformer
    return inner.layers if hasattr(inner, "layers") else inner.h


def shard(model):
    from torch.distributed.fsdp import fully_shard

    for layer in layers(model):
        fully_shard(layer)
    fully_shard(model)
    return model


def snapshot(ctl) -> dict[str, torch.Tensor]:
    """Full masks (a collective under FSDP2)."""
    return {name: ctl.masks.full_mask(name).clone().cpu() for name in ctl.masks.masks}


def full_weights(model) -> dict[str, torch.Tensor]:
    return {n: sharding.full(p.detach()).clone().cpu() for n, p in model.named_parameters()}


def pruned_zero_on_shards(ctl) -> bool:
    """Every pruned weight of this rank's shards is +0.0 (not merely == 0: no -0.0)."""
    for name, mask in ctl.masks.masks.items():
        local = sharding.local(ctl.masks.params[name].detach())
        assert local.shape == mask.shape, (name, local.shape, mask.shape)
        pruned = local[~mask]
        if pruned.numel() and not (pruned.eq(0).all() and not torch.signbit(pruned).any()):
            return False
    return True


def train(model, ctl, optimizer, start: int, stop: int, ranks, record: dict) -> None:
    """The docstring loop of MSTController. ``ranks``: the micro-batches this process runs; a process running both
    (the 1-process reference) averages their gradients as the 2-process reductions do."""
    for step in range(start, stop):
        grads = []
        for rank in ranks:
            ids = micro_batch(step, rank)
            ctl.before_forward(step, STEPS, {"input_ids": ids})
            model(input_ids=ids, labels=ids).loss.backward()
            if len(ranks) > 1:
                grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
                model.zero_grad(set_to_none=True)
        if len(ranks) > 1:
            for n, p in model.named_parameters():
                p.grad = (grads[0][n] + grads[1][n]) / 2
        update = ctl.after_backward(step, STEPS, optimizer)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ctl.after_optimizer_step()
        if update is not None:
            record[step] = snapshot(ctl)


def reference_run(kind: str) -> dict:
    model = build(kind)
    ctl = MSTController(model, mst_config())
    record: dict = {}
    train(model, ctl, optimizer_for(model), 0, STEPS, (0, 1), record)
    return {"masks": record, "weights": full_weights(model)}


# ------------------------------------------------------------------------------------------------ the workers
def _fsdp_run(kind: str, rank: int, late: bool = False) -> dict:
    """``late``: the controller is built on the plain model, which is sharded afterwards (what ``Trainer.train``
    does after ``MSTTrainer.__init__``): the masks must follow the new ``DTensor`` parameters."""
    if late:
        model = build(kind)
        ctl = MSTController(model, mst_config())
        shard(model)
    else:
        model = shard(build(kind))
        ctl = MSTController(model, mst_config())
    record: dict = {}
    train(model, ctl, optimizer_for(model), 0, STEPS, (rank,), record)
    return {"masks": record, "weights": full_weights(model), "zero": pruned_zero_on_shards(ctl),
            "sharded": all(sharding.is_sharded(p) for p in ctl.masks.params.values()),
            "local_sizes": {n: m.numel() for n, m in ctl.masks.masks.items()}}


def _ddp_run(kind: str, rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    model = build(kind)
    ddp = DistributedDataParallel(model)
    ctl = MSTController(ddp, mst_config())
    record: dict = {}
    train(ddp, ctl, optimizer_for(ddp), 0, STEPS, (rank,), record)
    return {"masks": record, "weights": full_weights(model)}


def _resume_run(kind: str, rank: int, directory: str, sharded_checkpoint: bool) -> dict:
    """Train to SAVE_AT, save, build everything anew (other initial weights), load, train to the end."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    from mst_hf.io.attach import load_masks
    from mst_hf.io.checkpoint import load_mst_files, save_mst_files

    model = shard(build(kind))
    ctl, optimizer = MSTController(model, mst_config()), optimizer_for(model)
    record: dict = {}
    train(model, ctl, optimizer, 0, SAVE_AT, (rank,), record)
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if sharded_checkpoint:
        dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)},
                 checkpoint_id=os.path.join(directory, "dcp"))
    else:
        state = {"model": get_model_state_dict(model, options=full),
                 "optim": get_optimizer_state_dict(model, optimizer, options=full)}
        if rank == 0:
            torch.save(state, os.path.join(directory, "full.pt"))
    save_mst_files(directory, ctl, step=SAVE_AT, total_steps=STEPS, write=rank == 0)
    dist.barrier()

    model = shard(build(kind, seed=1))
    ctl, optimizer = MSTController(model, mst_config()), optimizer_for(model)
    if sharded_checkpoint:
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
        dcp.load(state, checkpoint_id=os.path.join(directory, "dcp"))
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optimizer, state["optim"])
    else:
        state = torch.load(os.path.join(directory, "full.pt"), weights_only=True) if rank == 0 else {}
        load = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(model, state.get("model", {}), options=load)
        set_optimizer_state_dict(model, optimizer, state.get("optim", {}), options=load)
    load_mst_files(directory, ctl)
    attached = load_masks(model, directory, apply=False)  # a new MaskState over the sharded model: the same shards
    same_shards = attached.masks.keys() == ctl.masks.masks.keys() and all(
        torch.equal(attached.masks[n], ctl.masks.masks[n]) for n in attached.masks)
    train(model, ctl, optimizer, SAVE_AT, STEPS, (rank,), record)
    return {"masks": record, "weights": full_weights(model), "zero": pruned_zero_on_shards(ctl),
            "load_masks_shards": same_shards}


def worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        results = {}
        for kind in MODELS:
            results[kind, "fsdp"] = _fsdp_run(kind, rank)
            results[kind, "ddp"] = _ddp_run(kind, rank)
            if kind == "llama":
                results[kind, "late"] = _fsdp_run(kind, rank, late=True)
            for mode in ("sharded", "full") if kind == "llama" else ("sharded",):  # full state dicts: one model
                directory = os.path.join(out, f"{kind}-{mode}")
                os.makedirs(directory, exist_ok=True)
                results[kind, mode] = _resume_run(kind, rank, directory, mode == "sharded")
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("fsdp2"))
    try:
        mp.spawn(worker, args=(_free_port(), out), nprocs=WORLD, join=True)
    except mp.ProcessExitedException:
        # A worker killed by a signal (seen once in CPU gloo runs: glibc's "malloc(): unaligned tcache chunk"
        # inside torch's CPU collectives, no Python error). One fresh spawn; an exception raised by our code
        # (ProcessRaisedException) is never retried, and a second crash fails the tests.
        mp.spawn(worker, args=(_free_port(), out), nprocs=WORLD, join=True)
    ranks = [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]
    return {"ranks": ranks, "reference": {kind: reference_run(kind) for kind in MODELS}, "out": out}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _masks_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(_equal(a[s], b[s]) for s in a)


@pytest.mark.slow
@pytest.mark.parametrize("kind", MODELS)
def test_masks_are_sharded_like_their_parameters(runs, kind):
    for rank_result in runs["ranks"]:
        result = rank_result[kind, "fsdp"]
        assert result["sharded"]
        full = {n: m.numel() for n, m in result["masks"][max(result["masks"])].items()}
        assert all(result["local_sizes"][n] < full[n] for n in full)  # a shard, not the full mask
    sizes = [r[kind, "fsdp"]["local_sizes"] for r in runs["ranks"]]
    assert {n: sizes[0][n] + sizes[1][n] for n in sizes[0]} == full


@pytest.mark.slow
@pytest.mark.parametrize("kind", MODELS)
def test_fsdp2_masks_equal_unsharded_and_ddp_runs(runs, kind):
    reference = runs["reference"][kind]
    assert len(reference["masks"]) >= 5  # updates happened (and changed the masks: see below)
    steps = sorted(reference["masks"])
    assert not _equal(reference["masks"][steps[0]], reference["masks"][steps[-1]])
    for rank_result in runs["ranks"]:
        assert _masks_equal(rank_result[kind, "fsdp"]["masks"], reference["masks"])
        assert _masks_equal(rank_result[kind, "ddp"]["masks"], reference["masks"])
        assert _equal(rank_result[kind, "fsdp"]["weights"], reference["weights"])
        assert _equal(rank_result[kind, "ddp"]["weights"], reference["weights"])


@pytest.mark.slow
def test_controller_built_before_sharding_follows_the_dtensor_parameters(runs):
    reference = runs["reference"]["llama"]
    for rank_result in runs["ranks"]:
        late = rank_result["llama", "late"]
        assert late["sharded"] and _masks_equal(late["masks"], reference["masks"])
        assert _equal(late["weights"], reference["weights"])
        assert late["local_sizes"] == rank_result["llama", "fsdp"]["local_sizes"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", MODELS)
def test_pruned_weights_exactly_zero_on_every_shard(runs, kind):
    modes = [m for m in ("fsdp", "late", "sharded", "full") if (kind, m) in runs["ranks"][0]]
    assert [r[kind, m]["zero"] for r in runs["ranks"] for m in modes] == [True] * (WORLD * len(modes))


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "mode"), [("llama", "sharded"), ("llama", "full"), ("gpt2", "sharded")])
def test_resume_continues_bit_identically(runs, kind, mode):
    reference = runs["ranks"][0][kind, "fsdp"]
    for rank_result in runs["ranks"]:
        resumed = rank_result[kind, mode]
        assert _masks_equal(resumed["masks"], reference["masks"])
        assert _equal(resumed["weights"], reference["weights"])
        assert resumed["load_masks_shards"]  # mst_hf.load_masks on the sharded model cuts the same shards


@pytest.mark.slow
@pytest.mark.parametrize("kind", MODELS)
def test_saved_mask_file_is_the_unsharded_runs_file(runs, kind):
    """The mask file written from sharded masks holds the full masks of step SAVE_AT, bit for bit."""
    from mst_hf.io.formats import mask_tensors, read_mask_file

    saved = mask_tensors(read_mask_file(os.path.join(runs["out"], f"{kind}-sharded")))
    reference = runs["reference"][kind]["masks"]
    last_update = max(s for s in reference if s < SAVE_AT)
    assert _equal(saved, reference[last_update])


# ------------------------------------------------------------------------------------------------ MSTTrainer refusals
def _trainer_state(deepspeed: bool = False, fsdp_version: int | None = None):
    """What ``MSTTrainer``'s check reads from a Trainer (accelerate 1.15 turns FSDP on only on accelerator devices,
    so a CPU Trainer cannot be put in FSDP mode; the check is exercised on the state it reads)."""
    from types import SimpleNamespace

    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = None if fsdp_version is None else FullyShardedDataParallelPlugin(fsdp_version=fsdp_version)
    return SimpleNamespace(is_deepspeed_enabled=deepspeed, is_fsdp_enabled=plugin is not None,
                           accelerator=SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin)))


def test_trainer_refuses_fsdp1_pointing_to_version_2():
    from mst_hf.trainer import MSTTrainer

    with pytest.raises(NotImplementedError, match=r"fsdp_version=1.*`fsdp_version: 2`"):
        MSTTrainer._refuse_unsupported_parallelism(_trainer_state(fsdp_version=1))


def test_trainer_accepts_fsdp2_and_refuses_deepspeed():
    from mst_hf.trainer import MSTTrainer

    MSTTrainer._refuse_unsupported_parallelism(_trainer_state(fsdp_version=2))  # no error
    MSTTrainer._refuse_unsupported_parallelism(_trainer_state())  # no error
    with pytest.raises(NotImplementedError, match="DeepSpeed"):
        MSTTrainer._refuse_unsupported_parallelism(_trainer_state(deepspeed=True))
