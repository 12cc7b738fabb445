"""The "mst_hsa" attention in tiny transformers models against the oracle: outputs, gradients, padding, packing
rules, generation, layer selection, saving, and the errors of `configure_hsa` / `set_hsa_active`."""

import pytest
import torch
from transformers import AttentionInterface, AttentionMaskInterface, AutoModelForCausalLM, LlamaConfig

import mst_hf.attention as hsa

from .helpers import (
    CASES,
    MODELS,
    ORACLE_MASKS,
    SEQ,
    VOCAB,
    assert_same_math,
    build,
    hand_mask,
    twin,
    vector_mask,
)


def test_vector_mask_agrees_with_hand_mask():
    for pattern, head_split in CASES:
        expected = hand_mask(pattern, 17, head_split=head_split)
        assert torch.equal(vector_mask(pattern, 17, head_split=head_split), expected)


def test_register_is_idempotent_and_registers_both_interfaces():
    hsa.register()
    hsa.register()
    assert AttentionInterface._global_mapping["mst_hsa"] is hsa.hsa_attention_forward
    assert AttentionMaskInterface._global_mapping["mst_hsa"] is hsa.hsa_mask_interface


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("pattern,head_split", CASES)
def test_active_hsa_matches_oracle_outputs_and_grads(kind, pattern, head_split):
    model = build(kind, "mst_hsa")
    hsa.configure_hsa(model, pattern=pattern, window=4, stride=3, block=5, head_split=head_split, active=True)
    mask = hand_mask(pattern, SEQ, head_split=head_split)
    ORACLE_MASKS.update({0: mask, 1: mask})
    assert_same_math(model, twin(model, "mst_test_oracle"), torch.randint(3, VOCAB, (2, SEQ)))


@pytest.mark.parametrize("backend", ["sdpa", "eager", "flex"])
def test_forced_backends_match_oracle(backend, monkeypatch):
    monkeypatch.setenv(hsa.HSA_BACKEND_ENV, backend)
    model = build("llama", "mst_hsa")
    hsa.configure_hsa(model, pattern="local_strided", window=4, stride=3, active=True)
    ORACLE_MASKS.update({0: hand_mask("local_strided", SEQ), 1: hand_mask("local_strided", SEQ)})
    ids = torch.randint(3, VOCAB, (2, SEQ))
    with torch.no_grad():  # FlexAttention has no CPU backward: forward only here
        torch.testing.assert_close(model(ids).logits, twin(model, "mst_test_oracle")(ids).logits, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", MODELS)
def test_inactive_or_unconfigured_equals_sdpa(kind):
    model = build(kind, "mst_hsa")
    sdpa = twin(model, "sdpa")
    ids = torch.randint(3, VOCAB, (2, SEQ))
    torch.testing.assert_close(model(ids).logits, sdpa(ids).logits, atol=1e-6, rtol=1e-6)
    hsa.configure_hsa(model, pattern="local", window=2, active=False)
    torch.testing.assert_close(model(ids).logits, sdpa(ids).logits, atol=1e-6, rtol=1e-6)
    hsa.set_hsa_active(model, True)
    assert not torch.allclose(model(ids).logits, sdpa(ids).logits, atol=1e-3)  # the switch does something


@pytest.mark.parametrize("layers,sparse_layers", [("alternate", {0}), ([1], {1})])
def test_layer_selection(layers, sparse_layers):
    model = build("gpt2", "mst_hsa")
    hsa.configure_hsa(model, pattern="local", window=3, layers=layers, active=True)
    for layer in (0, 1):
        ORACLE_MASKS[layer] = hand_mask("local", SEQ, window=3) if layer in sparse_layers else hand_mask("dense", SEQ)
    assert_same_math(model, twin(model, "mst_test_oracle"), torch.randint(3, VOCAB, (1, SEQ)))


@pytest.mark.parametrize("pattern", ["local", "strided", "local_strided", "fixed"])
def test_changing_a_future_token_never_changes_earlier_outputs(pattern):
    model = build("llama", "mst_hsa")
    hsa.configure_hsa(model, pattern=pattern, window=4, stride=3, block=5, active=True)
    ids = torch.randint(3, VOCAB, (1, SEQ))
    changed = ids.clone()
    changed[0, 15] = (ids[0, 15] + 1) % VOCAB
    with torch.no_grad():
        before, after = model(ids).logits, model(changed).logits
    assert torch.equal(before[:, :15], after[:, :15])
    assert not torch.allclose(before[:, 15:], after[:, 15:])


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("pattern", ["local", "fixed", "local_strided"])
def test_left_padded_row_equals_unpadded_row(kind, pattern):
    model = build(kind, "mst_hsa")
    hsa.configure_hsa(model, pattern=pattern, window=4, stride=3, block=5, active=True)
    pad, real = 4, SEQ - 4
    ids = torch.randint(3, VOCAB, (2, SEQ))
    ids[1, :pad] = 0
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :pad] = 0
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        padded = model(ids, attention_mask=attention_mask, position_ids=position_ids).logits[1, pad:]
        alone = model(ids[1:, pad:]).logits[0]
    torch.testing.assert_close(padded, alone, atol=2e-5, rtol=1e-4)
    assert alone.shape[0] == real


def test_mistral_sliding_window_is_composed_with_the_pattern():
    model = build("mistral", "mst_hsa", sliding_window=6)
    hsa.configure_hsa(model, pattern="strided", stride=4, active=True)
    mask = hand_mask("strided", SEQ, stride=4, sliding=6)
    ORACLE_MASKS.update({0: mask, 1: mask})
    assert_same_math(model, twin(model, "mst_test_oracle"), torch.randint(3, VOCAB, (2, SEQ)))


def greedy_without_cache(model, ids, steps):
    for _ in range(steps):
        with torch.no_grad():
            nxt = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


@pytest.mark.parametrize("kind", ["gpt2", "qwen2"])
def test_generate_with_kv_cache_follows_the_pattern(kind):
    model = build(kind, "mst_hsa")
    hsa.configure_hsa(model, pattern="local_strided", window=3, stride=4, active=True)
    mask = hand_mask("local_strided", 32, window=3, stride=4)
    ORACLE_MASKS.update({0: mask, 1: mask})
    prompt = torch.randint(3, VOCAB, (1, 9))
    out = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out, greedy_without_cache(twin(model, "mst_test_oracle"), prompt, 6))


def test_generate_dense_pattern_equals_sdpa():
    model = build("llama", "mst_hsa")
    hsa.configure_hsa(model, pattern="dense", active=True)
    prompt = torch.randint(3, VOCAB, (2, 7))
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(prompt, **kwargs), twin(model, "sdpa").generate(prompt, **kwargs))


def test_state_survives_save_and_reload(tmp_path):
    model = build("qwen2", "mst_hsa")
    state = hsa.configure_hsa(model, pattern="fixed", block=5, layers=[0], active=True)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="mst_hsa").eval()
    assert hsa.get_hsa_state(reloaded) == state
    ids = torch.randint(3, VOCAB, (1, SEQ))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)


def test_set_hsa_active_and_get_state_on_peft_model():
    peft = pytest.importorskip("peft")
    model = build("llama", "mst_hsa")
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    hsa.configure_hsa(wrapped, pattern="local", window=4)
    hsa.set_hsa_active(wrapped, True)
    assert hsa.get_hsa_state(model)["active"] is True
    assert hsa.get_hsa_state(model.config)["window"] == 4


@pytest.mark.parametrize(
    "kwargs,error",
    [
        (dict(pattern="sliding"), ValueError),
        (dict(window=0), ValueError),
        (dict(stride=2.0), ValueError),
        (dict(layers="odd"), ValueError),
        (dict(layers=[0, -1]), ValueError),
        (dict(head_split=True, pattern="fixed"), ValueError),
        (dict(active="yes"), TypeError),
        (dict(backend="cuda_graphs"), ValueError),
    ],
)
def test_configure_rejects_bad_values(kwargs, error):
    model = build("gpt2", "mst_hsa")
    with pytest.raises(error):
        hsa.configure_hsa(model, **kwargs)


def test_configure_hsa_stores_a_spec_and_keeps_the_keyword_shim():
    model = build("llama", "mst_hsa")
    spec = hsa.HSASpec("fixed", block=5, layers=[1])
    assert hsa.configure_hsa(model, spec, active=True) == spec.to_state(active=True)
    assert hsa.get_hsa_spec(model) is spec  # read back as the very object stored, not rebuilt
    assert hsa.configure_hsa(model, pattern="fixed", block=5, layers=[1]) == spec.to_state(active=False)
    with pytest.raises(TypeError, match="both a spec and the fields"):
        hsa.configure_hsa(model, spec, window=8)
    with pytest.raises(TypeError, match="HSASpec"):
        hsa.configure_hsa(model, "local")


def test_misuse_raises_clear_errors(monkeypatch):
    model = build("gpt2", "mst_hsa")
    with pytest.raises(ValueError, match="configure_hsa"):
        hsa.set_hsa_active(model, True)
    with pytest.raises(TypeError):
        hsa.configure_hsa(torch.nn.Linear(2, 2))
    hsa.configure_hsa(model, pattern="local", active=True)
    with pytest.raises(TypeError):
        hsa.set_hsa_active(model, 1)
    monkeypatch.setenv(hsa.HSA_BACKEND_ENV, "cuda")
    with pytest.raises(ValueError, match="MST_HSA_BACKEND"):
        model(torch.randint(3, VOCAB, (1, 8)))


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.gpu
@gpu
def test_cuda_model_training_steps_do_not_recompile():
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=1024)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="mst_hsa").cuda()
    oracle = twin(model, "mst_test_oracle").cuda()
    hsa.configure_hsa(model, pattern="local_strided", window=128, stride=128, layers="alternate", active=True,
                      backend="flex")  # the FlexAttention path is what compiles
    ids = torch.randint(3, VOCAB, (2, 512), device="cuda")
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    graphs = []
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] > 0 and graphs[0] == graphs[-1]  # compiled on the first step, never again
    oracle.load_state_dict(model.state_dict())
    ORACLE_MASKS.update({0: vector_mask("local_strided", 512, 128, 128).cuda(), 1: vector_mask("dense", 512).cuda()})
    ORACLE_MASKS.update({2: ORACLE_MASKS[0], 3: ORACLE_MASKS[1]})
    with torch.no_grad():
        assert relative_error(model(ids).logits, oracle(ids).logits) < 1e-3


def test_a_pattern_that_is_dense_at_the_trained_length_warns_once(monkeypatch):
    import warnings

    import mst_hf.attention.interface as interface

    monkeypatch.setattr(interface, "_WARNED_DENSE", set())
    model = build("llama", "mst_hsa")
    hsa.configure_hsa(model, pattern="local_strided", window=128, stride=128, active=True)  # SEQ = 21 tokens
    ids = torch.randint(3, VOCAB, (1, SEQ))
    with pytest.warns(UserWarning, match=f"'local_strided'.*sequence length {SEQ}.*window < {SEQ - 1}"):
        model(ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(ids)  # once per spec
        hsa.configure_hsa(model, pattern="local_strided", window=4, stride=3, active=True)
        model(ids)  # sparse at this length: nothing to say
