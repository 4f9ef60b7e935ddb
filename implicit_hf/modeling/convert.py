"""Retrofit a pretrained Llama-family causal LM (Llama, Qwen2, Mistral; GGUF files through transformers'
loader) into an implicit model: some of its layers become the prelude, a block of them the weight-tied
core, some the coda; layers in between may be dropped (as in retrofitted recurrence).

    source layers:   0 1 2 3 | 4 5 6 7 8 9 | 10 11 | 12 13
                     prelude   core          dropped coda

The three model families share one layer layout (RMSNorm, RoPE, SwiGLU, GQA), so their weights load
into transformers' `LlamaDecoderLayer` as they are; Qwen2's query/key/value biases become Llama's
attention biases (its output projection, which has none, gets a zero bias). The implicit config
records where every layer came from (``config.conversion``).

With ``num_loops=1``, zero initial state, additive (or freshly initialised linear) injection and no
core or injection norm -- the defaults here -- the converted model computes exactly the source
model when no layer is dropped: the core then runs once on the prelude's output. More loops, or
dropped layers, need healing (a short fine-tune, e.g. with LoRA).

A converted residual stack does not settle when looped: with ``z + e`` injection from a zero state the
state grows by ``e`` every iteration (perplexity 456 at one loop, 1.2M at 24 for SmolLM2 with 8 layers
dropped). ``state_weight=a`` starts the loop from the prelude output instead and injects
``a z + (1 - a) e`` (a linear injection initialised to ``[a I | (1 - a) I]``): the first loop still
computes the source's layers, and later ones contract towards a fixed point at a rate of about
``a`` (456 at one loop, 534 at 24 for ``a = 0.5``, before any healing).
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import struct
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from .configuration_implicit import ImplicitConfig
from .generation import read_generation_config
from .model_card import write_model_card
from .modeling_implicit import ImplicitForCausalLM
from .rules import check, number

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
# Loop settings under which a converted model with every layer kept equals its source at one loop.
PASS_THROUGH_SETTINGS = {
    "injection": "add",
    "state_init": "zeros",
    "core_norm": False,
    "injection_norm": False,
    "num_loops": 1,
}


def parse_layers(spec: str) -> list[int]:
    """Layer indices from ``"4-9"`` (both ends included), ``"0,1,2"``, a mix ``"0-2,5"``, or ``""`` (none)."""
    layers: list[int] = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        first, _, last = item.partition("-")
        if not first.isdigit() or (last and not last.isdigit()):
            raise ValueError(f"layer range {item!r} is not an index 'N' or a range 'A-B' of non-negative integers")
        start, stop = int(first), int(last or first)
        if stop < start:
            raise ValueError(f"layer range {item!r} runs backwards")
        layers.extend(range(start, stop + 1))
    return layers


def _check_model_type(model_type: str) -> None:
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"cannot convert model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")


def format_layers(layers: Sequence[int]) -> str:
    """The inverse of `parse_layers`: ``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    runs: list[list[int]] = []
    for layer in sorted(layers):
        if runs and layer == runs[-1][1] + 1:
            runs[-1][1] = layer
        else:
            runs.append([layer, layer])
    return ",".join(str(first) if first == last else f"{first}-{last}" for first, last in runs)


def plan_layers(
    prelude: Sequence[int] | None,
    core: Sequence[int],
    coda: Sequence[int] | None,
    num_layers: int,
    keep_all_layers: bool = False,
) -> tuple[list[int], list[int], list[int], list[int]]:
    """Check the layer split against a source of ``num_layers`` layers; returns prelude, core, coda, dropped.

    ``keep_all_layers``: nothing may be dropped, and an unset (``None``) prelude or coda is every layer before or
    after the core; otherwise an unset one is empty.
    """
    core = list(core)
    if not core:
        raise ValueError("core_layers must name at least one layer")
    if prelude is None:
        prelude = list(range(min(core))) if keep_all_layers else []
    if coda is None:
        coda = list(range(max(core) + 1, num_layers)) if keep_all_layers else []
    prelude, coda = list(prelude), list(coda)
    for name, layers in (("prelude_layers", prelude), ("core_layers", core), ("coda_layers", coda)):
        increasing = layers == sorted(set(layers))
        if not increasing or any(not 0 <= i < num_layers for i in layers):
            shown = format_layers(layers) if increasing else layers
            raise ValueError(
                f"{name} {shown} must lie in 0-{num_layers - 1} (the source has {num_layers} layers) and be "
                "increasing, without repeats"
            )
    order = prelude + core + coda
    if order != sorted(set(order)):
        raise ValueError(
            f"the prelude {format_layers(prelude) or '(none)'}, core {format_layers(core)} and coda "
            f"{format_layers(coda) or '(none)'} must not overlap and must follow the source's layer order (prelude "
            "before core before coda)"
        )
    dropped = sorted(set(range(num_layers)) - set(order))
    if keep_all_layers and dropped:
        raise ValueError(
            f"the prelude {format_layers(prelude) or '(none)'}, core {format_layers(core)} and coda "
            f"{format_layers(coda) or '(none)'} leave source layers {format_layers(dropped)} out; keeping every "
            f"layer needs the three to cover 0-{num_layers - 1} without a gap"
        )
    return prelude, core, coda, dropped


def implicit_config_from(
    source_config,
    prelude_layers: Sequence[int] | None,
    core_layers: Sequence[int],
    coda_layers: Sequence[int] | None,
    source: str | None = None,
    keep_all_layers: bool = False,
    state_weight: float | None = None,
    **loop_settings: Any,
) -> ImplicitConfig:
    """The `ImplicitConfig` of a converted model: the source's architecture, the layer split (`plan_layers`),
    loop settings. Everything a conversion can refuse is refused here, before any weight is read.

    ``loop_settings`` are `ImplicitConfig` loop fields; unset ones take `PASS_THROUGH_SETTINGS`. ``state_weight``
    implies its own (`_contracting_settings`).
    """
    model_type = source_config.model_type
    _check_model_type(model_type)
    if state_weight is not None:
        loop_settings = _contracting_settings(state_weight, loop_settings)
    prelude, core, coda, dropped = plan_layers(
        prelude_layers, core_layers, coda_layers, source_config.num_hidden_layers, keep_all_layers
    )
    window = getattr(source_config, "sliding_window", None)
    if window is not None and (model_type == "mistral" or getattr(source_config, "use_sliding_window", False)):
        logger.warning(
            "the source attends within a sliding window of %d tokens; the implicit model attends to the whole "
            "sequence, so the two agree only on sequences of up to %d tokens",
            window,
            window,
        )
    settings = {**PASS_THROUGH_SETTINGS, **loop_settings}
    heads = source_config.num_attention_heads
    return ImplicitConfig(
        vocab_size=source_config.vocab_size,
        hidden_size=source_config.hidden_size,
        intermediate_size=source_config.intermediate_size,
        num_attention_heads=heads,
        num_key_value_heads=source_config.num_key_value_heads or heads,
        head_dim=getattr(source_config, "head_dim", None) or source_config.hidden_size // heads,
        hidden_act=source_config.hidden_act,
        max_position_embeddings=source_config.max_position_embeddings,
        rms_norm_eps=source_config.rms_norm_eps,
        rope_parameters=dict(source_config.rope_parameters) if source_config.rope_parameters else None,
        attention_bias=model_type == "qwen2" or bool(getattr(source_config, "attention_bias", False)),
        mlp_bias=bool(getattr(source_config, "mlp_bias", False)),
        tie_word_embeddings=bool(source_config.tie_word_embeddings),
        pad_token_id=source_config.pad_token_id,
        bos_token_id=source_config.bos_token_id,
        eos_token_id=source_config.eos_token_id,
        num_prelude_layers=len(prelude),
        num_core_layers=len(core),
        num_coda_layers=len(coda),
        is_causal=True,
        conversion={
            "source": source,
            "source_model_type": model_type,
            "source_num_layers": source_config.num_hidden_layers,
            "prelude_layers": prelude,
            "core_layers": core,
            "coda_layers": coda,
            "dropped_layers": dropped,
            "state_weight": state_weight,
        },
        **settings,
    )


def _contracting_settings(state_weight: float, loop_settings: dict[str, Any]) -> dict[str, Any]:
    """The loop settings ``state_weight`` implies (linear injection, prelude state), refusing conflicting ones."""
    check("state_weight", state_weight, number("in [0, 1)", lambda value: 0 <= value < 1))
    implied = {"injection": "linear", "state_init": "prelude"}
    for key, value in implied.items():
        if loop_settings.get(key, value) != value:
            raise ValueError(f"state_weight needs {key}={value!r}; got {key}={loop_settings[key]!r}")
    return {**loop_settings, **implied}


def convert_model(
    source_model: torch.nn.Module,
    prelude_layers: Sequence[int] | None,
    core_layers: Sequence[int],
    coda_layers: Sequence[int] | None,
    source: str | None = None,
    state_weight: float | None = None,
    keep_all_layers: bool = False,
    **loop_settings: Any,
):
    """An `ImplicitForCausalLM` holding ``source_model``'s weights, split into prelude, core and coda
    (`plan_layers`: ``keep_all_layers`` refuses a split that drops a layer).

    ``state_weight`` (in [0, 1)): inject ``a z + (1 - a) e`` from the prelude state, so the loop contracts
    (see the module docstring); ``None`` keeps ``loop_settings``' injection and initial state. A ``loop_shift``
    in ``loop_settings`` starts with its projection at zero, so the conversion stays exact at one loop.
    """
    config = implicit_config_from(
        source_model.config,
        prelude_layers,
        core_layers,
        coda_layers,
        source=source,
        keep_all_layers=keep_all_layers,
        state_weight=state_weight,
        **loop_settings,
    )
    return _with_source_weights(config, source_model)


def _with_source_weights(config: ImplicitConfig, source_model: torch.nn.Module):
    """The `ImplicitForCausalLM` of ``config`` (from `implicit_config_from`) with ``source_model``'s weights in the
    places ``config.conversion`` names."""
    plan = config.conversion
    dtype = next(source_model.parameters()).dtype
    model = ImplicitForCausalLM(config).to(dtype)
    source_state = source_model.state_dict()
    state: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": source_state["model.embed_tokens.weight"],
        "model.norm.weight": source_state["model.norm.weight"],
    }
    if not config.tie_word_embeddings:
        state["lm_head.weight"] = source_state["lm_head.weight"]
    for group in ("prelude", "core", "coda"):
        for position, layer in enumerate(plan[f"{group}_layers"]):
            prefix = f"model.layers.{layer}."
            for key, value in source_state.items():
                if key.startswith(prefix):
                    state[f"model.{group}.{position}.{key[len(prefix) :]}"] = value
    missing, unexpected = model.load_state_dict(state, strict=False)
    # What the source has no counterpart for keeps its initialisation: the injection (z + e), the
    # optional norms (ones), the tied head, and Qwen2's absent output-projection bias (set to zero).
    fresh = ("model.injection", "model.core_norm", "model.injection_norm", "model.loop_shift", "lm_head.weight")
    without_source = [key for key in missing if not key.startswith(fresh) and not key.endswith("o_proj.bias")]
    if unexpected or without_source:
        raise ValueError(
            f"the source's weights do not fit the implicit model: source weights without a place in it "
            f"{sorted(unexpected)[:8]}, weights of it the source has none for {without_source[:8]}"
        )
    for key in missing:
        if key.endswith("o_proj.bias"):
            model.get_parameter(key).data.zero_()
    state_weight = plan["state_weight"]
    if state_weight is not None:
        eye = torch.eye(config.hidden_size, dtype=dtype)
        model.model.injection.weight.data.copy_(torch.cat([state_weight * eye, (1 - state_weight) * eye], dim=1))
    if model.model.loop_shift is not None:  # adds nothing until trained: one loop is still the source model
        model.model.loop_shift.proj.weight.data.zero_()
    return model.eval()


def to_llama(model: torch.nn.Module):
    """The inverse of a conversion that drops nothing: an implicit causal LM that runs its layers once, as a
    transformers ``LlamaForCausalLM`` with the same weights (prelude, core and coda layers stacked in order).

    A model that iterates its core, normalises or shifts its state, or takes other inputs than tokens is more than
    a stack; it is refused, naming the setting (`PASS_THROUGH_SETTINGS`, ``loop_shift`` and the feature sizes
    must be those of a plain stack). Used to train an explicit Llama baseline by the training loop of implicit
    models, then score it as any transformers model.
    """
    config = model.config
    plain = {**PASS_THROUGH_SETTINGS, "loop_shift": 0, "input_features": 0, "edge_features": 0, "feedback_features": 0}
    differing = {key: getattr(config, key) for key, value in plain.items() if getattr(config, key) != value}
    if differing:
        raise ValueError(
            f"only an implicit model that runs its layers once as a plain stack is a Llama ({plain}); got {differing}"
        )
    llama_config = LlamaConfig(
        **{
            name: getattr(config, name)
            for name in (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_attention_heads",
                "num_key_value_heads",
                "head_dim",
                "hidden_act",
                "max_position_embeddings",
                "initializer_range",
                "rms_norm_eps",
                "rope_parameters",
                "attention_bias",
                "attention_dropout",
                "mlp_bias",
                "tie_word_embeddings",
                "pad_token_id",
                "bos_token_id",
                "eos_token_id",
            )
        },
        num_hidden_layers=config.num_hidden_layers,
    )
    llama = LlamaForCausalLM(llama_config).to(next(model.parameters()).dtype)
    layers = [*model.model.prelude, *model.model.core, *model.model.coda]
    state = {
        f"model.layers.{i}.{key}": value for i, layer in enumerate(layers) for key, value in layer.state_dict().items()
    }
    state["model.embed_tokens.weight"] = model.model.embed_tokens.weight
    state["model.norm.weight"] = model.model.norm.weight
    state["lm_head.weight"] = model.lm_head.weight
    llama.load_state_dict(state, strict=True)
    return llama.eval()


def convert_checkpoint(
    source: str | Path,
    output_dir: str | Path,
    prelude_layers: Sequence[int] | None,
    core_layers: Sequence[int],
    coda_layers: Sequence[int] | None,
    gguf_file: str | None = None,
    keep_all_layers: bool = False,
    **loop_settings: Any,
):
    """Load ``source`` (a directory or hub id; ``gguf_file`` inside it for GGUF: its name there, or an absolute
    path inside the folder, `gguf_name`), convert it as `convert_model` does, and write the implicit checkpoint
    (safetensors, config recording the layer origins, tokenizer) to ``output_dir``.

    Everything is read and checked before anything is written: the config (`implicit_config_from`), the tokenizer
    (it must load and fit the vocabulary), the source's ``generation_config.json`` and its weights; an unreadable
    file is an ``OSError`` naming it. The checkpoint is then written into a temporary folder beside ``output_dir``
    and moved into place (`_move_into_place`), so a failure leaves no ``output_dir`` behind; into an existing
    ``output_dir`` it replaces every file of an earlier checkpoint (`CHECKPOINT_FILES`) and keeps other files.
    """
    if gguf_file:
        gguf_file = gguf_name(source, gguf_file)
    load_kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    # the model type, the layer split and every loop setting are checked on the config, before any weight is read
    name = str(Path(source) / gguf_file) if gguf_file else str(source)
    config = implicit_config_from(
        _read_source("config", name, AutoConfig.from_pretrained, str(source), **load_kwargs),
        prelude_layers,
        core_layers,
        coda_layers,
        source=name,
        keep_all_layers=keep_all_layers,
        **loop_settings,
    )
    tokenizer = _read_source("tokenizer", name, AutoTokenizer.from_pretrained, str(source), **load_kwargs)
    if len(tokenizer) > config.vocab_size:
        raise ValueError(
            f"the tokenizer of source {name!r} has {len(tokenizer)} tokens, more than the model's vocab_size "
            f"{config.vocab_size}"
        )
    generation_config = Path(source) / "generation_config.json"
    if generation_config.is_file():
        read_generation_config(generation_config)
    files = sorted(path.name for pattern in ("*.safetensors", "*.bin") for path in Path(source).glob(pattern))
    weights = f"weights ({', '.join(files)})" if files and not gguf_file else "weights"
    source_model = _read_source(weights, name, AutoModelForCausalLM.from_pretrained, str(source), **load_kwargs)
    model = _with_source_weights(config, source_model)
    output = Path(output_dir)
    staging = output.parent / f".{output.name}.{uuid.uuid4().hex}.partial"
    written = staging / output.name  # named as the destination: the model card names the model by its folder
    try:
        model.save_pretrained(written)
        tokenizer.save_pretrained(written)
        if generation_config.is_file() and not (written / "generation_config.json").exists():
            shutil.copy(generation_config, written / "generation_config.json")
        write_model_card(written)
        _move_into_place(written, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return model


# what reading a missing or damaged source file raises: transformers (OSError, ValueError), safetensors, the GGUF
# reader (struct.error, ValueError), torch pickles (RuntimeError, EOFError, UnpicklingError)
_READ_ERRORS = (OSError, ValueError, RuntimeError, EOFError, struct.error, pickle.UnpicklingError, SafetensorError)


def _read_source(what: str, name: str, read: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``read(*args, **kwargs)``, or an ``OSError`` saying that the ``what`` of source ``name`` cannot be read, and
    why."""
    try:
        return read(*args, **kwargs)
    except _READ_ERRORS as err:
        raise OSError(f"cannot read the {what} of source {name!r}: {err}") from err


def gguf_name(source: str | Path, gguf_file: str) -> str:
    """``gguf_file`` as the name of a file inside ``source``, which is what transformers' ``gguf_file`` is: a
    relative name as given, an absolute path that lies inside the folder ``source`` relative to it. Any other
    absolute path is a ``ValueError``: transformers would read the GGUF file from there but the source's other
    files (``generation_config.json``) from ``source``."""
    path = Path(gguf_file)
    if not path.is_absolute():
        return gguf_file
    try:
        return path.resolve().relative_to(Path(source).resolve()).as_posix()
    except ValueError:
        raise ValueError(
            f"gguf_file {gguf_file!r} is not inside source {str(source)!r}: give the name of a GGUF file in source, "
            "or that file's folder as source"
        ) from None


# The files of a checkpoint folder that transformers (model, tokenizer, generation settings, peft adapters) or
# implicit-hf eval (implicit_task.json: the task a model was trained on) read: converting into a folder that holds
# an earlier checkpoint removes those of them the new checkpoint does not write, so that none is loaded with it or
# misdescribes it. Other files (notes, results) stay.
CHECKPOINT_FILES = (
    "config.json",
    "generation_config.json",
    "model*.safetensors*",
    "pytorch_model*.bin*",
    "tf_model*.h5*",
    "flax_model*.msgpack*",
    "adapter_config.json",
    "adapter_model*",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "spiece.model",
    "sentencepiece*.model",
    "chat_template.*",
    "additional_chat_templates",
    "implicit_task.json",
)


def _move_into_place(written: Path, output: Path) -> None:
    """Move the checkpoint folder ``written`` to ``output``: by one rename when ``output`` does not exist; into an
    existing ``output`` file by file (each an atomic replace), after removing the files of an earlier checkpoint
    (`CHECKPOINT_FILES`) that ``written`` does not have; other files stay."""
    if not output.exists():
        written.rename(output)
        return
    names = {path.name for path in written.iterdir()}
    for stale in {path for pattern in CHECKPOINT_FILES for path in output.glob(pattern)}:
        if stale.name in names:
            continue
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale)
        else:
            stale.unlink()
    for path in written.iterdir():
        if path.is_dir() and (output / path.name).is_dir():  # a folder of the new checkpoint replaces the old one
            shutil.rmtree(output / path.name)
        os.replace(path, output / path.name)
