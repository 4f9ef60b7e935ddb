"""Per-call settings through ``generate``: a call's ``num_loops`` / ``tol`` / ``solver`` and trajectory settings
(``num_trajectories`` / ``trajectory_noise`` / ``select`` / ``trajectory_seed`` / ``trajectory_batch_size``), a
`GenerationConfig`'s entries of those names and a checkpoint's generation_config.json, checked once per call or load.

A generate call takes each of these settings from, in order: its own argument (``num_loops=K``), the
``generation_config`` given to it, the model's ``generation_config`` (a checkpoint's generation_config.json),
the model's config. ``from_pretrained(dir, num_loops=K)`` (lm-eval's ``--model_args ...,num_loops=K``) sets
the config and leaves that setting out of the model's ``generation_config``, so it holds for generation too.

Several trajectories per input (``num_trajectories > 1``) solve ``K`` copies of the batch and cannot keep a KV
cache: such a generate call needs ``use_cache=False`` and is refused before any forward pass otherwise. Every
decoding step is then one uncached forward over the whole sequence, and forward is stateless: each step draws the
starting noise again from ``trajectory_seed``, per trajectory and position (a token keeps its draw from step to step),
so a greedy generate equals a loop of forward calls with the same settings taking the argmax of the last position.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from transformers import GenerationConfig
from transformers.utils import GENERATION_CONFIG_NAME, cached_file

from .configuration_implicit import LOOP_KEYWORDS, PER_CALL_FIELDS, check_per_call_loop_setting, per_call_loop_settings
from .inputs import check_prompt

# What `from_pretrained` hands `adjust_generation_fn` to find a checkpoint's files (transformers' download_kwargs).
# The names a KV cache handed to generate goes by (``past_key_values``: transformers' own; ``cache``: this model's).
_CACHE_KEYWORDS = ("past_key_values", "cache")
_DOWNLOAD_KEYWORDS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "subfolder")


@functools.cache
def _standard_generation_fields() -> frozenset[str]:
    """The attributes every transformers `GenerationConfig` has: what is not among them is a custom entry."""
    return frozenset(vars(GenerationConfig()))


def custom_entries(generation_config: GenerationConfig) -> dict[str, Any]:
    """A generation config's entries beyond transformers' own (where loop settings live): checked once per
    ``generate`` call, so read without ``to_dict``'s deep copy or a look at every standard field."""
    standard = _standard_generation_fields()
    return {key: value for key, value in vars(generation_config).items() if key not in standard}


class LoopSettingsGenerationMixin:
    """Put before ``ImplicitPreTrainedModel`` and transformers' ``GenerationMixin`` in a causal LM's bases."""

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """transformers' ``save_pretrained``; loop settings set on ``generation_config`` are checked first (a
        checkpoint that ``from_pretrained`` would refuse is not written) and saved with it (transformers drops a
        custom entry of a generation config derived from the model config on load)."""
        generation_config = getattr(self, "generation_config", None)
        if generation_config is not None:
            per_call_loop_settings(custom_entries(generation_config), "generation_config.")
            if any(hasattr(generation_config, name) for name in PER_CALL_FIELDS):
                generation_config._from_model_config = False
        super().save_pretrained(save_directory, *args, **kwargs)

    def adjust_generation_fn(
        self, generation_config, from_auto_class, from_pipeline, pretrained_model_name_or_path, *args, **kwargs
    ) -> None:
        """transformers' loading of the generation config at ``from_pretrained``, then its loop settings
        (`PER_CALL_FIELDS`) checked and kept: those of ``from_pretrained(..., generation_config=...)``, else
        those of the checkpoint's generation_config.json, which transformers drops when the file says
        ``_from_model_config`` (as ``save_pretrained`` of a model's default generation config writes). A setting
        given to ``from_pretrained`` as a keyword argument (``num_loops=7``: the config has it) is not kept: the
        keyword wins. A generation_config.json that is not valid JSON or not a JSON object is an ``OSError``
        naming it."""
        if generation_config is not None:
            entries, where = custom_entries(generation_config), "generation_config."
        else:
            entries, where = _saved_generation_entries(pretrained_model_name_or_path, kwargs)
        super().adjust_generation_fn(
            generation_config, from_auto_class, from_pipeline, pretrained_model_name_or_path, *args, **kwargs
        )
        keywords = self.config.__dict__.pop(LOOP_KEYWORDS, ())
        for name, value in per_call_loop_settings(entries, where).items():
            if name not in keywords:
                setattr(self.generation_config, name, value)
        for name in keywords:  # transformers may have copied the keyword into the generation config
            if hasattr(self.generation_config, name):
                delattr(self.generation_config, name)

    def _prepare_generation_config(self, generation_config, **kwargs):
        # transformers would absorb per-call settings into the generation config (they are custom entries of it)
        # and never pass them to forward: take them out, explicit arguments first, then the config's. Both are
        # checked here, once per generate call, the config's named as its entries.
        explicit = {
            name: check_per_call_loop_setting(name, kwargs.pop(name)) for name in PER_CALL_FIELDS if name in kwargs
        }
        generation_config, model_kwargs = super()._prepare_generation_config(generation_config, **kwargs)
        configured = per_call_loop_settings(custom_entries(generation_config), "generation_config.")
        for name in PER_CALL_FIELDS:
            value = explicit[name] if name in explicit else configured.get(name)
            if value is not None:
                model_kwargs[name] = value
        return generation_config, model_kwargs

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        # the last step before a cache is made and the first forward runs: several trajectories per input and a KV
        # cache (generate's default) cannot go together, so refuse the call here rather than at its first forward
        given = model_kwargs.get("num_trajectories")
        count = self.trajectory_settings(num_trajectories=given)["num_trajectories"]
        cached = generation_config.use_cache or any(model_kwargs.get(name) is not None for name in _CACHE_KEYWORDS)
        if count > 1 and cached:
            source = "" if given is not None else " (the model's config.num_trajectories)"
            raise ValueError(
                "num_trajectories > 1 solves several copies of the batch and cannot use a KV cache: call with "
                f"use_cache=False (this generate call runs num_trajectories={count}{source}; generate keeps a KV cache "
                "unless given use_cache=False, as an argument or in its GenerationConfig)"
            )
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    def _prepare_model_inputs(self, inputs, bos_token_id, model_kwargs):
        # an empty or 1-D prompt fails inside transformers' generate before any forward pass: refuse it here, once
        inputs, input_name, model_kwargs = super()._prepare_model_inputs(inputs, bos_token_id, model_kwargs)
        check_prompt(input_name, inputs, self.config)
        return inputs, input_name, model_kwargs


def _saved_generation_entries(pretrained_model_name_or_path, kwargs: dict) -> tuple[dict, str]:
    """The entries of the checkpoint's generation_config.json (none without one) and the prefix naming it."""
    found = pretrained_model_name_or_path and cached_file(
        pretrained_model_name_or_path,
        GENERATION_CONFIG_NAME,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
        **{key: kwargs[key] for key in _DOWNLOAD_KEYWORDS if key in kwargs},
    )
    if not found:
        return {}, ""
    return read_generation_config(found), f"{found}: "


def read_generation_config(path: str | Path) -> dict[str, Any]:
    """The entries of the generation_config.json at ``path``; an ``OSError`` naming it when it is not valid JSON or
    not a JSON object."""
    try:
        with open(path, encoding="utf-8") as file:
            entries = json.load(file)
    except ValueError as err:  # not JSON (a truncated file), or not UTF-8
        raise OSError(f"{str(path)!r} is not valid JSON: {err}") from err
    if not isinstance(entries, dict):
        raise OSError(f"{str(path)!r} must hold a JSON object (a generation config); got {entries!r:.40}")
    return entries
