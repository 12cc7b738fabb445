"""check_pattern: regexes that would make a failing match take exponential time are refused by name, before any
module name is matched; the patterns people write to pick projections pass."""

import re
import time

import pytest

from mst_hf.regex_safety import check_pattern

UNSAFE = ["(.*)*Z", "(a+)+$", "(a*)*b", r"(\w+\.)+c_attn", "(x|x)*y", "(a|ab)*c", "(?:a|)+b", "(?=(a+)+)b",
          ".*a.*a.*a.*a.*Z", "(?:.*a){4}Z"]
SAFE = [r"transformer\.h\.\d+\.(attn\.c_attn|mlp\.c_fc)", r".*\.(q|k|v|o)_proj", r"model\.layers\.\d+\.self_attn\..*",
        "(attn|mlp)+", r"(\w|\d)*Z", "c_attn", r"h\.\d{1,2}\.mlp\..*",
        r"^model\.layers\.\d+\.self_attn\.\w+_proj$|^model\.layers\.\d+\.mlp\.\w+_proj$"]


@pytest.mark.parametrize("pattern", UNSAFE)
def test_patterns_that_backtrack_exponentially_are_refused_naming_the_field(pattern):
    with pytest.raises(ValueError, match=r"`target_modules` is .*(nested|quantifier)"):
        check_pattern("target_modules", pattern)


@pytest.mark.parametrize("pattern", SAFE)
def test_patterns_that_pick_projections_pass(pattern):
    check_pattern("target_modules", pattern)


def test_a_refused_pattern_is_one_whose_cost_doubles_with_each_character():
    """The check is not arbitrary: a failing match of the first refused pattern takes exponential time (every four
    more characters cost about 16 times as much; a 32-character module name takes minutes)."""

    def seconds(n):
        start = time.monotonic()
        re.fullmatch(UNSAFE[0], "x" * n)
        return time.monotonic() - start

    assert seconds(21) > 4 * seconds(17)


def test_an_invalid_regex_or_a_non_string_is_refused_naming_the_field():
    with pytest.raises(ValueError, match=r"`exclude_modules` is '\(a'.*not a valid regular expression"):
        check_pattern("exclude_modules", "(a")
    with pytest.raises(TypeError, match="`exclude_modules` must be a regex string"):
        check_pattern("exclude_modules", 5)


@pytest.mark.parametrize("pattern", ["(x*)*", "(x+)+", "(x|y+)*", "(a{2,})+", "((a)*b)+", "(?:b|c+)+"])
def test_more_nested_repeats_are_refused(pattern):
    with pytest.raises(ValueError, match="`target_modules` is"):
        check_pattern("target_modules", pattern)


@pytest.mark.parametrize("pattern", [r"(.*\.)?mlp\..*", r"model\.layers\.\d+\.(self_attn|mlp)\..*"])
def test_more_flat_patterns_pass(pattern):
    check_pattern("target_modules", pattern)
