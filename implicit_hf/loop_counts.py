"""Loop counts as users give them, to ``--loops`` or to `run_eval` / `sweep`: parsed and validated here,
once, at that edge (pure Python: the command line parses them without importing torch)."""

from __future__ import annotations

import re
from collections.abc import Sequence

_LOOP_FORMS = (
    "allowed forms: a comma-separated list of integers >= 1 ('1,2,4,8'), a range 'A-B' ('1-8'), "
    "a range with a step 'A-B:S' ('1-64:2'), or a mix of them ('1,2,4-8')"
)
_ITEM = re.compile(r"^(\d+)(?:-(\d+)(?::(\d+))?)?$")


def parse_loops(spec: str) -> list[int]:
    """Loop counts from ``"1,2,4,8"``, ``"1-8"``, ``"1-64:2"`` or ``"1,2,4-8"``: sorted, unique, all >= 1.

    Ranges include both ends when the step reaches them (``"1-8:3"`` is ``[1, 4, 7]``).
    Raises ``ValueError`` naming the offending item and the allowed forms.
    """
    if not isinstance(spec, str):
        raise ValueError(f"loop specification must be a string; got {spec!r}; {_LOOP_FORMS}")
    items = [item.strip() for item in spec.split(",")]
    if not spec.strip() or any(not item for item in items):
        raise ValueError(f"invalid loop specification {spec!r}: empty item; {_LOOP_FORMS}")
    loops: set[int] = set()
    for item in items:
        match = _ITEM.match(item)
        if match is None:
            raise ValueError(f"invalid loop specification {spec!r}: cannot read {item!r}; {_LOOP_FORMS}")
        start, end, step = match.groups()
        start = int(start)
        end = start if end is None else int(end)
        step = 1 if step is None else int(step)
        problem = None
        if start < 1:
            problem = f"loop counts must be >= 1 in {item!r}"
        elif end < start:
            problem = f"range {item!r} ends before it starts"
        elif step < 1:
            problem = f"step must be >= 1 in {item!r}"
        if problem:
            raise ValueError(f"invalid loop specification {spec!r}: {problem}; {_LOOP_FORMS}")
        loops.update(range(start, end + 1, step))
    return sorted(loops)


def normalise_loops(loops: str | Sequence[int]) -> list[int]:
    """The loop counts of a `parse_loops` string or a list of integers >= 1: sorted and unique."""
    if isinstance(loops, str):
        return parse_loops(loops)
    values = list(loops)
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"loops must be a non-empty list of integers >= 1; got {loops!r}")
    return sorted(set(values))
