"""Checks of user-given values for the task and recipe modules, in pure Python: importing a task imports
neither transformers nor the model package for them. The model files keep their own integer and
real-number checks in `implicit_hf.modeling.configuration_implicit` (they are copied beside checkpoints
and may import nothing from ``implicit_hf``)."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any


def check_integer(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an ``int`` if it is an integral number (Python or numpy, not a bool) ``>= minimum``;
    otherwise a ``ValueError`` naming ``name`` and what it allows."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return int(value)


def check_number(name: str, value: Any, bounds: str, within: Callable[[float], bool]) -> float:
    """``value`` as a ``float`` if it is a Python ``int`` or ``float`` (not a bool) with ``within(value)``
    true (NaN never is); otherwise a ``ValueError`` naming ``name`` and ``bounds``, e.g. ``"in [0, 1]"``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not within(value):
        raise ValueError(f"{name} must be a number {bounds}; got {value!r}")
    return float(value)


def check_count_range(name: str, value: Any) -> tuple[int, int]:
    """``(min, max)`` of a count given as an integer >= 1 (both ends) or as ``[min, max]`` of such integers with
    ``min <= max``; otherwise a ``ValueError`` naming ``name`` and what it allows."""
    low, high = value if isinstance(value, (list, tuple)) and len(value) == 2 else (value, value)
    for end in (low, high):
        if isinstance(end, bool) or not isinstance(end, numbers.Integral) or end < 1:
            raise ValueError(f"{name} must be an integer >= 1 or [min, max] of such integers; got {value!r}")
    if low > high:
        raise ValueError(f"{name} [min, max] needs min <= max; got {value!r}")
    return int(low), int(high)
