"""The MST study: dense, MST, RigL, static, gradual magnitude pruning and an iso-FLOP small dense model, all at
equal tokens on the study data of ``python -m study.data``, with the library's counted FLOPs.

    python -m study --data .gpu/study --rung S --jobs 9 --out results/study      # GPU: arms in parallel
    python -m study --smoke --out /tmp/study_smoke                                # CPU: the whole pipeline
    python -m study --report results/study                                        # table and plot again

Arms (``--arms``; ``--arm LABEL=BASE:field=value:...`` adds variants, e.g. ablations of MSTConfig fields):

* ``dense``: the rung's model, no masks;
* ``mst``: ``MSTController`` with ``--preset`` (topology update every ``--update_interval`` steps);
* ``rigl`` / ``static``: constant sparsity at MST's planned mean weight density (gradient growth / no drop-grow),
  dense attention;
* ``gmp``: gradual magnitude pruning on Jin et al.'s schedule (dense until ``--gmp_start`` of the steps, cubic ramp
  to the final sparsity by ``--gmp_end``, fixed after), the final sparsity solved so that the mean density equals
  MST's (capped at ``--gmp_max_sparsity``; when the cap binds, ``gmp_matched`` shortens the dense prefix and the
  ramp in the same 1:3 proportion until the mean density matches);
* ``small_dense``: the same depth, narrower, the width whose dense training FLOPs come closest to MST's planned
  FLOPs (iso-FLOP at equal tokens).

Every arm sees the same blocks in the same order for a seed (single pass by default; ``--passes N`` or an arm's
``passes=N``: N passes over the same blocks, each in a fresh order), AdamW (beta2 0.95, decay 0.1 on matrices), the
learning rate of :func:`mst_hf.schedule.lr_multiplier` (``cosine_floor`` with a warm-up unless the arm sets
``lr_schedule``; peak ``--lr`` or the arm's ``lr=V``), bf16 autocast on CUDA. ``--sweep_lrs`` runs every arm at
every listed LR (one seed, labels ``ARM@lr=V``); the report then picks each arm's best LR and prints the command
that confirms it with every seed (:mod:`study.sweep`). Outputs under ``--out``: one ``ARM-sSEED.json`` per run
(curves, loss spikes included), ``study.md`` (tables) and ``study.png`` (validation loss against counted FLOPs).
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

import mst_hf
from mst_hf.flops import dense_flop_shares as flop_shares
from mst_hf.io.files import write_json

from .arms import DEFAULT_ARMS, RUNGS, Study, parse_arms, parse_value
from .data import EOT, load_tokens, train_bpe
from .frontier import DEFAULT_TOLERANCE
from .loop import run_arm
from .noise import repeat_of
from .report import study_report
from .spikes import DEFAULT_THRESHOLD
from .sweep import sweep_lrs


def parse_seeds(flag: str, text: str) -> list[int]:
    """Comma-separated non-negative integer seeds; a named error for an empty or malformed list."""
    items = [t.strip() for t in text.split(",")]
    if not text.strip() or not all(t.isdigit() for t in items):
        raise ValueError(f"`{flag}` takes comma-separated seeds such as 0,1; got {text!r}.")
    return [int(t) for t in items]


def tasks(args) -> list[tuple[str, str, dict, int]]:
    """Every (arm, seed) run, in order: ``--seeds`` for the ``--two_seed_arms``, the first seed for the others, and
    the seeds after ``@`` for an ``--arm`` spec that has them (e.g. ``--arm x=mst:ultra_sparsity=0.8@1``). In a
    sweep every run has one seed (the first of those), and a repeat ``LABEL#rep`` the first seed of ``LABEL``."""
    seeds = parse_seeds("--seeds", args.seeds)
    arms = parse_arms(args)
    two = set(arms) if args.two_seed_arms == "all" else set(args.two_seed_arms.split(","))
    explicit = {spec.partition("=")[0]: parse_seeds(f"--arm {spec}", spec.partition("@")[2])
                for spec in args.arm if "@" in spec}
    sweeping = bool(sweep_lrs(args))
    todo = []
    for label, (base, ov) in arms.items():
        source = repeat_of(label) or label
        arm = source.rpartition("@lr=")[0] if sweeping else source
        runs = explicit.get(arm, seeds if arm in two else seeds[:1])
        todo += [(label, base, ov, seed) for seed in (runs[:1] if sweeping or source != label else runs)]
    return todo


def launch(args, study: Study) -> None:
    os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)
    write_json(os.path.join(args.out, "args.json"), vars(args))
    todo = tasks(args)
    if args.jobs <= 0:  # in this process, one after the other (the CPU smoke)
        for label, base, ov, seed in todo:
            path = os.path.join(args.out, f"{label}-s{seed}.json")
            write_json(path, run_arm(label, base, ov, seed, args, study, path))
        return
    # workers import this package from where the launcher did, whatever their working directory
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    worker_env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    deadline = time.time() + args.budget_s
    running, queue = [], list(todo)
    while queue or running:
        while queue and len(running) < args.jobs:
            label, _, _, seed = queue.pop(0)
            log = open(os.path.join(args.out, "logs", f"{label}-s{seed}.log"), "w")
            cmd = [sys.executable, "-m", "study", "--worker", f"{label}:{seed}", "--args_json",
                   os.path.join(args.out, "args.json")]
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=worker_env)
            running.append((proc, log, label, seed))
        time.sleep(1)
        for item in list(running):
            proc, log, label, seed = item
            if proc.poll() is not None or time.time() > deadline:
                if proc.poll() is None:
                    print(f"{label} seed {seed}: past --budget_s, stopped", flush=True)
                    proc.kill()
                proc.wait()
                log.close()
                running.remove(item)
                print(f"{label} seed {seed}: exit {proc.returncode}", flush=True)


def worker(args) -> None:
    label, seed = args.worker.rsplit(":", 1)
    base, ov = parse_arms(args)[label]
    path = os.path.join(args.out, f"{label}-s{seed}.json")
    write_json(path, run_arm(label, base, ov, int(seed), args, Study(args), path))


def prepare_data(args) -> None:
    """Decompress the ``.bin.xz`` splits once (into ``--cache``) so that parallel workers only read them."""
    os.makedirs(args.cache, exist_ok=True)
    for split in ("train", "val", "heldout"):
        dst = os.path.join(args.cache, f"{split}.bin")
        if not os.path.isfile(dst):
            load_tokens(os.path.join(args.data, f"{split}.bin")).tofile(dst + ".tmp")
            os.replace(dst + ".tmp", dst)
    for name in ("tokenizer.json", "manifest.json"):
        src = os.path.join(args.data, name)
        if os.path.isfile(src) and not os.path.isfile(os.path.join(args.cache, name)):
            with open(src, "rb") as f, open(os.path.join(args.cache, name), "wb") as g:
                g.write(f.read())
    args.data = args.cache


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=".gpu/study", help="the output folder of python -m study.data")
    p.add_argument("--cache", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "mst_study_data"))
    p.add_argument("--out", default="results/study")
    p.add_argument("--rung", default="S", choices=sorted(RUNGS))
    p.add_argument("--vocab_size", type=int, default=4096)
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=1160, help="optimizer steps per pass (1160 x 64 x 512 = 38.0M tokens)")
    p.add_argument("--passes", type=int, default=1, help="passes over the run's training blocks, each in a fresh "
                   "order (an arm's passes=N overrides it); steps, FLOPs and schedules scale with it")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (an arm's lr=V overrides it)")
    p.add_argument("--lr_warmup", type=float, default=0.05, help="warm-up, fraction of the steps")
    p.add_argument("--lr_floor", type=float, default=0.1, help="final LR as a fraction of the peak")
    p.add_argument("--preset", default="gpt2-4x", help="MSTConfig preset of the mst arm")
    p.add_argument("--update_interval", type=int, default=20)
    p.add_argument("--mst_override", action="append", default=[], help="field=value for the mst arm's config")
    p.add_argument("--arms", default=DEFAULT_ARMS)
    p.add_argument("--arm", action="append", default=[], help="LABEL=BASE:field=value:... (repeatable)")
    p.add_argument("--seeds", default="0,1", help="seeds (a sweep runs the first; its confirm command all)")
    p.add_argument("--sweep_lrs", default="", help="LR sweep: every arm at each of these peak LRs, one seed "
                   "(labels ARM@lr=V), e.g. 1e-3,2e-3,4e-3")
    p.add_argument("--sweep_factor", type=float, default=0.0, help="LR sweep of --sweep_points LRs spaced by this "
                   "factor around --lr (instead of --sweep_lrs)")
    p.add_argument("--sweep_points", type=int, default=3, help="with --sweep_factor: how many LRs")
    p.add_argument("--repeat", default="", help="labels to run again with the same seed (as LABEL#rep): the "
                   "same-seed noise of the report")
    p.add_argument("--spike_threshold", type=float, default=DEFAULT_THRESHOLD, help="a run is unstable where its "
                   "smoothed training loss rises this many nats above its running minimum (after 10%% of the steps)")
    p.add_argument("--two_seed_arms", default="dense,mst,rigl", help="arms run with every seed ('all': every arm)")
    p.add_argument("--gmp_start", type=float, default=0.25)
    p.add_argument("--gmp_end", type=float, default=0.75)
    p.add_argument("--gmp_max_sparsity", type=float, default=0.95)
    p.add_argument("--evals", type=int, default=20, help="evaluations along the run (curve points)")
    p.add_argument("--curve_blocks", type=int, default=256, help="validation blocks per curve point")
    p.add_argument("--eval_batch", type=int, default=128)
    p.add_argument("--final_blocks", type=int, default=0, help="blocks of each final evaluation (0: all)")
    p.add_argument("--extra_val", action="append", default=[], help="NAME=PATH of a text file (repeatable)")
    p.add_argument("--hsa_backend", default="", help="force an HSA backend (MST_HSA_BACKEND)")
    p.add_argument("--jobs", type=int, default=0, help="parallel worker processes (0: in this process)")
    p.add_argument("--budget_s", type=float, default=420.0, help="stop workers still running after this long")
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run of the whole pipeline")
    p.add_argument("--reference", default="dense", help="with --report: the dense arm gaps and 'FLOPs to reach' "
                   "use (e.g. dense_wsd)")
    p.add_argument("--compare", default="mst", help="with --report: the arm of the 'val - ARM' column")
    p.add_argument("--noise_arms", default="", help="arms whose seed spread and same-seed repeats set the noise "
                   "floor (default: --reference and --compare)")
    p.add_argument("--frontier", action="store_true", help="with --report: the dense-frontier tables")
    p.add_argument("--budget_tolerance", type=float, default=DEFAULT_TOLERANCE, help="with --frontier: counted "
                   "FLOP totals within this fraction form one budget")
    p.add_argument("--report", default=None, help="only rebuild study.md / study.png from the JSONs of these "
                   "folders (comma-separated; written to --out when given, else the first folder)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--args_json", default=None, help=argparse.SUPPRESS)
    return p


def smoke_setup(args) -> None:
    """A few seconds of everything: a 512-token BPE on Moby Dick (shipped with the package), a 2-layer model."""
    torch.set_num_threads(1)
    args.cpu, args.rung, args.vocab_size = True, "tiny", 512
    args.seq_len, args.batch, args.update_interval = 64, 8, 5
    args.steps = args.steps if "--steps" in args.command.split() else 40
    args.evals, args.curve_blocks, args.eval_batch, args.hsa_backend = 3, 8, 32, args.hsa_backend or "sdpa"
    args.mst_override = args.mst_override + ["hsa_window=16", "hsa_stride=16"]
    args.data = os.path.join(args.out, "smoke_data")
    if os.path.isfile(os.path.join(args.data, "train.bin")):
        return
    book = os.path.join(os.path.dirname(mst_hf.__file__), "data", "moby-dick", "moby-dick.txt")
    with open(book, encoding="utf-8") as f:
        text = f.read()[:400_000]  # a third of the book: enough for a 512-token BPE and 40 steps
    chunks = [text[i : i + 20000] for i in range(0, len(text), 20000)]
    splits = {"train": chunks[:-6], "val": chunks[-6:-3], "heldout": chunks[-3:]}
    tok = train_bpe(splits["train"], args.vocab_size)
    os.makedirs(args.data, exist_ok=True)
    tok.save(os.path.join(args.data, "tokenizer.json"))
    eot = tok.token_to_id(EOT)
    for name, parts in splits.items():
        ids = [i for enc in tok.encode_batch(parts, add_special_tokens=False) for i in enc.ids + [eot]]
        np.asarray(ids, dtype=np.uint16).tofile(os.path.join(args.data, f"{name}.bin"))


def report_options(args) -> dict:
    return dict(reference=args.reference, compare=args.compare, frontier=args.frontier,
                noise_arms=[a for a in args.noise_arms.split(",") if a] or None, tolerance=args.budget_tolerance,
                spike_threshold=args.spike_threshold)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the report's confirm command is built from it
    args.command = "python -m study " + " ".join(args.argv)
    if args.args_json:  # a worker: the launcher's arguments, plus which run
        worker_id = args.worker
        with open(args.args_json) as f:
            args = argparse.Namespace(**json.load(f))
        args.worker = worker_id
        args.mst_overrides = {k: parse_value(v) for k, v in (o.split("=", 1) for o in args.mst_override)}
        worker(args)
        return 0
    if args.report:
        study_report(args.report, args.out if "--out" in args.argv else None, **report_options(args))
        return 0
    if args.smoke:
        smoke_setup(args)
    else:
        prepare_data(args)
    args.mst_overrides = {k: parse_value(v) for k, v in (o.split("=", 1) for o in args.mst_override)}
    study = Study(args)
    used = {base for base, _ in parse_arms(args).values()}
    plan = {"mst_reduction": study.mst_plan.flop_reduction, "mst_mean_density": study.mst_density,
            "flop_shares": flop_shares(study.base_fm, args.seq_len)}
    for key, arm in (("gmp", "gmp"), ("gmp_matched", "gmp_matched"), ("small_dense", "small_dense")):
        if arm in used:
            plan[key] = getattr(study, "small" if arm == "small_dense" else arm)
    print("study plan:", json.dumps(plan), flush=True)
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "study_plan.json"), plan)
    launch(args, study)
    study_report(args.out, **report_options(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
