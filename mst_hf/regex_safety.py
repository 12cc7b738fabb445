"""User regexes (``target_modules``, ``exclude_modules``) checked before they run: valid, and free of the nested
unbounded repeats that make a backtracking matcher take exponential time.

``(x*)*``, ``(x+)+``, ``(.*)*``, ``(x|y+)*``: an unbounded repeat (``*``, ``+``, ``{n,}``) around a group that
holds another one lets the matcher split the same text in exponentially many ways before it fails, so a pattern
such as ``(.*)*Z`` does not return on a long module name. Such a pattern is refused; every pattern a person writes
to pick modules has a flat equivalent (``(.*)*Z`` is ``.*Z``). Overlapping alternatives under one repeat
(``(a|aa)*``) are not detected. The check reads the tree of Python's own regex parser (``re._parser``).
"""

import re
from re import _constants, _parser

_REPEATS = (_constants.MAX_REPEAT, _constants.MIN_REPEAT, _constants.POSSESSIVE_REPEAT)


def _subpatterns(arg):
    """The sub-patterns inside one parsed item's argument (groups, branches, repeats hold them)."""
    if isinstance(arg, _parser.SubPattern):  # an atomic group's argument is its sub-pattern
        yield arg
        return
    for x in arg if isinstance(arg, (tuple, list)) else ():
        if isinstance(x, _parser.SubPattern):
            yield x
        elif isinstance(x, (tuple, list)):
            yield from _subpatterns(x)


def _unbounded(op, arg) -> bool:
    return op in _REPEATS and arg[1] == _constants.MAXREPEAT


def _holds_unbounded(items) -> bool:
    return any(_unbounded(op, arg) or any(_holds_unbounded(s) for s in _subpatterns(arg)) for op, arg in items)


def _nested_unbounded(items) -> bool:
    for op, arg in items:
        if _unbounded(op, arg) and _holds_unbounded(arg[2]):
            return True
        if any(_nested_unbounded(s) for s in _subpatterns(arg)):
            return True
    return False


def check_pattern(field: str, pattern: str) -> None:
    """A ``ValueError`` naming `field` unless `pattern` compiles and nests no unbounded repeat in another."""
    try:
        re.compile(pattern)
    except re.error as err:
        raise ValueError(f"`{field}` is not a valid regular expression: {pattern!r} ({err}). Fix the pattern, or pass "
                         "a list of module-name suffixes instead of a regex.") from err
    if _nested_unbounded(_parser.parse(pattern)):
        raise ValueError(
            f"`{field}` regex {pattern!r} nests an unbounded repeat (*, + or {{n,}}) inside another, which can take "
            "exponential time to fail on a module name. Write it without the nesting (e.g. '(.*)*Z' as '.*Z', "
            "'(\\w+\\.)+' as '[\\w.]+'), or pass a list of module-name suffixes."
        )
