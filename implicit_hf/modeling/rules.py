"""Rules that settings and arguments must pass, declared once and shared by the config's fields
(`configuration_implicit`), the solvers' arguments (`solvers.ARGUMENT_RULES`) and per-call settings.

A rule takes a value and raises `RefusedValue` saying what is allowed ("must be ...; got ..."); `check` (and the
config) put the name of the field or argument in front. Pure Python: this file is copied beside checkpoints with
the model code (``trust_remote_code=True``).
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Iterable
from typing import Any

# The bound on every loop count (`max_loops`): config.num_loops and the other iteration counts, forward/generate
# (num_loops=...), a generation config's num_loops, trajectory_loops and ``--loops``. A count past it is a typo or
# a hang (1e10 loops never finish; a KV cache holds one slot per loop and core layer), not a setting: 4096 is 20x
# the largest count this project runs (200) and far beyond a fixed-point solver's usual budget (tens of
# iterations). The environment variable IMPLICIT_HF_MAX_LOOPS raises it.
DEFAULT_MAX_LOOPS = 4096

Rule = Callable[[Any], None]


class RefusedValue(ValueError):
    """A value a rule refuses; the message says what is allowed, without the name it was given under."""


def _is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def integer(minimum: int = 1, maximum: int | None = None, allow_none: bool = False) -> Rule:
    """Integers (Python or numpy, not bools) ``>= minimum`` (and ``<= maximum`` when given)."""
    allowed = f"an integer >= {minimum}" if maximum is None else f"an integer in [{minimum}, {maximum}]"

    def rule(value: Any) -> None:
        if value is None and allow_none:
            return
        if not _is_integer(value) or value < minimum or (maximum is not None and value > maximum):
            raise RefusedValue(f"must be {allowed}; got {value!r}")

    return rule


def loop_count(allow_none: bool = False) -> Rule:
    """Integers in ``[1, max_loops()]``: the error names the bound and how to raise it."""
    at_least_one = integer(1, allow_none=allow_none)

    def rule(value: Any) -> None:
        at_least_one(value)
        bound = max_loops()
        if value is not None and value > bound:
            raise RefusedValue(
                f"must be at most {bound}, the bound on loop counts (set the environment variable "
                f"IMPLICIT_HF_MAX_LOOPS to raise it); got {value}"
            )

    return rule


def number(bounds: str, within: Callable[[float], bool], allow_none: bool = False) -> Rule:
    """Finite real numbers with ``within(value)`` true (NaN and infinities never pass: a tolerance of ``inf``
    would halt every loop at once); ``bounds`` says it in words."""
    allowed = f"None or a number {bounds}" if allow_none else f"a number {bounds}"

    def rule(value: Any) -> None:
        if value is None and allow_none:
            return
        real = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
        if not (real and within(value)):
            raise RefusedValue(f"must be {allowed}; got {value!r}")

    return rule


def one_of(allowed: Iterable[str]) -> Rule:
    """One of ``allowed`` (read at every check: `solvers.SOLVERS` grows with `register_solver`)."""

    def rule(value: Any) -> None:
        if value not in allowed:
            raise RefusedValue(f"must be one of {', '.join(repr(a) for a in allowed)}; got {value!r}")

    return rule


def instance_of(kind: type, described: str) -> Rule:
    """Instances of ``kind``, ``described`` in words (``bool``: "True or False")."""

    def rule(value: Any) -> None:
        if not isinstance(value, kind):
            raise RefusedValue(f"must be {described}; got {value!r}")

    return rule


def plain(value: Any) -> Any:
    """A numpy number as the Python ``int`` / ``float`` it equals (so config.json can hold it); else ``value``."""
    if isinstance(value, numbers.Integral) and not isinstance(value, (int, bool)):
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, (int, float)):
        return float(value)
    return value


def check(name: str, value: Any, rule: Rule) -> Any:
    """``value`` (numpy numbers as Python ones) if ``rule`` takes it; otherwise a ``ValueError`` naming ``name``."""
    try:
        rule(value)
    except RefusedValue as err:
        raise ValueError(f"{name} {err}") from None
    return plain(value)


def check_integer(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an ``int`` if it is an integral number (Python or numpy, not a bool) ``>= minimum``;
    otherwise a ``ValueError`` naming ``name`` and what it allows. (`implicit_hf.checks` has the same check for
    the pure-Python modules: these files are copied beside checkpoints and import nothing from ``implicit_hf``.)"""
    return check(name, value, integer(minimum))


def check_loop_count(name: str, value: Any) -> int:
    """``value`` as an ``int`` if it is an integer in ``[1, max_loops()]``; otherwise a ``ValueError`` naming
    ``name``, the bound and how to raise it."""
    return check(name, value, loop_count())


def max_loops() -> int:
    """The bound on loop counts: the environment variable ``IMPLICIT_HF_MAX_LOOPS`` if set (read at every check,
    so setting it in a running process takes effect), else `DEFAULT_MAX_LOOPS`. ``implicit_hf.loop_counts`` keeps
    a copy (it may not import this package, which imports torch); a test checks the two agree."""
    given = os.environ.get("IMPLICIT_HF_MAX_LOOPS")
    if given is None:
        return DEFAULT_MAX_LOOPS
    if not given.strip().isdigit() or int(given) < 1:
        raise ValueError(f"the environment variable IMPLICIT_HF_MAX_LOOPS must be an integer >= 1; got {given!r}")
    return int(given)
