"""Training checkpoints: written so that "the newest complete checkpoint" is a fact, and checked before a resume.

A checkpoint is ``output_dir/checkpoints/step_N``: what ``accelerator.save_state`` writes (model weights,
optimizer, scheduler, gradient scaler and each process's RNG states; with FSDP on CPU processes the
``sharded/`` states instead of the weights and optimizer), every file flushed to disk, then the completion
marker ``trainer_state.json`` (the step, global batch, processes, the recipe keys that shape the model and the
size of every file) written to a temporary name, flushed and renamed into place. A save killed at any point
leaves either no marker (the folder is ignored, and removed by the next resume) or a complete checkpoint; old
checkpoints are pruned only after the marker is in place, their marker first.

``--resume`` checks the newest marked checkpoint before loading it: every file the marker lists is there, at
its size and loadable (safetensors headers against the file length, the pickled states as accelerate loads
them), and the saved weights' names and shapes are those of the model this recipe builds. A damaged one is
skipped with a warning naming the file and what is wrong, for the previous one, and so on; with none left the
resume is refused (`RecipeError`), as is one past the recipe's ``max_steps`` or written with another model,
global batch or sharding. A marker vouches only for a checkpoint that holds what the run's save always writes
(`written_files`), whether it lists those files or not.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import typing
import zipfile
from pathlib import Path
from typing import Any

from accelerate.utils import DistributedType, id_tensor_storage, load
from accelerate.utils.constants import OPTIMIZER_NAME, RNG_STATE_NAME, SAFE_WEIGHTS_NAME, SCALER_NAME, SCHEDULER_NAME
from safetensors import safe_open
from torch.distributed.checkpoint import FileSystemReader

from .distributed import SHARDED_DIR, Sharding
from .recipe import RecipeError, TrainConfig

if typing.TYPE_CHECKING:
    from accelerate import Accelerator

logger = logging.getLogger(__name__)

CHECKPOINT_MARKER = "trainer_state.json"
# the recipe keys that decide the model's parameter names and shapes: named when a resume does not fit
MODEL_KEYS = ("task", "task_module", "task_kwargs", "model", "init_from", "lora")
_PICKLED = (".bin", ".pkl", ".pt")  # accelerate's torch.save files: optimizer, scheduler, sampler, scaler, RNG


class DamagedCheckpoint(ValueError):
    """A marked checkpoint that cannot be resumed; the message names the file and what is wrong with it."""


# ----------------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------------


def model_keys(config: TrainConfig) -> dict[str, Any]:
    """The recipe keys that shape the model, as JSON values (nested settings as mappings)."""
    return {key: value for key, value in dataclasses.asdict(config).items() if key in MODEL_KEYS}


def find_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of the checkpoints with a completion marker, oldest first (not yet checked)."""
    found = []
    for path in (output_dir / "checkpoints").glob("step_*"):
        if (path / CHECKPOINT_MARKER).is_file() and path.name[5:].isdigit():
            found.append((int(path.name[5:]), path))
    return sorted(found)


def save_checkpoint(
    accelerator: Accelerator, config: TrainConfig, step: int, global_batch: int, sharding: Sharding
) -> Path:
    """``accelerator.save_state`` into ``checkpoints/step_N`` (plus, for FSDP on CPU processes, the
    model and optimizer shards: `Sharding.save`), every file flushed, then the marker by an atomic rename, then
    the checkpoints past ``keep_checkpoints`` removed; collective."""
    output_dir = Path(config.output_dir)
    path = output_dir / "checkpoints" / f"step_{step}"
    if accelerator.is_main_process and path.exists():  # what a killed save of this step left: written afresh
        remove_checkpoint(path)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(path))
    sharding.save(path / SHARDED_DIR)
    accelerator.wait_for_everyone()  # every process has written its part (RNG states are per process)
    if accelerator.is_main_process:
        files = sorted(file for file in path.rglob("*") if file.is_file())
        for entry in [*files, *{file.parent for file in files}, path.parent]:
            _fsync(entry)  # the files' contents and the folders' entries are on disk before the marker
        state = {
            "step": step,
            "global_batch": global_batch,
            "num_processes": accelerator.num_processes,
            "recipe": model_keys(config),
            "files": {file.relative_to(path).as_posix(): file.stat().st_size for file in files},
        }
        temporary = path / f"{CHECKPOINT_MARKER}.tmp"
        with temporary.open("w") as handle:
            json.dump(state, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path / CHECKPOINT_MARKER)
        _fsync(path)
        if config.keep_checkpoints:
            for _, old in find_checkpoints(output_dir)[: -config.keep_checkpoints]:
                remove_checkpoint(old)
    accelerator.wait_for_everyone()
    return path


def remove_checkpoint(path: Path) -> None:
    """Delete ``path``, its marker first: a removal cut short leaves an unmarked folder, never a marked part."""
    marker = path / CHECKPOINT_MARKER
    if marker.is_file():
        marker.unlink()
        _fsync(path)
    shutil.rmtree(path)


def _fsync(path: Path) -> None:
    """Flush ``path`` to disk: a file's contents, or a folder's entries."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# ----------------------------------------------------------------------------------------------------
# Resuming
# ----------------------------------------------------------------------------------------------------


def resume_from_checkpoint(
    config: TrainConfig,
    accelerator: Accelerator,
    model: Any,
    sharding: Sharding,
    global_batch: int,
) -> int | None:
    """With ``resume``: load the newest good checkpoint into the prepared ``model`` and the accelerator's
    optimizer, schedule, scaler and RNG states (the model and optimizer shards for FSDP on CPU
    processes) and return its step; None without ``resume``. Damaged checkpoints are skipped with a warning
    (and removed once an older one is loaded: the resumed run writes those steps again); a `RecipeError` when
    none is good, or when the good one is past ``max_steps`` or was written with another model, global batch or
    sharding."""
    if not config.resume:
        return None
    output_dir = Path(config.output_dir)
    problems = []
    for step, path in reversed(find_checkpoints(output_dir)):
        try:  # the files of the checkpoint's own layout: one of another sharding is refused by check_resumable
            saved = read_checkpoint(path, step, written_files(accelerator, (path / SHARDED_DIR).is_dir()))
            break
        except DamagedCheckpoint as err:
            problems.append(f"{path.name}: {err}")
            if accelerator.is_main_process:
                logger.warning(f"--resume: skipping the damaged checkpoint {str(path)!r}: {err}")
    else:
        raise RecipeError(
            f"--resume: no checkpoint in {str(output_dir / 'checkpoints')!r} can be resumed "
            f"({'; '.join(problems) or f'none has its completion marker {CHECKPOINT_MARKER}'}): start afresh with "
            "--overwrite_output_dir true, or choose another output_dir"
        )
    check_resumable(path, saved, config, model, sharding.on_cpu, global_batch)
    accelerator.load_state(str(path))
    sharding.load(path / SHARDED_DIR)
    accelerator.wait_for_everyone()  # every process has loaded before any folder goes
    if accelerator.is_main_process:  # a save the killed run was still writing, and the damaged ones skipped
        for stale in (output_dir / "checkpoints").glob("step_*"):
            later = stale.name[5:].isdigit() and int(stale.name[5:]) > step
            if later or not (stale / CHECKPOINT_MARKER).is_file():
                remove_checkpoint(stale)
    accelerator.wait_for_everyone()
    accelerator.print(f"resumed from {path} (step {step})")
    return step


def written_files(accelerator: Accelerator, sharded: bool) -> tuple[str, ...]:
    """The files ``accelerator.save_state`` (and `Sharding.save`) always write into a checkpoint of this run's
    accelerator: the model weights and optimizer (or, ``sharded`` for FSDP on CPU processes, the sharded states'
    index), the schedule, the gradient scaler (fp16) and every process's RNG states. A marker that does not list
    one of them does not vouch for the checkpoint (accelerate would load the RNG states of a missing file silently
    as none). Under accelerate's FSDP or DeepSpeed the weights and optimizer are in their own layouts: not
    required here."""
    names = [f"{RNG_STATE_NAME}_{index}.pkl" for index in range(accelerator.num_processes)]
    if sharded:
        names.append(f"{SHARDED_DIR}/.metadata")
    elif accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        names += [SAFE_WEIGHTS_NAME, f"{OPTIMIZER_NAME}.bin"]
    if accelerator.distributed_type != DistributedType.DEEPSPEED:  # DeepSpeed keeps its own schedule
        names.append(f"{SCHEDULER_NAME}.bin")
    if accelerator.scaler is not None:
        names.append(SCALER_NAME)
    return tuple(sorted(names))


def read_checkpoint(path: Path, step: int, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """The marker of the checkpoint of ``step`` at ``path``, once every file it lists and every ``required`` one
    (`written_files`: what the run's save always writes, listed or not) is there, at its size where listed, and
    loads; raises `DamagedCheckpoint` naming the file. A marker written before the list of files was recorded
    (no ``files``) vouches for the files present, once the required ones are among them."""
    try:
        saved = json.loads((path / CHECKPOINT_MARKER).read_text())
    except (OSError, ValueError) as err:  # unreadable, not UTF-8, not JSON
        raise DamagedCheckpoint(f"{CHECKPOINT_MARKER}: not readable JSON ({_first_line(err)})") from None
    if not isinstance(saved, dict) or any(not _is_int(saved.get(key)) for key in ("step", "global_batch")):
        raise DamagedCheckpoint(f"{CHECKPOINT_MARKER}: not a mapping with integer 'step' and 'global_batch'")
    if saved["step"] != step:
        raise DamagedCheckpoint(f"{CHECKPOINT_MARKER}: written for step {saved['step']}, in the folder of {step}")
    files = saved.get("files")
    if files is None:
        files = {file.relative_to(path).as_posix(): None for file in path.rglob("*") if file.is_file()}
        files.pop(CHECKPOINT_MARKER)
    elif not isinstance(files, dict) or not all(map(_is_int, files.values())):
        raise DamagedCheckpoint(f"{CHECKPOINT_MARKER}: 'files' is not a mapping of file names to sizes")
    for name in required:
        files.setdefault(name, None)  # not listed: its size unknown, its presence and contents checked
    for name, size in files.items():
        check_file(path / name, name, size)
    return saved


def check_file(file: Path, name: str, size: int | None) -> None:
    """Raise `DamagedCheckpoint` unless ``file`` is there, ``size`` bytes long (when known) and loads as its kind
    does: a safetensors header that fits the file, a pickled state accelerate loads, a sharded-state index."""
    if not file.is_file():
        raise DamagedCheckpoint(f"{name}: missing")
    actual = file.stat().st_size
    if size is not None and actual != size:
        raise DamagedCheckpoint(f"{name}: {actual} bytes, {size} were written")
    if actual == 0:
        raise DamagedCheckpoint(f"{name}: empty")
    try:
        if file.suffix == ".safetensors":
            with safe_open(file, framework="pt"):  # the header, and the data it describes against the length
                pass
        elif file.suffix in _PICKLED:
            zipfile.ZipFile(file).close()  # torch.save writes a zip archive: its directory is at the end
            load(file, map_location="cpu", mmap=True)  # as accelerate's load_state does, the tensors mapped
        elif file.name == ".metadata":  # torch.distributed.checkpoint's index of the shards
            FileSystemReader(file.parent).read_metadata()
    except Exception as err:  # whatever the reader raises: the file is damaged
        raise DamagedCheckpoint(f"{name}: not loadable ({_first_line(err)})") from None


def check_resumable(
    path: Path, saved: dict[str, Any], config: TrainConfig, model: Any, sharded: bool, global_batch: int
) -> None:
    """Raise `RecipeError` when the checked checkpoint at ``path`` (its marker ``saved``) is past ``max_steps`` or
    was written with another global batch, sharding or model than this run's.

    A checkpoint past ``max_steps`` is refused: resuming it would end the run with a model of more steps than
    ``max_steps`` says, and resuming an older one instead would delete the later checkpoints (a resume removes
    those it does not continue from)."""
    if saved["step"] > config.max_steps:
        raise RecipeError(
            f"cannot resume {str(path)!r}: it is at step {saved['step']}, past max_steps {config.max_steps}: raise "
            f"max_steps to at least {saved['step']} to continue that run, or train afresh in another output_dir"
        )
    if saved["global_batch"] != global_batch:
        raise RecipeError(
            f"cannot resume {str(path)!r}: it was trained with a global batch of {saved['global_batch']}, "
            f"this run has {global_batch} (per_device_batch_size x gradient_accumulation_steps x processes)"
        )
    if (path / SHARDED_DIR).is_dir() != sharded:
        fsdp, other = "with FSDP on CPU processes (sharded)", "without it"
        written, now = (other, fsdp) if sharded else (fsdp, other)
        raise RecipeError(
            f"cannot resume {str(path)!r}: it was written {written}, this run is {now}: resume with the "
            "accelerate config and processes that wrote it"
        )
    shapes = saved_shapes(path)
    differences = [] if shapes is None else shape_differences(shapes, model.state_dict())
    if differences:
        before = _flat(saved.get("recipe", {}))
        now = _flat(model_keys(config))
        keys = sorted(before.keys() | now.keys()) if before else []  # a marker older than the recipe record: none
        changed = [f"{key} {before.get(key)!r} -> {now.get(key)!r}" for key in keys if before.get(key) != now.get(key)]
        since = f"; recipe keys changed since it was written: {', '.join(changed)}" if changed else ""
        more = f" (and {len(differences) - 1} more)" if len(differences) > 1 else ""
        raise RecipeError(
            f"cannot resume {str(path)!r}: its weights do not fit the model this recipe builds: "
            f"{differences[0]}{more}{since}; resume with the recipe that wrote it, or train afresh in another "
            "output_dir"
        )


def saved_shapes(path: Path) -> dict[str, tuple[int, ...]] | None:
    """The names and shapes of the model weights in the checkpoint at ``path``: accelerate's safetensors file,
    or the model entries of the sharded states; None for another layout (accelerate's FSDP, DeepSpeed)."""
    if (path / SAFE_WEIGHTS_NAME).is_file():
        with safe_open(path / SAFE_WEIGHTS_NAME, framework="pt") as weights:
            return {name: tuple(weights.get_slice(name).get_shape()) for name in weights.keys()}  # noqa: SIM118
    if (path / SHARDED_DIR / ".metadata").is_file():
        entries = FileSystemReader(path / SHARDED_DIR).read_metadata().state_dict_metadata
        return {
            name.removeprefix("model."): tuple(entry.size)
            for name, entry in entries.items()
            if name.startswith("model.") and hasattr(entry, "size")  # tensors (not pickled objects) of the model
        }
    return None


def shape_differences(saved: dict[str, tuple[int, ...]], state_dict: dict[str, Any]) -> list[str]:
    """How the ``saved`` names and shapes differ from the model's ``state_dict``: a tensor of another shape, one
    the model lacks, one of the model not saved (unless it shares its storage with a saved one: tied weights)."""
    differences = []
    for name, shape in saved.items():
        if name not in state_dict:
            differences.append(f"{name!r} {list(shape)} is saved, the model has no such tensor")
        elif tuple(state_dict[name].shape) != shape:
            differences.append(f"{name!r} is {list(shape)} saved, {list(state_dict[name].shape)} in the model")
    unsaved = [name for name in state_dict if name not in saved]
    if unsaved:
        stored = {_storage(state_dict[name]) for name in saved if name in state_dict}
        differences += [
            f"{name!r} {list(state_dict[name].shape)} of the model is not saved"
            for name in unsaved
            if _storage(state_dict[name]) not in stored
        ]
    return differences


def _storage(tensor: Any) -> tuple:
    """Which storage ``tensor`` (a DTensor: its local shard) views: tied weights share one."""
    return id_tensor_storage(tensor.to_local() if hasattr(tensor, "to_local") else tensor)


def _flat(recipe: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"hidden_size": 32}}`` -> ``{"model.hidden_size": 32}``."""
    flat = {}
    for key, value in recipe.items():
        if isinstance(value, dict) and value:
            flat |= _flat(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _first_line(err: Exception) -> str:
    """The first sentence of an error's message, with its type: what a one-line report needs."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text.split('. ')[0]}" if text else type(err).__name__
