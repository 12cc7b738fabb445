"""Shared pieces of the GPU benchmarks: pre-tokenised data, GPT-2 models from config, timing, JSON output."""

import json
import os
import time

import numpy as np
import torch
from transformers import AutoModelForCausalLM, TrainerCallback

from mst_hf.model_sizes import MODEL_SIZES, model_config

# GPT-2 sizes only these benchmarks use (the library's GPT-2 vocabulary and context, other dimensions); the GPT-2
# names of mst_hf.model_sizes.MODEL_SIZES work too
BENCH_GPT2_SIZES = {
    "gpt2-mini": dict(n_layer=6, n_embd=512, n_head=8),
    "gpt2-4x256": dict(n_layer=4, n_embd=256, n_head=4),
}


class TokenBlocks(torch.utils.data.Dataset):
    """Non-overlapping ``block_size`` windows of a uint16 token file (``bench/prepare_data.py``)."""

    def __init__(self, path: str, block_size: int, max_blocks: int | None = None):
        ids = np.fromfile(path, dtype=np.uint16).astype(np.int64)
        n = len(ids) // block_size
        if max_blocks is not None:
            n = min(n, max_blocks)
        self.blocks = torch.from_numpy(ids[: n * block_size].reshape(n, block_size))

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, i):
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def gpt2(size: str, seq_len: int, seed: int = 0, attn_implementation: str = "sdpa"):
    gpt2_names = [n for n, c in MODEL_SIZES.items() if c["model_type"] == "gpt2"] + list(BENCH_GPT2_SIZES)
    if size not in gpt2_names:
        raise ValueError(f"Unknown GPT-2 size {size!r}; choose one of {', '.join(gpt2_names)}.")
    torch.manual_seed(seed)
    base, dims = ("gpt2-124m", BENCH_GPT2_SIZES[size]) if size in BENCH_GPT2_SIZES else (size, {})
    # No dropout (as in current pretraining recipes); attention dropout would also rule out the FlexAttention path.
    cfg = model_config(base, n_positions=max(seq_len, 1024), attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
                       **dims)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation)


class StepTimer(TrainerCallback):
    """Wall time between the end of optimizer step ``start`` and the end of the last step (CUDA synchronised)."""

    def __init__(self, start: int):
        self.start = start
        self.t0 = self.t1 = None
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.start or state.global_step == state.max_steps:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            now = time.perf_counter()
            if state.global_step == self.start:
                self.t0 = now
            else:
                self.t1, self.steps = now, state.global_step - self.start

    @property
    def steps_per_second(self) -> float:
        return self.steps / (self.t1 - self.t0)


def write_json(path: str, data) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
