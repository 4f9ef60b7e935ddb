"""Checks of user-given values for the task and recipe modules, in pure Python: importing a task imports
neither transformers nor the model package for them. The model files keep their own integer and
real-number checks in `implicit_hf.modeling.configuration_implicit` (they are copied beside checkpoints
and may import nothing from ``implicit_hf``).

A task's settings are the arguments of its constructor, checked against their annotations by
`check_arguments` (`implicit_hf.tasks.base.TaskAdapter` does it for every task): a ``bool`` must be a bool
(the string ``'false'`` is not one), an ``int`` an integer, a ``float`` a finite number, a ``str`` a string,
a ``Literal[...]`` one of its values, and ``Annotated[T, Allowed(...)]`` a ``T`` that passes the test of
`Allowed` (`at_least`, `number`, `Fraction`, `Positive`, `CountRange`); ``Annotated[T, Relation(...)]`` relates a
setting to another one of the same constructor (`not_above`, `multiple_of`).
"""

from __future__ import annotations

import collections.abc
import difflib
import functools
import inspect
import math
import numbers
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any


class TaskSettingError(ValueError):
    """A task setting (an argument of a task's constructor) that the task refuses; the message names the task and
    the setting. The command line reports it on one line."""


@dataclass(frozen=True)
class Allowed:
    """``Annotated`` metadata of a setting: the values of its type that it takes, as a ``test`` (run on a value of
    that type) and in ``words`` (the error says the setting "must be" ``words``)."""

    words: str
    test: Callable[[Any], bool]


def at_least(minimum: int) -> Allowed:
    """Integers ``>= minimum``: ``Annotated[int, at_least(1)]``."""
    return Allowed(f"an integer >= {minimum}", lambda value: value >= minimum)


def number(bounds: str, within: Callable[[float], bool]) -> Allowed:
    """Numbers with ``within(value)`` true, ``bounds`` in words (``"in [0, 1]"``): ``Annotated[float, number(...)]``."""
    return Allowed(f"a number {bounds}", within)


@dataclass(frozen=True)
class Relation:
    """``Annotated`` metadata of a setting that must stand in a relation to the setting ``other`` of the same
    constructor, defaults included: ``holds(value, other_value)``, in ``words`` (the error says "``name``
    (value) must be ``words`` ``other`` (other value)")."""

    words: str
    other: str
    holds: Callable[[Any, Any], bool]


def not_above(other: str) -> Relation:
    """A setting ``<=`` the setting ``other``: ``min_digits: Annotated[int, at_least(1), not_above("digits")]``."""
    return Relation("<=", other, lambda value, bound: value <= bound)


def multiple_of(other: str) -> Relation:
    """A setting that the setting ``other`` divides: ``Annotated[int, at_least(1), multiple_of("patch_size")]``."""
    return Relation("a multiple of", other, lambda value, divisor: value % divisor == 0)


def _is_count_range(value: int | list[int]) -> bool:
    if isinstance(value, (list, tuple)):
        return len(value) == 2 and min(value) >= 1
    return value >= 1


Fraction = Annotated[float, number("in [0, 1]", lambda value: 0 <= value <= 1)]
Positive = Annotated[float, number("> 0", lambda value: value > 0)]
# a count given as one integer >= 1 or as [min, max] of such integers (`check_count_range`)
CountRange = Annotated[int | list[int], Allowed("an integer >= 1 or [min, max] of such integers", _is_count_range)]


def check_setting(name: str, value: Any, hint: Any) -> None:
    """Refuse ``value`` unless it is of the annotation ``hint``, with a ``ValueError`` "``name`` must be ...; got
    ``value``". ``bool``, ``int`` (a Python or numpy integer, not a bool), ``float`` (a finite int or float, not a
    bool), ``str``, ``None``, ``Literal``, unions, ``list[T]`` (a list or tuple of ``T``), ``dict``, classes and
    ``Annotated[T, Allowed(...)]`` are checked; other annotations (``Any``, a ``Callable``, ...) take any value."""
    if not _fits(value, hint):
        raise ValueError(f"{name} must be {_words(hint)}; got {value!r}")


def check_arguments(function: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> None:
    """Refuse, with a ``ValueError`` naming the argument, a call ``function(*args, **kwargs)`` (a method, ``self``
    not in ``args``) with an unknown keyword (suggesting the closest known one) or an argument that is not of its
    annotation (`check_setting`), or whose arguments, defaults included, break a `Relation` of an annotation.
    Arguments left at their defaults are not checked against their own annotations."""
    signature = inspect.signature(function)
    parameters = list(signature.parameters.values())[1:]  # after self
    if not any(parameter.kind is parameter.VAR_KEYWORD for parameter in parameters):
        names = [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        for key in kwargs:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise ValueError(f"unexpected keyword argument {key!r}; {hint}settings: {', '.join(names)}")
    try:
        bound = signature.bind(None, *args, **kwargs)
    except TypeError as err:  # too many positional arguments, one given twice
        raise ValueError(str(err)) from None
    hints = _annotations(function)
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if name in hints and kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            check_setting(name, value, hints[name])
    bound.apply_defaults()
    for name, relation in _relations(function):
        value, other = bound.arguments[name], bound.arguments[relation.other]
        if not relation.holds(value, other):
            raise ValueError(f"{name} ({value}) must be {relation.words} {relation.other} ({other})")


@functools.cache
def _annotations(function: Callable[..., Any]) -> dict[str, Any]:
    """``function``'s resolved annotations, ``Annotated`` kept (resolving them evaluates strings: done once)."""
    return typing.get_type_hints(function, include_extras=True)


@functools.cache
def _relations(function: Callable[..., Any]) -> list[tuple[str, Relation]]:
    """``(setting, relation)`` for every `Relation` in the annotations of ``function``'s arguments."""
    return [
        (name, meta)
        for name, hint in _annotations(function).items()
        if typing.get_origin(hint) is Annotated
        for meta in hint.__metadata__
        if isinstance(meta, Relation)
    ]


def _fits(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        allowed = [meta for meta in hint.__metadata__ if isinstance(meta, Allowed)]
        return _fits(value, args[0]) and all(meta.test(value) for meta in allowed)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if origin is typing.Literal:
        return any(value == choice and _fits(value, type(choice)) for choice in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if origin in (list, tuple, collections.abc.Sequence):
        return isinstance(value, (list, tuple)) and all(_fits(item, args[0]) for item in value if args)
    if origin in (dict, Mapping):
        return isinstance(value, dict)
    if isinstance(hint, type) and hint is not object:
        return isinstance(value, hint)
    return True


def _words(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        allowed = [meta for meta in hint.__metadata__ if isinstance(meta, Allowed)]
        return allowed[0].words if allowed else _words(args[0])
    if origin in (typing.Union, types.UnionType):
        alternatives = [_words(arg) for arg in args if arg is not type(None)]
        return " or ".join(alternatives) or "null"
    if origin is typing.Literal:
        return f"one of {args!r}"
    words = {bool: "a bool (true or false)", int: "an integer", float: "a finite number", str: "a string"}
    if hint in words:
        return words[hint]
    if origin in (list, tuple, collections.abc.Sequence):
        return f"a list (each item {_words(args[0])})" if args else "a list"
    if origin in (dict, Mapping):
        return "a mapping"
    return f"a {getattr(hint, '__name__', hint)}"


def check_integer(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an ``int`` if it is an integral number (Python or numpy, not a bool) ``>= minimum``;
    otherwise a ``ValueError`` naming ``name`` and what it allows."""
    check_setting(name, value, Annotated[int, at_least(minimum)])
    return int(value)


def check_count_range(name: str, value: Any) -> tuple[int, int]:
    """``(min, max)`` of a count given as an integer >= 1 (both ends) or as ``[min, max]`` of such integers with
    ``min <= max`` (`CountRange`); otherwise a ``ValueError`` naming ``name`` and what it allows."""
    check_setting(name, value, CountRange)
    low, high = value if isinstance(value, (list, tuple)) else (value, value)
    if low > high:
        raise ValueError(f"{name} [min, max] needs min <= max; got {value!r}")
    return int(low), int(high)
