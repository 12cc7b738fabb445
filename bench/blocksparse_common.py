"""Shared pieces of the block-sparse benchmarks: exact-density random block masks, interleaved CUDA-event timing,
the hardware line."""

import platform
import statistics
import subprocess
import time

import torch


def random_block_mask(rows: int, cols: int, density: float, generator: torch.Generator) -> torch.Tensor:
    """A ``(rows, cols)`` boolean block mask with exactly ``round(density * rows * cols)`` active blocks (at least
    one), placed uniformly at random (rows get unequal counts, as MST's masks do)."""
    n = max(1, round(density * rows * cols))
    mask = torch.zeros(rows * cols, dtype=torch.bool)
    mask[torch.randperm(rows * cols, generator=generator)[:n]] = True
    return mask.view(rows, cols)


def time_interleaved(fns: dict, reps: int = 10, rounds: int = 5, warmup: int = 3) -> dict:
    """Median milliseconds per call of each function, measured round-robin (each round times ``reps`` calls of
    every function in turn between two CUDA events), so clock and thermal drift hit all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    cuda = torch.cuda.is_available()  # without CUDA (the --smoke check in the interpreter): wall clock
    if cuda:
        torch.cuda.synchronize()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            if cuda:
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end) / reps)
            else:
                times[name].append((time.perf_counter() - t0) * 1e3 / reps)
    return {k: statistics.median(v) for k, v in times.items()}


def graphed(fn, warmup: int = 3):
    """`fn` captured in a CUDA graph (a replay callable), or None when capture fails. Replays time the GPU work
    alone, without the host time of the eager calls."""
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay
    except Exception as e:  # capture is best effort: the eager times are the main result
        print(f"CUDA graph capture failed: {type(e).__name__}: {str(e)[:200]}")
        return None


def hardware() -> str:
    if not torch.cuda.is_available():
        return f"CPU {platform.machine()}, torch {torch.__version__}"
    try:
        driver = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        driver = "?"
    import triton

    return (
        f"{torch.cuda.get_device_name(0)} (driver {driver}), torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"triton {triton.__version__}"
    )
