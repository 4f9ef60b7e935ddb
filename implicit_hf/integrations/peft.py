"""PEFT LoRA for implicit models: adapters on the core block (and the prelude / coda), and one adapter
per loop index ("relaxed recursion": weight-tied base, loop-specific low-rank deltas).

Everything is a `peft` LoRA: `lora_config` only picks the target modules by layer group, so
``get_peft_model``, ``save_pretrained``, ``PeftModel.from_pretrained`` and ``merge_and_unload`` work as
for any transformers model. `add_loop_adapters` adds adapters ``loop_0 .. loop_{K-1}`` to the core;
the model's ``loop_hook`` activates adapter ``k`` on the core's LoRA layers before its ``k``-th
iteration (iterations past ``K`` reuse the last one). Per-loop adapters cannot be merged into the
tied weights (each loop would need its own copy); `merge_and_unload` works for a single adapter.

Relaxed recursion from a pretrained model (Bae et al. 2024): `relaxed_recursion` ties the source's
core layers to its first block and initialises adapter ``k`` by a truncated SVD of ``W_k - W_tied``
(the weights loop ``k`` replaces); at full rank the looped model equals the source stack exactly.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper

from ..modeling import ImplicitModel
from ..modeling.configuration_implicit import check, check_integer, check_loop_count, number
from ..modeling.convert import convert_model, plan_layers

LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LAYER_GROUPS = ("prelude", "core", "coda")

__all__ = [
    "LAYER_GROUPS",
    "LINEAR_MODULES",
    "LoopAdapterSwitch",
    "add_loop_adapters",
    "attach_loop_adapters",
    "check_core_blocks",
    "implicit_model_of",
    "init_loop_adapters_by_svd",
    "load_loop_adapters",
    "lora_config",
    "loop_adapter_names",
    "relaxed_recursion",
    "target_modules",
    "unmatched_modules_to_save",
    "with_adapters",
]


def target_modules(parts: Sequence[str] = ("core",), modules: Sequence[str] = LINEAR_MODULES) -> str:
    """A peft ``target_modules`` regex selecting ``modules`` in the layer groups ``parts``."""
    for name, given, allowed in (("parts", parts, LAYER_GROUPS), ("modules", modules, LINEAR_MODULES)):
        unknown = [item for item in given if item not in allowed]
        if not given or unknown:
            raise ValueError(f"lora {name} must be a non-empty subset of {list(allowed)}; got {list(given)}")
    return rf"(.*\.)?({'|'.join(parts)})\.\d+\.(self_attn|mlp)\.({'|'.join(modules)})"


def lora_config(
    parts: Sequence[str] = ("core",),
    r: int = 8,
    alpha: float | None = None,
    dropout: float = 0.0,
    modules: Sequence[str] = LINEAR_MODULES,
    **kwargs: Any,
) -> LoraConfig:
    """A `LoraConfig` on the linear layers of the given layer groups (``alpha`` defaults to ``2 r``)."""
    r = check_integer("lora r", r)
    alpha = check("lora alpha", alpha, number("> 0", lambda value: value > 0, allow_none=True))
    dropout = check("lora dropout", dropout, number("in [0, 1)", lambda value: 0 <= value < 1))
    return LoraConfig(
        r=r,
        lora_alpha=alpha if alpha is not None else 2 * r,
        lora_dropout=dropout,
        target_modules=target_modules(parts, modules),
        **kwargs,
    )


def with_adapters(model: torch.nn.Module, lora_kwargs: dict[str, Any]) -> PeftModel:
    """``model`` wrapped by peft with LoRA adapters built by `lora_config` from ``lora_kwargs``: only they train."""
    return get_peft_model(model, lora_config(**lora_kwargs))


def unmatched_modules_to_save(model: torch.nn.Module, names: Sequence[str]) -> list[str]:
    """The ``modules_to_save`` ``names`` that match no module peft wrapped in ``model`` (peft ignores them)."""
    wrapped = [name for name, module in model.named_modules() if isinstance(module, ModulesToSaveWrapper)]
    return [name for name in names if not any(path.split(".")[-1] == name for path in wrapped)]


def loop_adapter_names(num_loops: int) -> list[str]:
    return [f"loop_{k}" for k in range(num_loops)]


def implicit_model_of(model: torch.nn.Module) -> ImplicitModel:
    """The `ImplicitModel` inside a head model, possibly wrapped by peft."""
    found = [module for module in model.modules() if isinstance(module, ImplicitModel)]
    if len(found) != 1:
        raise ValueError(f"expected exactly one ImplicitModel inside {type(model).__name__}; found {len(found)}")
    return found[0]


class LoopAdapterSwitch:
    """The ``loop_hook`` that makes adapter ``names[k]`` the only active one on the core's LoRA layers at loop k."""

    def __init__(self, implicit: ImplicitModel, names: Sequence[str]):
        self.names = list(names)
        self.layers = [m for m in implicit.core.modules() if isinstance(m, LoraLayer)]
        missing = [name for name in self.names if any(name not in layer.lora_A for layer in self.layers)]
        if not self.layers or missing:
            raise ValueError(f"the core's LoRA layers lack the loop adapters {missing or self.names}")

    def __call__(self, loop: int) -> None:
        active = [self.names[min(loop, len(self.names) - 1)]]
        for layer in self.layers:
            # BaseTunerLayer.set_adapter would also switch requires_grad off for the other loops'
            # adapters, which all train together; only the active set changes here.
            layer._active_adapter = active


def attach_loop_adapters(peft_model: PeftModel, names: Sequence[str]) -> PeftModel:
    """Make every adapter in ``names`` trainable and switch between them by loop index."""
    peft_model.base_model.set_adapter(list(names))
    implicit = implicit_model_of(peft_model)
    implicit.loop_hook = LoopAdapterSwitch(implicit, names)
    return peft_model


def add_loop_adapters(
    model: torch.nn.Module, num_loops: int, r: int = 8, alpha: float | None = None, **kwargs: Any
) -> PeftModel:
    """``model`` with LoRA adapters ``loop_0 .. loop_{num_loops-1}`` on its core, loop ``k`` using adapter ``k``."""
    num_loops = check_loop_count("num_loops", num_loops)
    config = lora_config(("core",), r=r, alpha=alpha, **kwargs)
    names = loop_adapter_names(num_loops)
    peft_model = get_peft_model(model, config, adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, config)
    return attach_loop_adapters(peft_model, names)


def load_loop_adapters(model: torch.nn.Module, path: str | Path, num_loops: int) -> PeftModel:
    """Load adapters saved by ``PeftModel.save_pretrained`` of a model built by `add_loop_adapters`."""
    path = Path(path)
    names = loop_adapter_names(check_loop_count("num_loops", num_loops))
    # peft saves the first adapter at the top level only when it is called "default": the others live in subfolders
    folders = [path / name for name in names]
    absent = [str(folder) for folder in folders if not (folder / "adapter_config.json").is_file()]
    if absent:
        raise FileNotFoundError(f"no saved loop adapters at {absent}")
    peft_model = PeftModel.from_pretrained(model, folders[0], adapter_name=names[0], is_trainable=True)
    for name, folder in zip(names[1:], folders[1:], strict=True):
        peft_model.load_adapter(folder, adapter_name=name, is_trainable=True)
    return attach_loop_adapters(peft_model, names)


def check_core_blocks(
    core_blocks: Sequence[Sequence[int]],
    num_layers: int,
    block_length: int | None = None,
    in_layer_order: bool = True,
    name: str = "core_blocks",
) -> list[list[int]]:
    """``core_blocks`` as lists, if they are one or more blocks of equal length (``block_length`` when given) of
    increasing source layer indices in ``0 .. num_layers - 1``; with ``in_layer_order``, also in the source's layer
    order without a shared layer (loop ``k`` stands where block ``k`` stood). Otherwise a ``ValueError`` naming
    ``name``, the block and what is allowed."""
    try:
        blocks = [list(block) for block in core_blocks]
    except TypeError:
        blocks = []
    if not blocks:
        raise ValueError(
            f"{name} must be a non-empty list of blocks (lists of source layer indices); got {core_blocks!r}"
        )
    length = len(blocks[0]) if block_length is None else block_length
    reason = "one per core layer" if block_length is not None else f"as many as {name}[0]"
    # what every block must be, in the order checked (a block of strings is not compared with layer indices)
    rules = [
        (lambda block: all(_is_index(i) for i in block), "must hold source layer indices (integers)"),
        (
            lambda block: all(0 <= i < num_layers for i in block),
            f"must lie in 0-{num_layers - 1} (the source has {num_layers} layers)",
        ),
        (
            lambda block: block and block == sorted(set(block)),
            "must be a non-empty list of increasing layer indices, without repeats",
        ),
        (
            lambda block: len(block) == length,
            f"must have {length} layers ({reason}): every loop replaces the same tied block",
        ),
    ]
    for k, block in enumerate(blocks):
        where = f"{name}[{k}] {block}"
        broken = next((rule for holds, rule in rules if not holds(block)), None)
        if broken:
            raise ValueError(f"{where} {broken}")
        if in_layer_order and k and block[0] <= blocks[k - 1][-1]:
            raise ValueError(
                f"{name}[{k - 1}] {blocks[k - 1]} and {where} must not overlap and must follow the source's layer "
                f"order: loop {k} stands where block {k} stood, after block {k - 1}"
            )
    return blocks


def _is_index(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@torch.no_grad()
def init_loop_adapters_by_svd(
    peft_model: PeftModel, source_model: torch.nn.Module, source_layers: Sequence[Sequence[int]]
) -> dict[str, float]:
    """Set adapter ``loop_k`` of every core LoRA layer to the rank-``r`` truncated SVD of ``W_k - W_tied``.

    ``source_layers[k][i]`` is the source layer that core layer ``i`` stands for at loop ``k``.
    Returns, per loop, the mean over modules of ``||D - s B A|| / ||D||`` with ``D = W_k - W_tied``: the
    fraction of the difference the adapter misses (1 at rank 0; 0 for loop 0, where ``D = 0``).
    """
    implicit = implicit_model_of(peft_model)
    num_layers = source_model.config.num_hidden_layers
    source_layers = check_core_blocks(
        source_layers, num_layers, len(implicit.core), in_layer_order=False, name="source_layers"
    )
    names = implicit.loop_hook.names if isinstance(implicit.loop_hook, LoopAdapterSwitch) else None
    if names is None or len(names) != len(source_layers):
        raise ValueError("init_loop_adapters_by_svd needs a model from add_loop_adapters with one adapter per loop")
    source_state = source_model.state_dict()
    errors = {name: [] for name in names}
    pattern = re.compile(r"(\d+)\.(self_attn|mlp)\.(\w+)$")
    for module_name, module in implicit.core.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        position, block, linear = pattern.search(module_name).groups()
        tied = module.get_base_layer().weight.float()
        for name, layers in zip(names, source_layers, strict=True):
            original = source_state[f"model.layers.{layers[int(position)]}.{block}.{linear}.weight"].float()
            delta = original - tied
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)
            rank = min(module.r[name], s.numel())  # an adapter wider than the matrix keeps zeros in the rest
            root = (s[:rank] / module.scaling[name]).sqrt()
            module.lora_B[name].weight.zero_()[:, :rank] = u[:, :rank] * root
            module.lora_A[name].weight.zero_()[:rank] = root[:, None] * vh[:rank]
            approx = module.scaling[name] * module.lora_B[name].weight @ module.lora_A[name].weight
            errors[name].append(float((delta - approx).norm() / delta.norm().clamp_min(1e-12)))
    # loop 0 is the tied block itself: its delta is zero and its adapter starts at zero
    return {name: sum(values) / len(values) for name, values in errors.items()}


def relaxed_recursion(
    source_model: torch.nn.Module,
    prelude_layers: Sequence[int],
    core_blocks: Sequence[Sequence[int]],
    coda_layers: Sequence[int],
    r: int = 8,
    alpha: float | None = None,
    **kwargs: Any,
) -> PeftModel:
    """A relaxed recursive model of ``source_model``: its first core block tied and looped
    ``len(core_blocks)`` times, loop ``k`` corrected by a LoRA adapter initialised from block ``k``.

    The loop carries the state alone (``state_init="prelude"``, linear injection ``[I | 0]``), so loop
    ``k`` stands exactly where block ``k`` stood in the source stack: the blocks follow the source's layer
    order without overlap (`check_core_blocks`), the prelude before them and the coda after them.
    """
    num_layers = source_model.config.num_hidden_layers
    blocks = check_core_blocks(core_blocks, num_layers)
    # the prelude and coda against every block, not only the tied one (which convert_model checks them against)
    plan_layers(prelude_layers, [layer for block in blocks for layer in block], coda_layers, num_layers)
    model = convert_model(
        source_model,
        prelude_layers,
        blocks[0],
        coda_layers,
        injection="linear",
        state_init="prelude",
        num_loops=len(blocks),
    )
    hidden = model.config.hidden_size
    with torch.no_grad():
        model.model.injection.weight.copy_(torch.cat([torch.eye(hidden), torch.zeros(hidden, hidden)], dim=1))
    model.config.conversion["core_blocks"] = blocks
    model.config.conversion["dropped_layers"] = [
        i for i in model.config.conversion["dropped_layers"] if not any(i in block for block in blocks)
    ]
    peft_model = add_loop_adapters(model, len(blocks), r=r, alpha=alpha, **kwargs)
    errors = init_loop_adapters_by_svd(peft_model, source_model, blocks)
    model.config.conversion["svd_relative_error"] = errors  # ||D - BA|| / ||D||, D = W_k - W_tied
    return peft_model
