"""Helpers shared by the benchmark scripts: import path, devices, environment record, saved-tensor meter."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # allow running as a plain script from a checkout
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import transformers  # noqa: E402


def resolve_device(name: str) -> torch.device:
    """``cpu`` or ``cuda`` (refused with a clear message when no GPU is visible)."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for but torch.cuda.is_available() is False")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device must be cpu or cuda, got {name!r}")
    return device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def timed(fn, device: torch.device) -> tuple[float, object]:
    """Wall seconds of ``fn()`` (synchronised around it on a GPU) and its result."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def environment(device: torch.device) -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "device": str(device),
        "torch_num_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def measured_commit() -> dict:
    """The commit checked out and whether the code was clean: no change to a tracked file outside the measurements
    (``benchmarks/results/``, ``results/``), which benchmark runs write one after another."""

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True).stdout.strip()

    changes = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results", ":!results")
    return {"commit": git("rev-parse", "HEAD"), "clean": not changes}


_AT_START = measured_commit()  # a run measures the code it started with


def write_report(report: dict, out: str | Path) -> Path:
    """``report`` as JSON at ``out``, with the commit it measured and whether the code was clean from the start of
    the run to its end (a figure is true only for its commit)."""
    now = measured_commit()
    clean = _AT_START["clean"] and now["clean"] and now["commit"] == _AT_START["commit"]
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**report, "commit": _AT_START["commit"], "clean": clean}, indent=2) + "\n")
    return path


class SavedTensorMeter:
    """Counts the distinct storages autograd saves for backward inside the ``with`` block.

    Storages are deduplicated by data pointer; storages in ``exclude`` (e.g. the parameters, which
    are resident anyway) are left out. ``bytes`` is then the memory the autograd graph holds on to
    for the backward pass, independent of allocator caching.
    """

    def __init__(self, exclude: set[int] | None = None):
        self.exclude = exclude or set()
        self.storages: dict[int, int] = {}
        self._context = None

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer not in self.exclude:
            self.storages[pointer] = storage.nbytes()
        return tensor

    def __enter__(self) -> SavedTensorMeter:
        self._context = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        self._context.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._context.__exit__(*exc)

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())

    @property
    def count(self) -> int:
        return len(self.storages)


def parameter_storages(model: torch.nn.Module) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in model.parameters()}


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])
