"""Settings declared once, as annotated dataclass fields: ``Annotated[int, at_least(1)]`` says a field's type and the
values it takes (`implicit_hf.checks.Allowed`). `check_fields` enforces every declaration of a settings object;
`TrainConfig`, `LoopSchedule` and `DistillSettings` call it when they are built.
Pure Python (``implicit-hf train --help`` imports no torch)."""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Callable, Iterable
from typing import Any

from ..checks import Allowed, check_setting


def choice(options: Iterable[Any]) -> Allowed:
    """One of ``options``: ``Annotated[str, choice(("no", "fp16"))]``."""
    options = tuple(options)
    return Allowed(f"one of {options}", lambda value: value in options)


def check_fields(settings: Any, name: Callable[[str], str]) -> None:
    """Refuse, with a ``ValueError`` "``name(field)`` must be ...; got ...", a field of the dataclass ``settings`` that
    is not of its annotation."""
    hints = _hints(type(settings))
    for spec in dataclasses.fields(settings):
        check_setting(name(spec.name), getattr(settings, spec.name), hints[spec.name])


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """``cls``'s field annotations, ``Annotated`` kept (resolving them evaluates strings: done once)."""
    return typing.get_type_hints(cls, include_extras=True)
