"""Tiny models built from configs and a synthetic dataset, shared by the tests."""

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

VOCAB = 64


def tiny_gpt2(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cfg = dict(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0)
    cfg.update(overrides)
    return AutoModelForCausalLM.from_config(GPT2Config(**cfg))


def tiny_llama(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cfg = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
        pad_token_id=0,
    )
    cfg.update(overrides)
    return AutoModelForCausalLM.from_config(LlamaConfig(**cfg))


def toy_dataset(n: int = 64, seq_len: int = 32, seed: int = 0):
    """Learnable sequences: each row counts upward from a random start (mod VOCAB), so the loss can fall fast."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, VOCAB, (n, 1), generator=g)
    rows = (starts + torch.arange(seq_len)) % VOCAB
    return [{"input_ids": r, "labels": r.clone()} for r in rows]
