"""How a training run is spread over processes: what the launcher asked for, checked against what
accelerate gave, and FSDP2 sharding for CPU processes, which accelerate does not offer.

`accelerate launch` records the request in the environment (``WORLD_SIZE``, ``ACCELERATE_USE_FSDP``,
``ACCELERATE_USE_DEEPSPEED`` and the ``FSDP_*`` settings of the config file). Accelerate then silently
runs what the machine allows: plain DDP for an FSDP config on CPU processes, or N independent
single-process runs when no backend is found. `plan_launch` compares the two before the first step and
refuses a mismatch with what to run instead, except one that this module fills in:

* FSDP on CPU processes (``ACCELERATE_USE_CPU=true``, gloo): accelerate gives ``MULTI_CPU``, so the model
  is sharded here with torch's ``fully_shard`` (FSDP2) and NOT handed to ``accelerator.prepare`` (which
  would wrap it in DDP). Every ``LlamaDecoderLayer`` (prelude, core and coda layers alike) is its own FSDP
  unit and the root module holds the rest (embeddings, injection, norm, head). The weight-tied core
  stays ONE set of parameters: its layers are the same modules called on every loop iteration, each
  call all-gathering the layer's shards again when ``fsdp_reshard_after_forward`` is true.
* Checkpoints of such a run are sharded (`save_sharded`/`load_sharded`: torch.distributed.checkpoint,
  every process writes its own shards of the model and optimizer); the final ``model/`` is gathered into
  one ordinary checkpoint (`full_state_dict`).

With a GPU, accelerate itself runs the FSDP and DeepSpeed plugins and nothing here changes them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WRAP_POLICY = "TRANSFORMER_BASED_WRAP"  # the one auto-wrap policy of CPU FSDP: every decoder layer its own unit
SHARDED_DIR = "sharded"  # inside checkpoints/step_N: the model and optimizer shards of a CPU FSDP run


class LaunchError(ValueError):
    """The processes accelerate runs are not what the launcher was asked for."""


@dataclass(frozen=True)
class LaunchPlan:
    """What the training loop does with the model: ``shard_on_cpu`` (FSDP2 here) or accelerate's ``prepare``."""

    shard_on_cpu: bool = False
    reshard_after_forward: bool = True
    wrap_classes: tuple[str, ...] = ()


def requested_plugin(environ: Mapping[str, str] = os.environ) -> str | None:
    """The distributed plugin `accelerate launch` was asked for by its config file or flags."""
    for name, variable in (("fsdp", "ACCELERATE_USE_FSDP"), ("deepspeed", "ACCELERATE_USE_DEEPSPEED")):
        if environ.get(variable, "false").lower() in ("1", "true", "yes"):
            return name
    return None


def plan_launch(accelerator, mixed_precision: str) -> LaunchPlan:
    """Compare the launcher's request (the environment) with ``accelerator``'s state; raise `LaunchError` on a
    mismatch."""
    from accelerate.utils import DistributedType

    environ = os.environ
    launched = int(environ.get("WORLD_SIZE", "1"))
    got = accelerator.distributed_type
    if launched != accelerator.num_processes:
        raise LaunchError(
            f"the launcher started {launched} processes but accelerate runs each as {accelerator.num_processes} "
            f"({got}): they would train independently into one output_dir. On a machine without GPUs set "
            "ACCELERATE_USE_CPU=true (CPU processes, gloo backend); or run one process (implicit-hf train RECIPE)"
        )
    requested = requested_plugin(environ)
    if requested == "deepspeed" and got != DistributedType.DEEPSPEED:
        raise LaunchError(
            f"a DeepSpeed config was launched but accelerate runs {got}: DeepSpeed needs GPUs here (it does not "
            "train on CPU processes); on CPU use configs/accelerate/fsdp.yaml or ddp.yaml with ACCELERATE_USE_CPU=true"
        )
    if requested != "fsdp" or got == DistributedType.FSDP:
        return LaunchPlan()
    if got != DistributedType.MULTI_CPU:
        raise LaunchError(
            f"an FSDP config was launched but accelerate runs {got} with {accelerator.num_processes} process(es): "
            "FSDP needs several processes; launch 2 or more (--num_processes N, with ACCELERATE_USE_CPU=true on CPU)"
        )
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()  # parses the FSDP_* settings accelerate launch wrote
    flag = environ.get
    unsupported = {
        "fsdp_version": (plugin.fsdp_version, 2, "set fsdp_version: 2"),
        "fsdp_offload_params": (flag("FSDP_OFFLOAD_PARAMS", "false"), "false", "the parameters are on the CPU already"),
        "fsdp_activation_checkpointing": (
            flag("FSDP_ACTIVATION_CHECKPOINTING", "false"),
            "false",
            "use the recipe's gradient_checkpointing instead",
        ),
        "fsdp_auto_wrap_policy": (flag("FSDP_AUTO_WRAP_POLICY", WRAP_POLICY), WRAP_POLICY, "every layer its own unit"),
    }
    for name, (value, allowed, hint) in unsupported.items():
        if str(value).lower() != str(allowed).lower():
            raise LaunchError(f"FSDP on CPU processes supports {name}: {allowed} only; the config has {value} ({hint})")
    if mixed_precision == "fp16":
        raise LaunchError(
            "FSDP on CPU processes cannot train in fp16 (its loss scaling needs accelerate's FSDP): "
            "use mixed_precision bf16 or no"
        )
    return LaunchPlan(
        shard_on_cpu=True,
        reshard_after_forward=bool(plugin.reshard_after_forward),
        wrap_classes=tuple(plugin.transformer_cls_names_to_wrap or ("LlamaDecoderLayer",)),
    )


def check_fixed_iterations(config, schedule=None) -> None:
    """FSDP all-gathers a layer's shards on every call, so every process must call the core equally often:
    refuse the settings (of the model ``config`` and the training loop ``schedule``) that let the number of
    iterations differ between processes."""
    if schedule is not None and schedule.needs_difficulty:
        raise LaunchError(
            "FSDP on CPU processes needs the same number of loop iterations on every process: the above_difficulty "
            "loop schedule draws each process's count above its own batch; use another schedule, or DDP"
        )
    if config.tol is not None:
        raise LaunchError(
            f"FSDP on CPU processes needs the same number of loop iterations on every process: model.tol "
            f"({config.tol}) halts each process's batch at its own count; train with tol: null under FSDP, or with DDP"
        )
    if config.gradient == "ift":
        raise LaunchError(
            "FSDP on CPU processes cannot run gradient: ift (its backward solve halts at a per-process count); "
            "use unroll, truncated, jfb or phantom"
        )


def shard_model(model, plan: LaunchPlan):
    """``fully_shard`` every layer of ``plan.wrap_classes``, then the root module (FSDP2, in place)."""
    from torch.distributed.fsdp import fully_shard

    layers = [module for module in model.modules() if type(module).__name__ in plan.wrap_classes]
    if not layers:
        raise LaunchError(f"FSDP: the model has no layer of the classes to wrap {list(plan.wrap_classes)}")
    for layer in layers:
        fully_shard(layer, reshard_after_forward=plan.reshard_after_forward)
    fully_shard(model, reshard_after_forward=plan.reshard_after_forward)
    return model


@contextlib.contextmanager
def gathered(model, plan: LaunchPlan) -> Iterator[None]:
    """Under FSDP on CPU processes, every FSDP unit of ``model`` all-gathered for the block, so that inference
    (whose halting may stop processes at different iteration counts) runs without collectives; sharded again
    after. Otherwise nothing."""
    if not plan.shard_on_cpu:
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    units = [module for module in model.modules() if isinstance(module, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(plan.reshard_after_forward, recurse=False)


def _state(model, optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


def save_sharded(model, optimizer, path: str | Path) -> None:
    """Every process writes its shards of the model and optimizer states (torch.distributed.checkpoint)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_state(model, optimizer), checkpoint_id=str(path))


def load_sharded(model, optimizer, path: str | Path) -> None:
    """The states `save_sharded` wrote, back into the sharded ``model`` and ``optimizer``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _state(model, optimizer)
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def full_state_dict(model) -> dict[str, Any]:
    """The unsharded state dict, on CPU, on the main process (an empty dict on the others); collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def local_state_bytes(model, optimizer) -> int:
    """Bytes of this process's parameters and optimizer states: its shards under FSDP, everything under DDP."""
    import torch

    def local(tensor):
        return tensor.to_local() if hasattr(tensor, "to_local") else tensor  # a DTensor's own shard

    states = [value for state in optimizer.state.values() for value in state.values() if torch.is_tensor(value)]
    return sum(local(t).numel() * local(t).element_size() for t in [*model.parameters(), *states])
