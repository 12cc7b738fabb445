import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from mst_hf.patterns import (
    PATTERNS,
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
