"""Ranks compare fingerprints of their new masks instead of broadcasting them; only a mismatch costs a broadcast
(two CPU processes over gloo)."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mst_hf import MSTConfig, MSTController
from mst_hf.masks import mask_fingerprint


def test_fingerprint_tells_masks_apart():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(32, 48, generator=g) > 0.7
    moved = mask.clone()
    on = mask.flatten().nonzero()[0].item()
    off = (~mask).flatten().nonzero()[0].item()
    moved.view(-1)[on], moved.view(-1)[off] = False, True  # same count, one connection moved
    assert mask_fingerprint(mask) == mask_fingerprint(mask.clone())
    assert mask_fingerprint(mask) != mask_fingerprint(moved)
    assert mask_fingerprint(mask) != mask_fingerprint(mask.t().contiguous().view(32, 48))


def _agree(ctl, rank: int, tamper: bool) -> dict:
    masks = {n: ctl.masks.masks[n].clone() for n in ctl.masks.masks}
    if tamper and rank == 1:
        name = next(iter(masks))
        masks[name].view(-1)[0] = ~masks[name].view(-1)[0]
    sent = []
    original = dist.broadcast
    dist.broadcast = lambda *a, **k: (sent.append(1), original(*a, **k))[1]
    try:
        agreed = ctl._agree(masks)
    finally:
        dist.broadcast = original
    return {"masks": agreed, "broadcasts": len(sent)}


def _worker(rank: int, init_file: str, results: str):
    from tests.helpers import tiny_gpt2

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        ctl = MSTController(tiny_gpt2(), MSTConfig(hsa_pattern="dense", initial_sparsity=0.5))
        out = {case: _agree(ctl, rank, case == "differ") for case in ("agree", "differ")}
        torch.save(out, os.path.join(results, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in (0, 1)]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["agree", "differ"])
def test_ranks_broadcast_only_when_their_masks_differ(two_ranks, case):
    r0, r1 = (r[case] for r in two_ranks)
    assert r0["broadcasts"] == r1["broadcasts"] == (1 if case == "differ" else 0)
    assert r0["masks"].keys() == r1["masks"].keys()
    assert all(torch.equal(r0["masks"][n], r1["masks"][n]) for n in r0["masks"])
