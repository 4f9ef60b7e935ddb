"""Checks of a forward pass's inputs against each other and the config, from shapes and dtypes only: they read
no tensor values, so they cost no device sync (every decoded token runs them). Token ids are checked by value
where that is free or once: `check_prompt` once per ``generate``, `refuse_token_ids` when the embedding lookup
fails (on CPU; on an accelerator an out-of-vocabulary id fails inside the lookup)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .configuration_implicit import ImplicitConfig
from .rules import check_integer, check_loop_count


def describe(x: torch.Tensor) -> str:
    return f"shape {tuple(x.shape)}, dtype {x.dtype}"


# Inputs a model takes only when built for them: the argument -> the config field that must be > 0.
_BUILT_FOR = {
    "input_features": "input_features",
    "edge_features": "edge_features",
    "loop_feedback": "feedback_features",
}
# Arguments a call with a KV cache cannot take, and why.
_NOT_WITH_A_CACHE = {
    "return_trajectory": "decodes the state of several loops through the coda",
    "penalties": "are a training objective",
    "loop_feedback": "runs the coda inside the loop",
    "num_trajectories": "> 1 solves several copies of the batch",
}


def check_inputs(
    config: ImplicitConfig,
    input_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    input_features: torch.Tensor | None,
    edge_features: torch.Tensor | None,
    loop_feedback: Callable[[torch.Tensor], torch.Tensor] | None,
) -> None:
    """Refuse inputs a model of ``config`` was not built for, or that cannot go together."""
    arguments = {
        "input_ids": input_ids,
        "inputs_embeds": inputs_embeds,
        "input_features": input_features,
        "edge_features": edge_features,
        "loop_feedback": loop_feedback,
    }
    given = [name for name in ("input_ids", "inputs_embeds", "input_features") if arguments[name] is not None]
    if len(given) != 1:
        raise ValueError(f"pass exactly one of input_ids, inputs_embeds or input_features; got {given or 'none'}")
    for name, field in _BUILT_FOR.items():
        if arguments[name] is not None and not getattr(config, field):
            raise ValueError(f"{name} needs a model built with config.{field} > 0")
    if input_ids is not None and config.input_features:
        raise ValueError("this model takes input_features (config.input_features > 0), not input_ids")
    if loop_feedback is None and config.feedback_features:
        raise ValueError(
            f"this model was built with config.feedback_features={config.feedback_features} and needs "
            "loop_feedback, the function giving its in-loop features (for a task: task.loop_feedback(inputs))"
        )


def refuse_with_a_cache(**arguments: Any) -> None:
    """A ``ValueError`` naming the first of ``arguments`` (`_NOT_WITH_A_CACHE`) given to a call that uses a KV cache."""
    for name, reason in _NOT_WITH_A_CACHE.items():
        if arguments[name]:
            raise ValueError(f"{name} {reason} and cannot use a KV cache: call with use_cache=False")


def check_input_shapes(
    config: ImplicitConfig,
    input_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    input_features: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    edge_features: torch.Tensor | None,
    past: int,
) -> None:
    """Check every tensor input against the others and the config (``past``: tokens already in the cache);
    the error names the argument, its shape and the shape it needs."""
    if input_ids is not None:
        name, given = "input_ids", input_ids
    elif inputs_embeds is not None:
        name, given = "inputs_embeds", inputs_embeds
    else:
        name, given = "input_features", input_features
    check_sequence_input(name, given, config)
    batch, length = given.shape[:2]
    total = past + length
    context = f"{name} {tuple(given.shape)}" + (f" after {past} cached tokens" if past else "")
    if attention_mask is not None:
        if attention_mask.ndim == 2:
            needed = (batch, total)
            ok = tuple(attention_mask.shape) == needed
        elif attention_mask.ndim == 4:
            needed = (batch, "1 or heads", length, total)
            ok = attention_mask.shape[0] in (1, batch) and tuple(attention_mask.shape[2:]) == (length, total)
        else:
            needed, ok = (batch, total), False
        if not ok:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; with {context} it must be "
                f"{needed} (or a 4-D mask (batch, 1, {length}, {total}))"
            )
    if position_ids is not None and (
        position_ids.ndim != 2 or position_ids.shape[0] not in (1, batch) or position_ids.shape[1] != length
    ):
        raise ValueError(
            f"position_ids has shape {tuple(position_ids.shape)}; with {context} it must be ({batch} or 1, {length})"
        )
    if edge_features is not None and tuple(edge_features.shape) != (batch, length, length, config.edge_features):
        raise ValueError(
            f"edge_features has shape {tuple(edge_features.shape)}; with {context} it must be "
            f"{(batch, length, length, config.edge_features)}"
        )


def refuse_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """A ``ValueError`` naming a token id of ``input_ids`` outside ``[0, vocab_size)``, if there is one (reads the
    ids: one device sync)."""
    if input_ids.numel():
        low, high = (int(x) for x in torch.aminmax(input_ids))
        if low < 0 or high >= vocab_size:
            bad = high if high >= vocab_size else low
            raise ValueError(f"input_ids holds token id {bad}, outside the vocabulary [0, {vocab_size})")


def check_sequence_input(name: str, inputs: torch.Tensor, config: ImplicitConfig) -> None:
    """``inputs``, given as ``name`` (``input_ids``, ``inputs_embeds`` or ``input_features``), checked from its shape
    and dtype: integer token ids ``(batch, length)`` or vectors ``(batch, length, width)`` of the config's width, with
    at least one sequence and one token (an empty batch or prompt would otherwise fail deep inside attention or
    generate)."""
    if name == "input_ids":
        if inputs.ndim != 2 or inputs.dtype.is_floating_point or inputs.dtype == torch.bool:
            raise ValueError(f"input_ids must be integer token ids of shape (batch, length); got {describe(inputs)}")
    else:
        width = config.hidden_size if name == "inputs_embeds" else config.input_features
        if inputs.ndim != 3 or inputs.shape[-1] != width:
            raise ValueError(f"{name} must have shape (batch, length, {width}); got {describe(inputs)}")
    if not inputs.shape[0]:
        raise ValueError(f"{name} holds no sequences ({describe(inputs)}): give a batch of at least one sequence")
    if not inputs.shape[1]:
        raise ValueError(f"{name} has no tokens ({describe(inputs)}): give at least one token per sequence")


def check_prompt(name: str, inputs: Any, config: ImplicitConfig) -> None:
    """What ``generate`` needs of its prompt before transformers indexes it, checked once per call: the checks of
    `check_sequence_input` and token ids in the vocabulary (`check_input_shapes` checks the rest at every forward
    pass)."""
    check_sequence_input(name, inputs, config)
    if name == "input_ids":
        refuse_token_ids(inputs, config.vocab_size)


def trajectory_request(
    return_trajectory: bool | Sequence[int], trajectory_loops: Sequence[int] | None
) -> tuple[bool, tuple[int, ...] | None]:
    """A forward's ``(return_trajectory, trajectory_loops)`` checked, with a list given as ``return_trajectory``
    (its older form) taken as the ``trajectory_loops``."""
    if trajectory_loops is not None and return_trajectory is not True:  # False, or the counts given twice
        raise ValueError("trajectory_loops needs return_trajectory=True")
    if not isinstance(return_trajectory, bool):
        return True, _loop_list("return_trajectory", "True, False or a non-empty list", return_trajectory)
    if trajectory_loops is None:
        return return_trajectory, None
    return True, _loop_list("trajectory_loops", "a non-empty list", trajectory_loops)


def _loop_list(name: str, allowed: str, counts: Sequence[int]) -> tuple[int, ...]:
    try:
        checked = tuple(check_integer(name, count) for count in counts)
    except (TypeError, ValueError):  # not a list, or not of integers >= 1
        checked = ()
    if not checked:
        raise ValueError(f"{name} must be {allowed} of loop counts >= 1; got {counts!r}")
    return tuple(check_loop_count(name, count) for count in checked)
