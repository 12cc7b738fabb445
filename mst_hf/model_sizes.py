"""Named model sizes: the one table behind ``python -m mst_hf.plan --model NAME`` and the benchmarks' ``--model``.

Each entry is a transformers config by ``model_type`` and its fields. GPT-2 sizes use nanoGPT's padded vocabulary
(50304), a head tied to the token embedding and a context of 1024; a benchmark that needs another context or no
dropout passes overrides to :func:`model_config`. The benchmarks keep their smoke-test models to themselves, under
names not used here.
"""

_GPT2 = dict(model_type="gpt2", vocab_size=50304, n_positions=1024)

MODEL_SIZES: dict[str, dict] = {
    "gpt2-tiny": dict(_GPT2, n_layer=2, n_embd=128, n_head=2),
    "gpt2-124m": dict(_GPT2, n_layer=12, n_embd=768, n_head=12),
    "gpt2-350m": dict(_GPT2, n_layer=24, n_embd=1024, n_head=16),
    "gpt2-774m": dict(_GPT2, n_layer=36, n_embd=1280, n_head=20),
    "gpt2-1558m": dict(_GPT2, n_layer=48, n_embd=1600, n_head=25),
    # GPT-2 layout at d=2048, about 1.3B parameters (the block-sparse kernels' benchmark model)
    "gpt2-d2048": dict(_GPT2, n_layer=24, n_embd=2048, n_head=16),
    # Llama layout at d=2048, MLP 5632, 32k vocabulary, about 1.0B parameters
    "llama-d2048": dict(model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                        num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
                        max_position_embeddings=2048),
    # Llama-3.2-1B's block shapes (GQA 32/8 heads, MLP 8192), 32k vocabulary, untied head: about 1.1B parameters
    "llama-1b": dict(model_type="llama", vocab_size=32768, hidden_size=2048, intermediate_size=8192,
                     num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                     max_position_embeddings=2048, tie_word_embeddings=False),
}


def model_config(name: str, **overrides):
    """The transformers config of the named size, with ``overrides`` (any field of that config, e.g.
    ``n_positions=2048`` or ``attn_pdrop=0.0``) applied."""
    from transformers import AutoConfig

    if name not in MODEL_SIZES:
        raise ValueError(f"Unknown model size {name!r}; choose one of {', '.join(MODEL_SIZES)} (or build the "
                         "transformers config yourself).")
    fields = {**MODEL_SIZES[name], **overrides}
    return AutoConfig.for_model(fields.pop("model_type"), **fields)
