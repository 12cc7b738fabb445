"""Whether a user's regex can be matched against module names in bounded time: :func:`check_pattern`.

Python's ``re`` matches by backtracking. When one stretch of text can be split in many ways between the pieces of a
pattern, a failing match tries every split: a quantifier inside a repeated group (``(a+)+``, ``(.*)*Z``) or two
alternatives of a repeated group that can match the same text (``(x|x)*y``) give ``2**n`` tries for ``n``
characters, minutes for one 30-character module name. These shapes are refused, before any name is matched; so is
a pattern with more than :data:`MAX_OPEN_REPEATS` variable-length quantifiers (each multiplies the cost of a failing
match by about the name's length: eight ``.*`` take 26 s for one 60-character name). The check reads the
parsed pattern, so it is conservative: a nested quantifier is refused even where the text could only be split one
way; a list of module-name suffixes, or a regex with the quantifier moved out of the group, says the same thing.
"""

import re

try:  # Python 3.11+
    from re import _constants as _sre
    from re import _parser
except ImportError:  # Python 3.10
    import sre_constants as _sre
    import sre_parse as _parser

MAX_OPEN_REPEATS = 3  # variable-length quantifiers: a failing match costs about len(name) ** their count

_REPEATS = {_sre.MAX_REPEAT, _sre.MIN_REPEAT, getattr(_sre, "POSSESSIVE_REPEAT", _sre.MAX_REPEAT)}
_ZERO_WIDTH = {_sre.AT, _sre.ASSERT, _sre.ASSERT_NOT}


def check_pattern(field: str, pattern) -> None:
    """Refuse a regex that could take exponential time to match, or that is not a valid regex.

    ``field``: the name to report (e.g. ``"target_modules"``). Raises ``TypeError`` when ``pattern`` is not a
    string and ``ValueError`` naming ``field``, the pattern, what is wrong and the fix otherwise; returns ``None``
    for a pattern that is safe to match."""
    if not isinstance(pattern, str):
        raise TypeError(f"`{field}` must be a regex string, got {type(pattern).__name__} {pattern!r}.")
    try:
        re.compile(pattern)
        parsed = _parser.parse(pattern)
    except (re.error, RecursionError, OverflowError) as err:
        raise ValueError(f"`{field}` is {pattern!r}, not a valid regular expression ({err}). Fix the regex, or pass "
                         "a list of module-name suffixes.") from None
    problem = _problem(list(parsed), repeated=False, ignore_case=bool(parsed.state.flags & re.IGNORECASE))
    if problem is None and _open_repeats(list(parsed)) > MAX_OPEN_REPEATS:
        problem = f"more than {MAX_OPEN_REPEATS} variable-length quantifiers (`*`, `+`, `{{m,n}}`)"
    if problem is not None:
        raise ValueError(
            f"`{field}` is {pattern!r}: it has {problem}, so a module name it does not match can take Python's "
            "regex matcher minutes (it tries every way to split the name). Write it with fewer quantifiers and none "
            "nested, e.g. r'.*\\.(c_attn|c_fc)' rather than r'(.*\\.)*(c_attn|c_fc)', or pass a list of "
            "module-name suffixes such as ['c_attn', 'c_fc']."
        )


def _children(op, av) -> list[list]:
    """The sub-patterns of one parsed item (none for a leaf)."""
    if op in _REPEATS:
        return [list(av[2])]
    if op is _sre.SUBPATTERN:
        return [list(av[-1])]
    if op is _sre.BRANCH:
        return [list(b) for b in av[1]]
    if op in (_sre.ASSERT, _sre.ASSERT_NOT):
        return [list(av[1])]
    if op is getattr(_sre, "ATOMIC_GROUP", None):
        return [list(av)]
    if op is _sre.GROUPREF_EXISTS:
        return [list(b) for b in av[1:] if b is not None]
    return []


def _problem(items: list, repeated: bool, ignore_case: bool) -> str | None:
    """What makes ``items`` backtrack exponentially (``repeated``: they sit inside a quantifier that can repeat)."""
    for op, av in items:
        if op in _REPEATS:
            low, high = av[0], av[1]
            if repeated and high != low:
                return "a quantifier inside a repeated group"
            inner = _problem(list(av[2]), repeated or high > 1, ignore_case)
            if inner is not None:
                return inner
            continue
        if op is _sre.BRANCH and repeated and _branches_overlap([list(b) for b in av[1]], ignore_case):
            return "alternatives that can match the same text inside a repeated group"
        for child in _children(op, av):
            inner = _problem(child, repeated, ignore_case)
            if inner is not None:
                return inner
    return None


def _first_chars(items: list, ignore_case: bool) -> set[str] | None:
    """The characters a match of ``items`` can start with; ``None`` when it may be empty or start with anything."""
    for op, av in items:
        if op in _ZERO_WIDTH:
            continue
        if op is _sre.LITERAL:
            char = chr(av)
            return {char.lower()} if ignore_case else {char}
        if op is _sre.IN and all(o is _sre.LITERAL for o, _ in av):
            return {chr(v).lower() if ignore_case else chr(v) for _, v in av}
        if op is _sre.SUBPATTERN:
            return _first_chars(list(av[-1]), ignore_case)
        if op in _REPEATS and av[0] >= 1:
            return _first_chars(list(av[2]), ignore_case)
        return None
    return None


def _branches_overlap(branches: list[list], ignore_case: bool) -> bool:
    """Whether two alternatives can start the same way (or one can match the empty string)."""
    seen: set[str] = set()
    for branch in branches:
        first = _first_chars(branch, ignore_case)
        if first is None or first & seen:
            return True
        seen |= first
    return False


def _open_repeats(items: list) -> int:
    """How many quantifiers whose length can vary by more than one (``*``, ``+``, ``{2,9}``; not ``?``) a match of
    ``items`` runs through, at most: alternatives count as their largest, a fixed repeat as its count times."""
    count = 0
    for op, av in items:
        if op in _REPEATS:
            count += (av[1] - av[0] > 1) + _open_repeats(list(av[2])) * min(av[1], 100)
        elif op is _sre.BRANCH:
            count += max(_open_repeats(list(b)) for b in av[1])
        else:
            count += sum(_open_repeats(child) for child in _children(op, av))
    return count
