"""`check_pattern`: invalid regexes and nested unbounded repeats are refused, naming the field; the patterns people
write to pick modules pass."""

import pytest

from mst_hf.regex_safety import check_pattern

NESTED = ["(x*)*", "(x+)+", "(.*)*Z", "(x|y+)*", r"(\w+\.)+", "(a{2,})+", "((a)*b)+", "(?:b|c+)+", "(?>(x*)*)"]
FLAT = [r".*\.(q|k|v)_proj", r"(.*\.)?mlp\..*", r"model\.layers\.\d+\.(self_attn|mlp)\..*", "(ab)*c*", "(a*){3}",
        "lm_head"]


@pytest.mark.parametrize("pattern", NESTED)
def test_nested_unbounded_repeats_are_refused(pattern):
    with pytest.raises(ValueError, match=r"`target_modules` regex .* nests an unbounded repeat"):
        check_pattern("target_modules", pattern)


@pytest.mark.parametrize("pattern", FLAT)
def test_flat_patterns_pass(pattern):
    check_pattern("target_modules", pattern)


def test_invalid_regex_names_the_field_the_pattern_and_the_error():
    with pytest.raises(ValueError, match=r"`exclude_modules` is not a valid regular expression: '\[a-' "
                                         r"\(unterminated character set"):
        check_pattern("exclude_modules", "[a-")
