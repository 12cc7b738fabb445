import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

import mst_hf.attention.patterns as patterns
from mst_hf.attention import dense_pattern_message
from mst_hf.attention.patterns import (
    PATTERNS,
    HSASpec,
    attention_density,
    generate_dense_causal_mask,
    generate_fixed_mask,
    generate_local_mask,
    generate_local_strided_mask,
    generate_strided_mask,
    mean_attended_keys,
    pattern_mask_fn,
)


def admitted_by_hand(pattern, q, k, window, stride, block, head=0, num_heads=2, head_split=False):
    """The SPEC definitions, one pair at a time."""
    if k > q:
        return False
    if head_split:
        return (q - k < window) if head < num_heads // 2 else ((q - k) % stride == 0)
    if pattern == "dense":
        return True
    if pattern == "local":
        return q - k < window
    if pattern == "strided":
        return (q - k) % stride == 0
    if pattern == "local_strided":
        return q - k < window or (q - k) % stride == 0
    if pattern == "fixed":
        return q // block == k // block or k % block == block - 1
    raise AssertionError(pattern)


def hand_mask(pattern, seq_len, window, stride, block, num_heads=1, head_split=False):
    mask = torch.zeros(num_heads, seq_len, seq_len, dtype=torch.bool)
    for h in range(num_heads):
        for q in range(seq_len):
            for k in range(seq_len):
                mask[h, q, k] = admitted_by_hand(pattern, q, k, window, stride, block, h, num_heads, head_split)
    return mask


def evaluate(fn, seq_len, num_heads=1):
    h = torch.arange(num_heads)[:, None, None]
    q = torch.arange(seq_len)[None, :, None]
    k = torch.arange(seq_len)[None, None, :]
    return torch.broadcast_to(fn(0, h, q, k), (num_heads, seq_len, seq_len))


PARAMS = [(4, 3, 5), (1, 1, 1), (5, 4, 4), (3, 7, 6), (9, 4, 2)]  # (window, stride, block)
LENGTHS = [1, 7, 16, 33]


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("window,stride,block", PARAMS)
@pytest.mark.parametrize("seq_len", LENGTHS)
def test_pattern_matches_hand_built_mask(pattern, window, stride, block, seq_len):
    fn = pattern_mask_fn(pattern, window, stride, block)
    assert torch.equal(evaluate(fn, seq_len), hand_mask(pattern, seq_len, window, stride, block))


@pytest.mark.parametrize("seq_len", [6, 21])
def test_head_split_matches_hand_built_mask(seq_len):
    fn = pattern_mask_fn("local_strided", window=3, stride=4, head_split=True, num_heads=4)
    expected = hand_mask("local_strided", seq_len, 3, 4, 1, num_heads=4, head_split=True)
    assert torch.equal(evaluate(fn, seq_len, num_heads=4), expected)


def test_factories_name_their_functions():
    names = [
        generate_local_mask(128).__name__,
        generate_strided_mask(64).__name__,
        generate_local_strided_mask(128, 64).__name__,
        generate_fixed_mask(32).__name__,
        generate_dense_causal_mask().__name__,
    ]
    assert names == ["local_128", "strided_64", "local_128_strided_64", "fixed_32", "dense_causal"]


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("window,stride,block", PARAMS)
@pytest.mark.parametrize("seq_len", [1, 2, 13, 40])
def test_mean_attended_keys_is_exact(pattern, window, stride, block, seq_len):
    brute = hand_mask(pattern, seq_len, window, stride, block).sum().item() / seq_len
    assert mean_attended_keys(pattern, seq_len, window, stride, block) == pytest.approx(brute, rel=1e-12)


@pytest.mark.parametrize("seq_len", [5, 33])
def test_mean_attended_keys_head_split_is_mean_over_heads(seq_len):
    brute = hand_mask("local_strided", seq_len, 4, 3, 1, num_heads=2, head_split=True).sum().item() / (2 * seq_len)
    assert mean_attended_keys("local_strided", seq_len, 4, 3, head_split=True) == pytest.approx(brute, rel=1e-12)


@pytest.mark.parametrize("seq_len", [1, 1024, 100_003])
def test_dense_attends_half_the_square(seq_len):
    assert mean_attended_keys("dense", seq_len) == (seq_len + 1) / 2


def test_density_of_sparse_patterns_at_long_context():
    # local(128) at 16k: each query sees at most 128 of ~8k causal keys on average
    density = attention_density("local", 16384, window=128)
    assert density == pytest.approx(mean_attended_keys("local", 16384) / (16385 / 2))
    assert density < 128 / 8192


@pytest.mark.parametrize(
    "call,error",
    [
        (lambda: pattern_mask_fn("block_sparse"), ValueError),
        (lambda: generate_local_mask(0), ValueError),
        (lambda: generate_strided_mask(-3), ValueError),
        (lambda: generate_fixed_mask(2.5), TypeError),
        (lambda: generate_local_mask(True), TypeError),
        (lambda: pattern_mask_fn("local", head_split=True, num_heads=4), ValueError),
        (lambda: pattern_mask_fn("local_strided", head_split=True), ValueError),
        (lambda: pattern_mask_fn("local_strided", head_split=True, num_heads=3), ValueError),
        (lambda: mean_attended_keys("dense", 0), ValueError),
        (lambda: mean_attended_keys("nope", 10), ValueError),
    ],
)
def test_bad_inputs_raise(call, error):
    with pytest.raises(error):
        call()


def test_unknown_pattern_error_lists_valid_names():
    with pytest.raises(ValueError, match="local_strided"):
        pattern_mask_fn("sliding")


# --- HSASpec: the one validator of HSA settings ------------------------------------------------------------------
BAD_SPECS = [
    (dict(pattern="sliding"), ValueError, "`pattern`"),
    (dict(window=0), ValueError, "`window`"),
    (dict(stride=2.0), ValueError, "`stride`"),
    (dict(block=True), ValueError, "`block`"),
    (dict(layers="odd"), ValueError, "`layers`"),
    (dict(layers=[0, -1]), ValueError, "`layers`"),
    (dict(layers=3), ValueError, "`layers`"),
    (dict(head_split=1), TypeError, "`head_split`"),
    (dict(head_split=True, pattern="fixed"), ValueError, "`head_split=True`"),
    (dict(backend="cuda_graphs"), ValueError, "`backend`"),
]


@pytest.mark.parametrize("kwargs,error,field", BAD_SPECS, ids=[str(k) for k, _, _ in BAD_SPECS])
def test_hsa_spec_refuses_bad_settings_naming_the_field(kwargs, error, field):
    with pytest.raises(error, match=field):
        HSASpec(**kwargs)


def test_hsa_spec_from_config_names_the_flat_field():
    class Flat:  # what MSTConfig looks like to HSASpec: flat hsa_* attributes, no hsa_backend
        hsa_pattern, hsa_window, hsa_stride, hsa_block, hsa_layers, hsa_head_split = "local", 0, 8, 8, "all", False

    with pytest.raises(ValueError, match="`hsa_window`"):
        HSASpec.from_config(Flat)
    Flat.hsa_window = 5
    assert HSASpec.from_config(Flat) == HSASpec("local", 5, 8, 8)


def test_hsa_spec_layers_are_normalised_and_hashable():
    spec = HSASpec("local", layers=[3, 1, 3])
    assert spec.layers == (1, 3) and hash(spec) == hash(HSASpec("local", layers=(1, 3)))
    assert [spec.layer_is_sparse(i) for i in range(4)] == [False, True, False, True]
    assert HSASpec(layers="alternate").sparse_layers(5) == (0, 2, 4)
    with pytest.raises(ValueError, match="hsa_layers"):
        spec.sparse_layers(2)


def test_hsa_spec_state_round_trip_and_checks():
    spec = HSASpec("fixed", block=5, layers=[0])
    state = spec.to_state(active=True)
    assert state == {"pattern": "fixed", "window": 128, "stride": 128, "block": 5, "layers": [0],
                     "head_split": False, "backend": "auto", "active": True}
    assert HSASpec.from_state(state) == spec
    with pytest.raises(ValueError, match="Unknown HSA keys"):
        HSASpec.from_state({"pattern": "local", "windw": 8})
    with pytest.raises(TypeError, match="`active`"):
        HSASpec.from_state({"active": "yes"})
    with pytest.raises(TypeError, match="dict"):
        HSASpec.from_state(["local"])


def test_from_state_reads_each_settings_dict_once_and_checks_every_new_one(monkeypatch):
    monkeypatch.setattr(patterns, "_FROM_STATE", {})
    state = HSASpec("local_strided", window=6, stride=5, layers=[1]).to_state(active=True)
    spec = HSASpec.from_state(state)
    assert HSASpec.from_state({**state, "active": False}) is spec  # switching on and off: the same spec
    assert HSASpec.from_state(dict(reversed(list(state.items())))) == spec
    with pytest.raises(TypeError, match="head_split"):  # equal to True, but not a bool: checked, not looked up
        HSASpec.from_state({**state, "head_split": 1})
    with pytest.raises(ValueError, match="window"):
        HSASpec.from_state({**state, "window": 1.0})
    with pytest.raises(ValueError, match="layers"):
        HSASpec.from_state({**state, "layers": [[1]]})  # not hashable: validated, not cached
    with pytest.raises(TypeError, match="`active`"):
        HSASpec.from_state({**state, "active": 1})


def test_density_is_computed_once_per_length(monkeypatch):
    calls = []
    original = patterns._attended_per_query
    monkeypatch.setattr(patterns, "_attended_per_query", lambda *args: calls.append(args) or original(*args))
    patterns.mean_attended_keys.cache_clear()
    spec = HSASpec("local_strided", window=6, stride=5)
    assert [spec.density(64) for _ in range(3)] == [spec.density(64)] * 3
    assert len(calls) == 1


def test_hsa_spec_density_is_the_exact_count():
    spec = HSASpec("local", window=4)
    brute = sum(min(q + 1, 4) for q in range(10)) / sum(q + 1 for q in range(10))
    assert spec.density(10) == pytest.approx(brute, rel=1e-12)
    assert spec.mean_attended_keys(10) == pytest.approx(sum(min(q + 1, 4) for q in range(10)) / 10, rel=1e-12)


def test_mst_config_defaults_are_the_spec_defaults():
    from mst_hf import MSTConfig

    assert HSASpec.from_config(MSTConfig()) == HSASpec()


# --- a pattern that admits every causal pair at the trained length is reported -----------------------------------
DENSE_CASES = [  # (spec, seq_len): the brute-force mask decides whether every causal pair is admitted
    (HSASpec("local_strided", 128, 128), 128),
    (HSASpec("local_strided", 128, 128), 129),
    (HSASpec("local_strided", 128, 128), 130),
    (HSASpec("local_strided", 6, 3), 8),
    (HSASpec("local_strided", 6, 2), 8),
    (HSASpec("local", 16), 16),
    (HSASpec("local", 16), 17),
    (HSASpec("strided", stride=1), 9),
    (HSASpec("strided", stride=2), 2),
    (HSASpec("fixed", block=8), 8),
    (HSASpec("fixed", block=8), 9),
    (HSASpec("fixed", block=1), 9),
    (HSASpec("local_strided", 8, 1, head_split=True), 8),
    (HSASpec("local_strided", 4, 1, head_split=True), 8),
]


@pytest.mark.parametrize("spec,seq_len", DENSE_CASES, ids=[f"{s.pattern}-{s.window}-{s.stride}-{s.block}-{t}"
                                                           for s, t in DENSE_CASES])
def test_dense_pattern_message_iff_every_causal_pair_is_admitted(spec, seq_len):
    heads = 2 if spec.head_split else 1
    every_pair = all(
        admitted_by_hand(spec.pattern, q, k, spec.window, spec.stride, spec.block, h, heads, spec.head_split)
        for h in range(heads) for q in range(seq_len) for k in range(q + 1)
    )
    message = dense_pattern_message(spec, seq_len)
    assert (message is not None) == every_pair
    assert (spec.density(seq_len) == 1.0) == every_pair
    if every_pair:
        assert repr(spec.pattern) in message and f"sequence length {seq_len}" in message


def test_dense_pattern_is_never_reported():
    assert dense_pattern_message(HSASpec("dense"), 16) is None
