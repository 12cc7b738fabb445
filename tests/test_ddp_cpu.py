"""examples/run_clm_mst.py under `accelerate launch` with 2 CPU processes (DDP over gloo): the masks must be
identical on both ranks after every topology update, and TensorBoard gets the mst/* scalars.

accelerate 1.15 launches several CPU processes only through torchrun (`--multi_gpu`, with `ACCELERATE_USE_CPU=true`
and the Trainer's `--use_cpu`): `--cpu --num_processes 2` starts a single process unless mpirun is used."""

import glob
import json
import os
import socket
import subprocess
import sys

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "run_clm_mst.py")
STEPS = 10


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """Output folder and digest-file prefix of one tiny 2-process CPU run."""
    out = tmp_path_factory.mktemp("ddp")
    digests = os.path.join(out, "digests")
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
        "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        EXAMPLE, "--use_cpu", "--output_dir", str(out), "--max_steps", str(STEPS), "--block_size", "32",
        "--max_train_samples", "64", "--max_eval_samples", "8", "--per_device_train_batch_size", "2",
        "--per_device_eval_batch_size", "4", "--eval_strategy", "no", "--logging_steps", "2",
        "--config_overrides", "n_layer=2,n_embd=32,n_head=2", "--ddp_backend", "gloo",
        "--mst_update_interval", "2", "--mst_final_sparsity", "0.5", "--mst_grow_method", "mixed",
        "--mst_mask_digest_file", digests, "--report_to", "tensorboard",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out, digests


def read_digests(path: str) -> dict[int, str]:
    with open(path, encoding="utf-8") as f:
        return {row["step"]: row["digest"] for row in map(json.loads, f)}


@pytest.mark.slow
def test_masks_identical_on_both_ranks_at_every_update(ddp_run):
    _, digests = ddp_run
    rank0, rank1 = read_digests(digests + ".rank0"), read_digests(digests + ".rank1")
    assert len(rank0) >= 3 and rank0 == rank1


@pytest.mark.slow
def test_masks_change_between_updates(ddp_run):
    """The digests must not be a constant (a test of identical masks that never change could not fail)."""
    _, digests = ddp_run
    assert len(set(read_digests(digests + ".rank0").values())) >= 3


@pytest.mark.slow
def test_tensorboard_events_hold_mst_scalars(ddp_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = ddp_run
    event_files = glob.glob(os.path.join(out, "**", "events.out.tfevents.*"), recursive=True)
    points: dict[str, int] = {}  # tag -> number of logged points, over all event files of the run
    for path in event_files:
        accumulator = EventAccumulator(path)
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            points[tag] = points.get(tag, 0) + len(accumulator.Scalars(tag))
    wanted = ("train/loss", "train/mst/sparsity", "train/mst/total_flops", "train/mst/flop_reduction",
              "train/mst/attention_density")
    # one point per training log line (every 2 of the 10 steps), not only the final evaluation's
    assert {tag: points.get(tag, 0) >= STEPS // 2 for tag in wanted} == dict.fromkeys(wanted, True), points
