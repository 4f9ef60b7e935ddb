"""Loop counts as users give them, to ``--loops`` or to `run_eval` / `sweep` / `lm_eval_sweep`: parsed and validated
here, once, at that edge, into `LoopCounts` that the rest of the eval path takes as checked (pure Python: the
command line parses them without importing torch)."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

_LOOP_FORMS = (
    "allowed forms: a comma-separated list of integers >= 1 ('1,2,4,8'), a range 'A-B' ('1-8'), "
    "a range with a step 'A-B:S' ('1-64:2'), or a mix of them ('1,2,4-8')"
)
_ITEM = re.compile(r"^(\d+)(?:-(\d+)(?::(\d+))?)?$")

# Copied from implicit_hf.modeling.configuration_implicit (importing it would import torch and transformers);
# tests/test_bad_inputs.py checks that the two agree.
DEFAULT_MAX_LOOPS = 4096


def max_loops() -> int:
    """The bound on loop counts: the environment variable ``IMPLICIT_HF_MAX_LOOPS`` if set, else
    `DEFAULT_MAX_LOOPS` (a copy of ``implicit_hf.modeling.configuration_implicit.max_loops``)."""
    given = os.environ.get("IMPLICIT_HF_MAX_LOOPS")
    if given is None:
        return DEFAULT_MAX_LOOPS
    if not given.strip().isdigit() or int(given) < 1:
        raise ValueError(f"the environment variable IMPLICIT_HF_MAX_LOOPS must be an integer >= 1; got {given!r}")
    return int(given)


def _number(digits: str | None, bound: int) -> int | None:
    """The integer ``digits`` spell, or ``bound + 1`` when it is larger than ``bound`` (read without converting
    thousands of digits, which Python refuses, and without expanding anything)."""
    if digits is None:
        return None
    digits = digits.lstrip("0") or "0"
    return bound + 1 if len(digits) > len(str(bound)) else min(int(digits), bound + 1)


def _bound_words(bound: int) -> str:
    return f"at most {bound}, the bound on loop counts (set the environment variable IMPLICIT_HF_MAX_LOOPS to raise it)"


def check_loop_bound(name: str, value: int) -> int:
    """``value`` (an integer loop count) if it is within `max_loops`; otherwise a ``ValueError`` naming ``name``,
    the bound and how to raise it."""
    bound = max_loops()
    if value > bound:
        raise ValueError(f"{name} must be {_bound_words(bound)}; got {value}")
    return value


class LoopCounts(list):
    """Loop counts already checked (`parse_loops`, `normalise_loops`): sorted, unique, each in ``[1, max_loops()]``.

    A plain list to everything that reads it (JSON, ``==``); its type says that `normalise_loops` need not check it
    again, so the counts are validated once where they enter and passed down as they are.
    """


def parse_loops(spec: str) -> LoopCounts:
    """Loop counts from ``"1,2,4,8"``, ``"1-8"``, ``"1-64:2"`` or ``"1,2,4-8"``: sorted, unique, all in
    ``[1, max_loops()]``.

    Ranges include both ends when the step reaches them (``"1-8:3"`` is ``[1, 4, 7]``). Every item is checked
    before any range is expanded, so a huge range is refused at once. Raises ``ValueError`` naming the offending
    item and the allowed forms.
    """
    if not isinstance(spec, str):
        raise ValueError(f"loop specification must be a string; got {spec!r}; {_LOOP_FORMS}")
    items = [item.strip() for item in spec.split(",")]
    if not spec.strip() or any(not item for item in items):
        raise ValueError(f"invalid loop specification {spec!r}: empty item; {_LOOP_FORMS}")
    bound = max_loops()
    ranges: list[range] = []
    for item in items:
        match = _ITEM.match(item)
        if match is None:
            raise ValueError(f"invalid loop specification {spec!r}: cannot read {item!r}; {_LOOP_FORMS}")
        start, end, step = (_number(digits, bound) for digits in match.groups())
        end = start if end is None else end
        if end > bound:
            raise ValueError(
                f"invalid loop specification {spec!r}: loop counts must be {_bound_words(bound)} in {item!r}; "
                f"{_LOOP_FORMS}"
            )
        step = 1 if step is None else step
        problem = None
        if start < 1:
            problem = f"loop counts must be >= 1 in {item!r}"
        elif end < start:
            problem = f"range {item!r} ends before it starts"
        elif step < 1:
            problem = f"step must be >= 1 in {item!r}"
        if problem:
            raise ValueError(f"invalid loop specification {spec!r}: {problem}; {_LOOP_FORMS}")
        ranges.append(range(start, end + 1, step))
    return LoopCounts(sorted({count for counts in ranges for count in counts}))


def normalise_loops(loops: str | Sequence[int]) -> LoopCounts:
    """The loop counts of a `parse_loops` string or a list of integers in ``[1, max_loops()]``: sorted and unique;
    `LoopCounts` (checked already) as they are."""
    if isinstance(loops, LoopCounts):
        return loops
    if isinstance(loops, str):
        return parse_loops(loops)
    values = list(loops)
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"loops must be a non-empty list of integers >= 1; got {loops!r}")
    check_loop_bound("loops", max(values))
    return LoopCounts(sorted(set(values)))
