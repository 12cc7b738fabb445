"""Models whose attention needs their own eager code (Gemma 2's logit softcapping) under "mst_hsa": dense and HSA
phases run, the dense pattern equals the model's eager attention, and a sparse pattern equals an independent
softcapped oracle (the pattern composed with Gemma 2's sliding window on its sliding layers)."""

import copy

import pytest
import torch
from transformers import AttentionInterface, AttentionMaskInterface, AutoModelForCausalLM, Gemma2Config

import mst_hf.attention as hsa
from mst_hf import MSTConfig, MSTController

from .helpers import hand_mask

VOCAB, T, SLIDING = 100, 16, 8
SOFTCAP = 0.05  # small enough that the cap changes the logits (at 5.0 tanh is the identity on tiny scores)


def tiny_gemma2(attn, seed=0):
    cfg = Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                       sliding_window=SLIDING, attn_logit_softcapping=SOFTCAP, final_logit_softcapping=None,
                       query_pre_attn_scalar=8, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).eval()


def twin(model, attn):
    other = AutoModelForCausalLM.from_config(copy.deepcopy(model.config), attn_implementation=attn).eval()
    other.load_state_dict(model.state_dict())
    return other


SOFTCAP_MASKS = {}


def softcap_oracle(module, query, key, value, attention_mask, scaling=None, softcap=None, **kwargs):
    """float32 ``softmax(softcap * tanh(q k^T * scaling / softcap))`` under the explicit per-layer mask."""
    rep = query.shape[1] // key.shape[1]
    k, v = (x.float().repeat_interleave(rep, dim=1) for x in (key, value))
    scores = query.float() @ k.transpose(-1, -2) * scaling  # (B, H, T, T)
    scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~SOFTCAP_MASKS[module.layer_idx], float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register("mst_test_softcap_oracle", softcap_oracle)
AttentionMaskInterface.register("mst_test_softcap_oracle", lambda *args, **kwargs: None)


def loss(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize("active", [False, True])
def test_dense_pattern_equals_the_models_eager_attention(active):
    model = tiny_gemma2("mst_hsa")
    hsa.configure_hsa(model, pattern="dense" if active else "local", window=4, active=active)
    ids = torch.randint(3, VOCAB, (2, T))
    torch.testing.assert_close(loss(model, ids), loss(twin(model, "eager"), ids), atol=1e-6, rtol=1e-6)


def test_sparse_pattern_is_softcapped_and_composed_with_the_sliding_window():
    model = tiny_gemma2("mst_hsa")
    hsa.configure_hsa(model, pattern="local_strided", window=3, stride=4, active=True)
    assert model.config.layer_types[:2] == ["sliding_attention", "full_attention"]
    SOFTCAP_MASKS[0] = hand_mask("local_strided", T, window=3, stride=4, sliding=SLIDING)
    SOFTCAP_MASKS[1] = hand_mask("local_strided", T, window=3, stride=4)
    ids = torch.randint(3, VOCAB, (2, T))
    with torch.no_grad():
        expected = twin(model, "mst_test_softcap_oracle")(ids).logits
        torch.testing.assert_close(model(ids).logits, expected, atol=2e-5, rtol=1e-4)


def test_controller_trains_gemma2_through_dense_and_sparse_phases():
    model = tiny_gemma2("eager").train()  # MSTController switches it to "mst_hsa"
    cfg = MSTConfig(ultra_sparsity=0.5, warmup_ratio=0.25, restoration_ratio=0.25, update_interval=2,
                    hsa_pattern="local", hsa_window=4)
    ctl = MSTController(model, cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(3, VOCAB, (2, T))
    phases = []
    for step in range(8):
        phases.append(ctl.before_forward(step, 8, {"input_ids": ids}))
        out = model(input_ids=ids, labels=ids).loss
        out.backward()
        ctl.after_backward(step, 8, optimizer)
        optimizer.step()
        optimizer.zero_grad()
        ctl.after_optimizer_step()
        assert torch.isfinite(out)
    assert False in phases and True in phases  # both dense and sparse attention steps ran


class NoEagerCodeAttention(torch.nn.Module):
    """An attention module whose modeling file (this test file) has no `eager_attention_forward`."""


def test_softcap_without_the_models_eager_code_is_refused_with_the_fix():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(NotImplementedError, match="softcap.*hsa_pattern='dense'"):
        hsa.hsa_attention_forward(NoEagerCodeAttention(), q, q, q, None, softcap=1.0)
