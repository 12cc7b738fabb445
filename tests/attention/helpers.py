"""Shared pieces of the attention tests: tiny models, an independent oracle (explicit per-layer masks built with
Python loops, fp32 masked softmax, registered as the attention "mst_test_oracle"), and model-layout tensors."""

import copy

import torch
from transformers import (
    AttentionInterface,
    AttentionMaskInterface,
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

from mst_hf.attention.impl.reference import reference_attention

VOCAB, SEQ = 100, 21  # 21: not a multiple of any stride / block below
MODELS = ["gpt2", "llama", "qwen2", "mistral"]
CASES = [  # (pattern, head_split)
    ("local", False),
    ("strided", False),
    ("local_strided", False),
    ("fixed", False),
    ("local_strided", True),
]


def tiny_config(kind, **overrides):
    if kind == "gpt2":
        cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, attn_pdrop=0.0,
                         resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=1, eos_token_id=2)
    else:
        cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[kind]
        cfg = cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0)
        if kind == "mistral":
            cfg.sliding_window = None
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def build(kind, attn, seed=0, **overrides):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(kind, **overrides), attn_implementation=attn).eval()


def twin(model, attn):
    """Same weights, another attention implementation (and its own config object)."""
    other = AutoModelForCausalLM.from_config(copy.deepcopy(model.config), attn_implementation=attn).eval()
    other.load_state_dict(model.state_dict())
    return other


def hand_mask(pattern, T, window=4, stride=3, block=5, heads=4, head_split=False, sliding=None):
    mask = torch.zeros(1, heads, T, T, dtype=torch.bool)
    for h in range(heads):
        for q in range(T):
            for k in range(q + 1):
                d = q - k
                if head_split:
                    ok = d < window if h < heads // 2 else d % stride == 0
                elif pattern == "local":
                    ok = d < window
                elif pattern == "strided":
                    ok = d % stride == 0
                elif pattern == "local_strided":
                    ok = d < window or d % stride == 0
                elif pattern == "fixed":
                    ok = q // block == k // block or k % block == block - 1
                else:
                    ok = True
                mask[0, h, q, k] = ok and (sliding is None or d < sliding)
    return mask


def vector_mask(pattern, T, window=4, stride=3, block=5, heads=4, head_split=False):
    """The same SPEC definitions, broadcast (for the long GPU sequences where loops are too slow)."""
    q, k = torch.arange(T)[:, None], torch.arange(T)[None, :]
    d = q - k
    local, strided = d < window, d % stride == 0
    fixed = (q // block == k // block) | (k % block == block - 1)
    rule = {"local": local, "strided": strided, "local_strided": local | strided, "fixed": fixed}.get(pattern, d >= 0)
    per_head = [(local if h < heads // 2 else strided) if head_split else rule for h in range(heads)]
    return (torch.stack(per_head) & (d >= 0))[None]


ORACLE_MASKS = {}


def oracle_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    T = query.shape[2]
    mask = ORACLE_MASKS[module.layer_idx][..., :T, :T]
    return reference_attention(query, key, value, mask, scaling).to(query.dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register("mst_test_oracle", oracle_attention)
AttentionMaskInterface.register("mst_test_oracle", lambda *args, **kwargs: None)


def outputs_and_grads(model, ids, weights):
    model.zero_grad()
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeds).logits
    (logits * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), embeds.grad, grads


def assert_same_math(model, oracle, ids):
    weights = torch.randn(ids.shape[0], ids.shape[1], VOCAB)
    logits, d_embeds, grads = outputs_and_grads(model, ids, weights)
    logits_ref, d_embeds_ref, grads_ref = outputs_and_grads(oracle, ids, weights)
    torch.testing.assert_close(logits, logits_ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(d_embeds, d_embeds_ref, atol=2e-5, rtol=1e-4)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], atol=2e-5, rtol=1e-4, msg=name)


def model_layout(B, H, T, D, **kwargs):
    """(B, H, T, D) views of (B, T, H, D) memory, the layout transformers hands to attention functions."""
    return torch.randn(B, T, H, D, **kwargs).transpose(1, 2).requires_grad_(True)


class NoKernels:
    """Stands in for the device code: launches do nothing, so only the host-side tensor work of a call remains."""

    class _Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    _fwd_kernel = _bwd_dq_kernel = _bwd_dkdv_kernel = _bwd_self_kernel = _Kernel()

    class triton:  # noqa: N801 - mirrors the module attribute `_meta` reads
        @staticmethod
        def next_power_of_2(n):
            return 1 << (n - 1).bit_length()
