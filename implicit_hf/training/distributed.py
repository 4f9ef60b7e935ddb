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
* Checkpoints of such a run are sharded (`Sharding.save`/`Sharding.load`: torch.distributed.checkpoint,
  every process writes its own shards of the model and optimizer); the final ``model/`` is gathered into
  one ordinary checkpoint (`Sharding.final_model`).

`Sharding` holds that difference, so the training loop calls the same methods on every launch.

With a GPU, accelerate itself runs the FSDP and DeepSpeed plugins and nothing here changes them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from accelerate import Accelerator
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard

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


def plan_launch(accelerator: Accelerator, mixed_precision: str) -> LaunchPlan:
    """Compare the launcher's request (the environment) with ``accelerator``'s state; raise `LaunchError` on a
    mismatch."""
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
    same = "FSDP on CPU processes needs the same number of loop iterations on every process: "
    refusals = [
        (
            schedule is not None and schedule.needs_difficulty,
            same + "the above_difficulty loop schedule draws each process's count above its own batch; use another "
            "schedule, or DDP",
        ),
        (
            config.tol is not None,
            same + f"model.tol ({config.tol}) halts each process's batch at its own count; train with tol: null "
            "under FSDP, or with DDP",
        ),
        (
            config.gradient == "ift",
            "FSDP on CPU processes cannot run gradient: ift (its backward solve halts at a per-process count); "
            "use unroll, truncated, jfb or phantom",
        ),
    ]
    reasons = [reason for refused, reason in refusals if refused]
    if reasons:
        raise LaunchError(reasons[0])


class Sharding:
    """The one place the training loop meets the difference between accelerate's ``prepare`` (replicated, or
    accelerate's own FSDP and DeepSpeed) and FSDP2 on CPU processes done here: the loop calls every method
    the same way on every launch.

    `shard` shards the fresh model (FSDP on CPU only), `prepare` hands accelerate what it should wrap and keeps
    the model and optimizer, `save`/`load` write and read the sharded states of a checkpoint (nothing
    otherwise: ``accelerator.save_state`` holds the rest), `gathered` unshards for inference, `final_model`
    gives the model to save."""

    def __init__(self, accelerator: Accelerator, plan: LaunchPlan) -> None:
        self.accelerator, self.plan = accelerator, plan
        self.model: Any = None
        self.optimizer: Any = None

    @classmethod
    def for_run(cls, accelerator: Accelerator, mixed_precision: str, model_config: Any, schedule: Any) -> Sharding:
        """The launcher's request checked against ``accelerator`` (`plan_launch`) and, under FSDP on CPU
        processes, against the model's and schedule's iteration counts; a `LaunchError` ends the accelerator."""
        try:
            plan = plan_launch(accelerator, mixed_precision)
            if plan.shard_on_cpu:
                check_fixed_iterations(model_config, schedule)
        except LaunchError:
            accelerator.end_training()
            raise
        return cls(accelerator, plan)

    @property
    def on_cpu(self) -> bool:
        """Whether the model is sharded here (FSDP2 on CPU processes), its checkpoints holding `SHARDED_DIR`."""
        return self.plan.shard_on_cpu

    @property
    def name(self) -> str | None:
        """How the run shards the model: "fsdp2" (accelerate's, or fully_shard here), "deepspeed" or None."""
        if self.on_cpu or self.accelerator.distributed_type == DistributedType.FSDP:
            return "fsdp2"
        return "deepspeed" if self.accelerator.distributed_type == DistributedType.DEEPSPEED else None

    def shard(self, model: torch.nn.Module) -> torch.nn.Module:
        """Under FSDP on CPU processes, ``fully_shard`` every layer of the wrap classes, then the root module (in
        place; before the optimizer is built on its parameters). Otherwise ``model``."""
        if not self.on_cpu:
            return model
        layers = [module for module in model.modules() if type(module).__name__ in self.plan.wrap_classes]
        if not layers:
            raise LaunchError(f"FSDP: the model has no layer of the classes to wrap {list(self.plan.wrap_classes)}")
        for layer in [*layers, model]:
            fully_shard(layer, reshard_after_forward=self.plan.reshard_after_forward)
        return model

    def prepare(self, model: Any, optimizer: Any, loader: Any, scheduler: Any) -> tuple[Any, Any, Any, Any]:
        """``accelerator.prepare`` of all four, or, for a model sharded here, of the loader and scheduler only
        (accelerate would wrap the model in DDP)."""
        if self.on_cpu:
            loader, scheduler = self.accelerator.prepare(loader, scheduler)
        else:
            model, optimizer, loader, scheduler = self.accelerator.prepare(model, optimizer, loader, scheduler)
        self.model, self.optimizer = model, optimizer
        return model, optimizer, loader, scheduler

    def _states(self) -> dict[str, Any]:
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optimizer": optimizer_state}

    def save(self, path: str | Path) -> None:
        """Under FSDP on CPU processes, every process writes its shards of the model and optimizer states
        (torch.distributed.checkpoint) into ``path``; collective. Otherwise nothing."""
        if self.on_cpu:
            dcp.save(self._states(), checkpoint_id=str(path))

    def load(self, path: str | Path) -> None:
        """The states `save` wrote, back into the sharded model and optimizer. Otherwise nothing."""
        if self.on_cpu:
            state = self._states()
            dcp.load(state, checkpoint_id=str(path))
            set_state_dict(
                self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
            )

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """Under FSDP on CPU processes, every FSDP unit all-gathered for the block, so that inference (whose
        halting may stop processes at different iteration counts) runs without collectives; sharded again after.
        Otherwise nothing."""
        units = [module for module in self.model.modules() if isinstance(module, FSDPModule)] if self.on_cpu else []
        for unit in units:
            unit.set_reshard_after_forward(False, recurse=False)
            unit.unshard()
        try:
            yield
        finally:
            for unit in units:
                unit.reshard()
                unit.set_reshard_after_forward(self.plan.reshard_after_forward, recurse=False)

    def final_model(self, rebuild: Callable[[], Any], lora: bool) -> tuple[Any, dict | None]:
        """The trained model to save, unwrapped, and its state dict (None: the model's own); collective. Under FSDP
        on CPU processes the shards are gathered into an unsharded copy (``rebuild()``) on the main process (None
        elsewhere); under accelerate's FSDP, ``accelerator.get_state_dict`` gathers them (not with LoRA adapters,
        which peft saves from the model)."""
        if self.on_cpu:
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            state = get_model_state_dict(self.model, options=options)  # on the main process; {} elsewhere
            if not self.accelerator.is_main_process:
                return None, None
            unsharded = rebuild()
            unsharded.load_state_dict(state)
            return unsharded, None
        state_dict = None if lora else self.accelerator.get_state_dict(self.model)
        return self.accelerator.unwrap_model(self.model), state_dict

    def state_bytes(self) -> int:
        """The largest process's bytes of parameters and optimizer states (its shards under FSDP); collective."""

        def local(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.to_local() if hasattr(tensor, "to_local") else tensor  # a DTensor's own shard

        states = [v for state in self.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
        mine = sum(local(t).numel() * local(t).element_size() for t in [*self.model.parameters(), *states])
        return int(self.accelerator.gather(torch.tensor([mine], device=self.accelerator.device)).max())
