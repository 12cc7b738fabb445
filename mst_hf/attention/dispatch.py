"""Backend choice for HSA on a plain causal sequence: which kernel runs, and the measured ``auto`` cache.

All kernels take ``query (B, H, T, D)`` and ``key``/``value`` ``(B, Hkv, T, D)`` (``H % Hkv == 0``: grouped-query
attention) and return ``(B, H, T, D)``. Kernels (the names `run_kernel`, `auto_candidates` and the benchmark use):

- ``sdpa_causal``: SDPA with ``is_causal=True`` (the dense pattern only).
- ``sdpa_bool``:   SDPA with the pattern as a boolean mask: correct for every pattern and device, no sparsity win.
- ``eager``:       `reference_attention` (float32 math with an explicit mask); the oracle.
- ``perm_sdpa``:   strided as causal SDPA with the residue classes folded into the heads (`impl.sdpa`).
- ``chunk_sdpa``:  local and fixed as SDPA over query chunks against small key sets (`impl.sdpa`).
- ``flex``:        FlexAttention with cached ``BlockMask``s in block-sparse layouts (`impl.flex`).
- ``triton``:      block-sparse flash attention in Triton (`impl.triton`): local, strided, local_strided and fixed,
                   forward and backward, with few kernel launches. Triton is imported when this kernel first runs.

Backends (``HSASpec.backend``) map to kernels: ``auto`` (measured once per shape on CUDA; the fastest correct
candidate wins), ``flex``, ``triton``, ``sdpa`` (``sdpa_bool``), ``eager``.
"""

import math
import time
import warnings

import torch

from .impl import flex, sdpa
from .impl.reference import reference_pattern_attention
from .impl.triton import TRITON_PATTERNS, triton_attention, triton_available
from .patterns import BACKENDS, HSASpec, check_pattern_name

KERNELS = ("sdpa_causal", "sdpa_bool", "eager", "perm_sdpa", "chunk_sdpa", "flex", "triton")


_AUTO_CHOICE: dict = {}


def auto_candidates(spec: HSASpec, seq_len: int, head_dim: int, device, dropout=0.0) -> list:
    """Correct kernels `auto` chooses among, for this pattern and shape (CUDA: measured once, fastest wins)."""
    if spec.pattern == "dense":
        return ["sdpa_causal"]
    if torch.device(device).type != "cuda":
        return ["sdpa_bool"]
    candidates = []
    # flex: no dropout, head_dim >= 16, lengths in whole 128-blocks (each new length is a new compiled kernel)
    if dropout == 0.0 and flex.flex_available() and head_dim >= 16 and seq_len % flex.FLEX_BLOCK == 0:
        candidates.append("flex")
    if _triton_fits(spec, head_dim, dropout) and triton_available(device):
        candidates.append("triton")
    if spec.pattern in ("local", "fixed") and not spec.head_split:
        candidates.append("chunk_sdpa")
    if spec.pattern == "strided" and not spec.head_split:
        candidates.append("perm_sdpa")
    if seq_len <= 4096 or not candidates:  # O(T^2) memory; never the fastest at long lengths
        candidates.append("sdpa_bool")
    return candidates


def _triton_fits(spec: HSASpec, head_dim: int, dropout: float) -> bool:
    # head_dim <= 128: the tiles are sized for it (measured at 64; larger head dims may exceed shared memory)
    return dropout == 0.0 and spec.pattern in TRITON_PATTERNS and not spec.head_split and head_dim <= 128


def _measure(candidates, q, k, v, spec, scaling, dropout, rounds=3, reps=2) -> dict:
    """Fastest of `rounds` timings (each `reps` calls) per kernel, the kernels interleaved round by round so that
    none is timed alone on a GPU whose clocks are still ramping up after a compile. Failures drop a kernel."""

    def step(kernel):
        out = run_kernel(kernel, q, k, v, spec, scaling, dropout)
        if out.requires_grad:
            torch.autograd.grad(out, [x for x in (q, k, v) if x.requires_grad], torch.ones_like(out))

    ok = []
    for kernel in candidates:
        try:
            step(kernel)  # compile, build masks
            step(kernel)
            ok.append(kernel)
        except Exception as err:  # noqa: BLE001 - out of memory, a Triton resource limit...: not a candidate here
            warnings.warn(f"HSA backend 'auto' dropped kernel {kernel!r} for {spec}: {type(err).__name__}: {err}",
                          stacklevel=2)
            continue
    sync = torch.cuda.synchronize if q.device.type == "cuda" else (lambda: None)
    best = {}
    for _ in range(rounds):
        for kernel in ok:
            sync()
            start = time.perf_counter()
            for _ in range(reps):
                step(kernel)
            sync()
            best[kernel] = min(best.get(kernel, float("inf")), time.perf_counter() - start)
    return best


def auto_kernel(query, key, value, spec: HSASpec, scaling=None, dropout=0.0) -> str:
    """The kernel `auto` runs: the only candidate, or on CUDA the fastest candidate measured once per pattern,
    shape, dtype and memory layout on random inputs of the same shape (forward + backward when grad is on; RNG
    state untouched). Like ``cudnn.benchmark``: every candidate computes the same function."""
    if torch.compiler.is_compiling():  # no measuring while tracing
        candidates = auto_candidates(spec, query.shape[2], query.shape[3], query.device, dropout)
        # triton (a custom op under torch.compile) is what measuring picks at nearly every pattern and length
        return "triton" if "triton" in candidates else candidates[0]
    grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    cache_key = (spec, query.shape, query.stride(), key.shape[1], query.dtype, query.device, dropout > 0.0, grad)
    choice = _AUTO_CHOICE.get(cache_key)  # the common case first: this call runs once per layer and step
    if choice is not None:
        return choice
    candidates = auto_candidates(spec, query.shape[2], query.shape[3], query.device, dropout)
    if len(candidates) == 1:
        choice = candidates[0]
    else:
        devices = [query.device] if query.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad() if grad else torch.no_grad():
            q, k, v = (torch.randn_like(x).requires_grad_(grad) for x in (query, key, value))
            times = _measure(candidates, q, k, v, spec, scaling, dropout)
        choice = min(times, key=times.get) if times else "sdpa_bool"
    _AUTO_CHOICE[cache_key] = choice
    return choice


def choose_kernel(spec: HSASpec, seq_len: int, head_dim: int, device, backend="auto", dropout=0.0) -> str:
    """The kernel a forced backend runs (``auto`` without measuring: its first candidate)."""
    if backend not in BACKENDS:
        raise ValueError(f"Unknown HSA backend {backend!r}. Valid backends: {', '.join(BACKENDS)}.")
    check_pattern_name(spec.pattern)
    if backend == "eager":
        return "eager"
    if spec.pattern == "dense":
        return "sdpa_causal"
    if backend == "sdpa" or dropout > 0.0:
        return "sdpa_bool"
    if backend == "flex":
        return "flex"
    if backend == "triton":
        if not _triton_fits(spec, head_dim, dropout):
            raise NotImplementedError(
                f"backend='triton' computes the patterns {', '.join(TRITON_PATTERNS)} without head_split, dropout "
                f"or head_dim > 128 (got {spec}, head_dim={head_dim}); use backend='auto' or 'flex'."
            )
        if not triton_available(device):
            raise NotImplementedError(
                f"backend='triton' needs a CUDA device and the `triton` package (device {device}); "
                "use backend='auto' or 'sdpa'."
            )
        return "triton"
    return auto_candidates(spec, seq_len, head_dim, device, dropout)[0]


def run_kernel(kernel, query, key, value, spec: HSASpec, scaling=None, dropout=0.0, engine="flex"):
    """Run one named kernel for `spec` on a plain causal sequence; returns ``(B, H, T, D)`` in the query's dtype."""
    D = query.shape[3]
    if kernel == "sdpa_causal":
        return sdpa.sdpa_causal(query, key, value, scaling, dropout)
    if kernel == "sdpa_bool":
        return sdpa.sdpa_bool(query, key, value, spec, scaling, dropout)
    if kernel == "eager":
        return reference_pattern_attention(query, key, value, spec, scaling)
    if kernel == "perm_sdpa" and spec.pattern == "strided" and not spec.head_split:
        return sdpa.strided_perm_sdpa(query, key, value, spec.stride, scaling, dropout)
    if kernel == "chunk_sdpa" and spec.pattern == "local" and not spec.head_split:
        return sdpa.local_chunk_sdpa(query, key, value, spec.window, scaling, dropout)
    if kernel == "chunk_sdpa" and spec.pattern == "fixed":
        return sdpa.fixed_chunk_sdpa(query, key, value, spec.block, scaling, dropout)
    if kernel == "triton" and _triton_fits(spec, D, dropout):
        return triton_attention(query, key, value, spec, scaling)  # repeats grouped-query heads itself, copying once
    if kernel == "flex":
        if dropout > 0.0:
            raise NotImplementedError(f"FlexAttention has no dropout (got dropout={dropout}); use backend='sdpa'.")
        scale = math.sqrt(1 / D) if scaling is None else scaling
        return flex.pattern_attention(query, key, value, spec, scale, engine)
    if kernel in KERNELS:
        raise ValueError(f"kernel {kernel!r} does not compute {spec}; see auto_candidates().")
    raise ValueError(f"Unknown kernel {kernel!r}. Valid kernels: {', '.join(KERNELS)}.")


def one_dtype(query, key, value) -> tuple:
    """``query``, ``key``, ``value`` in one dtype, as SDPA takes them: under autocast all in the autocast dtype (e.g.
    Llama's rotary embedding leaves ``query`` and ``key`` in float32 while ``value`` is bfloat16, which SDPA casts
    and the Triton kernels cannot mix); outside autocast they must already agree."""
    device = query.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        return tuple(t if t.dtype == dtype else t.to(dtype) for t in (query, key, value))
    if not query.dtype == key.dtype == value.dtype:
        raise TypeError(f"HSA attention needs query, key and value in one dtype, got {query.dtype}, {key.dtype} and "
                        f"{value.dtype}; cast them, or run under torch.autocast as transformers' Trainer does with "
                        "bf16=True.")
    return query, key, value


def hsa_attention(query, key, value, spec: HSASpec, scaling=None, backend="auto", dropout=0.0) -> torch.Tensor:
    """HSA pattern attention on a plain causal sequence (no padding, positions 0..T-1), kernel chosen by `backend`;
    ``query``, ``key`` and ``value`` are brought to one dtype first (:func:`one_dtype`)."""
    query, key, value = one_dtype(query, key, value)
    if backend == "auto":
        kernel = auto_kernel(query, key, value, spec, scaling, dropout)
    else:
        kernel = choose_kernel(spec, query.shape[2], query.shape[3], query.device, backend, dropout)
    return run_kernel(kernel, query, key, value, spec, scaling, dropout)
