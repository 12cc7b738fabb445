import os

os.environ["HF_HUB_OFFLINE"] = "1"

import copy
import warnings

import pytest
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

import mst_hf.attention as hsa
from mst_hf.attention_kernels import (
    PatternSpec,
    _block_mask,
    auto_candidates,
    fixed_attention,
    local_strided_attention,
    reference_attention,
    run_kernel,
    strided_attention,
)

warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")

VOCAB, SEQ = 100, 21  # 21: not a multiple of any stride / block below


@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread():
    """Tiny models: intra-op threads only add contention on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


# --- an independent oracle: explicit per-layer masks built with Python loops, fp32 masked softmax --------------
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


def test_vector_mask_agrees_with_hand_mask():
    for pattern, head_split in CASES:
        expected = hand_mask(pattern, 17, head_split=head_split)
        assert torch.equal(vector_mask(pattern, 17, head_split=head_split), expected)


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


MODELS = ["gpt2", "llama", "qwen2", "mistral"]
CASES = [  # (pattern, head_split)
    ("local", False),
    ("strided", False),
    ("local_strided", False),
    ("fixed", False),
    ("local_strided", True),
]


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


def test_flex_on_cpu_refuses_backward():
    q = torch.randn(1, 2, 8, 16, requires_grad=True)
    with pytest.raises(NotImplementedError, match="CPU"):
        run_kernel("flex", q, q, q, PatternSpec("local", window=2))


# --- the fast layouts, on CPU through the differentiable "math" engine (GPU tests below run them on flex) -------
@pytest.mark.parametrize("seq_len", [8, 29, 64])
@pytest.mark.parametrize("window,stride,block", [(4, 3, 5), (3, 8, 4), (9, 4, 16)])
def test_layouts_match_reference_with_grads(seq_len, window, stride, block):
    torch.manual_seed(seq_len)
    q = torch.randn(2, 4, seq_len, 16, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, seq_len, 16, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, seq_len, 16, dtype=torch.float64, requires_grad=True)
    runs = {
        "local_strided": lambda: local_strided_attention(q, k, v, window, stride, 0.25, engine="math")[0],
        "strided": lambda: strided_attention(q, k, v, stride, 0.25, engine="math")[0],
        "fixed": lambda: fixed_attention(q, k, v, block, 0.25, engine="math")[0],
    }
    for pattern, run in runs.items():
        mask = hand_mask(pattern, seq_len, window, stride, block, heads=1)
        expected = reference_attention(q, k, v, mask, 0.25).double()
        out = run()
        grad_out = torch.randn_like(out)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5, msg=pattern)
        got = torch.autograd.grad(out, (q, k, v), grad_out)
        want = torch.autograd.grad(expected, (q, k, v), grad_out)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5, msg=pattern)


def model_layout(B, H, T, D, **kwargs):
    """(B, H, T, D) views of (B, T, H, D) memory, the layout transformers hands to attention functions."""
    return torch.randn(B, T, H, D, **kwargs).transpose(1, 2).requires_grad_(True)


@pytest.mark.parametrize(
    "kernel,spec",
    [
        ("perm_sdpa", PatternSpec("strided", stride=4)),
        ("perm_sdpa", PatternSpec("strided", stride=7)),
        ("chunk_sdpa", PatternSpec("local", window=5)),
        ("chunk_sdpa", PatternSpec("local", window=16)),
        ("chunk_sdpa", PatternSpec("fixed", block=6)),
        ("chunk_sdpa", PatternSpec("fixed", block=16)),
    ],
)
@pytest.mark.parametrize("seq_len", [27, 64])
def test_sdpa_layouts_match_reference_with_grads(kernel, spec, seq_len):
    q = model_layout(2, 4, seq_len, 16)
    k, v = model_layout(2, 2, seq_len, 16), model_layout(2, 2, seq_len, 16)
    out = run_kernel(kernel, q, k, v, spec)
    mask = vector_mask(spec.pattern, seq_len, spec.window, spec.stride, spec.block, heads=1)
    expected = reference_attention(q, k, v, mask)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    grad_out = torch.randn_like(out)
    for g, w in zip(torch.autograd.grad(out, (q, k, v), grad_out), torch.autograd.grad(expected, (q, k, v), grad_out)):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_auto_on_cpu_uses_the_boolean_mask_and_kernels_refuse_other_patterns():
    spec = PatternSpec("local", window=4)
    assert auto_candidates(spec, 256, 64, "cpu") == ["sdpa_bool"]
    assert auto_candidates(PatternSpec("dense"), 256, 64, "cpu") == ["sdpa_causal"]
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="does not compute"):
        run_kernel("perm_sdpa", q, q, q, spec)


def test_auto_measures_candidates_once_keeps_rng_and_drops_failing_ones(monkeypatch):
    import mst_hf.attention_kernels as kernels

    calls = []
    real_run = kernels.run_kernel

    def counting_run(kernel, *args, **kwargs):
        calls.append(kernel)
        if kernel == "perm_sdpa":
            raise RuntimeError("out of memory")
        return real_run(kernel, *args, **kwargs)

    monkeypatch.setattr(kernels, "auto_candidates", lambda *a, **k: ["perm_sdpa", "chunk_sdpa", "sdpa_bool"])
    monkeypatch.setattr(kernels, "run_kernel", counting_run)
    q = model_layout(1, 2, 32, 16)
    spec = PatternSpec("local", window=4)
    rng = torch.get_rng_state()
    with pytest.warns(UserWarning, match="dropped kernel 'perm_sdpa'.*out of memory"):
        choice = kernels.auto_kernel(q, q, q, spec)
    assert choice in ("chunk_sdpa", "sdpa_bool")
    assert torch.equal(torch.get_rng_state(), rng)
    measured = len(calls)
    assert kernels.auto_kernel(q, q, q, spec) == choice and len(calls) == measured  # cached: no new runs


def test_auto_inside_torch_compile_skips_triton_and_measures_nothing(monkeypatch):
    import mst_hf.attention_kernels as kernels

    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr(kernels, "_measure", lambda *a, **k: pytest.fail("measured while tracing"))
    q = model_layout(1, 2, 32, 16)
    spec = PatternSpec("local", window=4)
    monkeypatch.setattr(kernels, "auto_candidates", lambda *a, **k: ["triton", "chunk_sdpa", "sdpa_bool"])
    assert kernels.auto_kernel(q, q, q, spec) == "chunk_sdpa"
    monkeypatch.setattr(kernels, "auto_candidates", lambda *a, **k: ["triton"])
    assert kernels.auto_kernel(q, q, q, spec) == "sdpa_bool"


def test_block_masks_are_cached_not_rebuilt():
    first = _block_mask(("local", 4), 256, 256, torch.device("cpu"))
    assert _block_mask(("local", 4), 256, 256, torch.device("cpu")) is first
    assert first.mask_mod is _block_mask(("local", 4), 256, 256, torch.device("cpu")).mask_mod


# --- GPU ---------------------------------------------------------------------------------------------------------
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize(
    "kernel,pattern,head_split",
    [("flex", p, h) for p, h in CASES]
    + [("triton", p, False) for p in ("local", "strided", "local_strided", "fixed")]
    + [("perm_sdpa", "strided", False), ("chunk_sdpa", "local", False), ("chunk_sdpa", "fixed", False)],
)
def test_cuda_kernels_match_reference_bf16(kernel, pattern, head_split):
    seq_len = 1000  # not a multiple of the flex block (128), the stride (48) or the fixed block (80)
    torch.manual_seed(0)
    spec = PatternSpec(pattern, window=64, stride=48, block=80, head_split=head_split)
    q = model_layout(2, 4, seq_len, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (model_layout(2, 2, seq_len, 64, device="cuda", dtype=torch.bfloat16) for _ in "kv")
    mask = vector_mask(pattern, seq_len, 64, 48, 80, heads=4, head_split=head_split).cuda()
    out = run_kernel(kernel, q, k, v, spec)
    expected = reference_attention(q, k, v, mask)
    assert relative_error(out, expected) < 1e-2
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    want = torch.autograd.grad(expected, (q, k, v), grad_out.float())
    for g, w in zip(got, want):
        assert relative_error(g, w) < 2e-2


@pytest.mark.gpu
@gpu
def test_cuda_auto_picks_a_candidate_and_stays_correct():
    from mst_hf.attention_kernels import auto_kernel, hsa_attention

    spec = PatternSpec("local", window=128)
    q, k, v = (model_layout(2, 4, 1024, 64, device="cuda", dtype=torch.bfloat16) for _ in "qkv")
    choice = auto_kernel(q, k, v, spec)
    assert choice in auto_candidates(spec, 1024, 64, "cuda")
    expected = reference_attention(q, k, v, vector_mask("local", 1024, window=128, heads=1).cuda())
    assert relative_error(hsa_attention(q, k, v, spec), expected) < 1e-2


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
