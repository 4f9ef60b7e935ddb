"""The records of a sweep, built here once for both kinds of sweep (trajectory and generative): one record per
loop count (`loop_record`), the run's summary around them (`sweep_summary`), the plain-number form that
``results.json`` stores (`to_builtin`), and the names and environment the result files carry (`run_name`,
`environment`)."""

from __future__ import annotations

import importlib.metadata as metadata
import platform
from pathlib import Path
from typing import Any

import torch

from ..tasks.base import TaskAdapter


def run_name(model_dir: str | Path) -> str:
    """A checkpoint's name for tables and legends: its training run's folder when it is that run's ``model/``."""
    path = Path(model_dir)
    return (path.parent.name if path.name == "model" and path.parent.name else path.name) or str(path)


def environment(device: torch.device | None = None) -> dict[str, Any]:
    """Versions of the software stack and the machine the evaluation ran on."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "torch_num_threads": torch.get_num_threads(),
        "device": str(device) if device is not None else None,
    }
    for package in ("implicit-hf", "torch", "transformers", "datasets", "evaluate", "numpy", "matplotlib"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = None
    if device is not None and device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def to_builtin(value: Any) -> Any:
    """Numbers as plain floats/ints (numpy and torch scalars included) so results serialise to JSON."""
    if isinstance(value, dict):
        return {str(k): to_builtin(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_builtin(v) for v in value]
    if value is None or isinstance(value, (int, str)):  # bool is an int
        return value
    if hasattr(value, "item"):  # numpy and torch scalars
        try:
            return value.item()
        except (ValueError, TypeError):
            pass
    try:  # a float stays itself
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def scored_metrics(task: TaskAdapter, predictions: list, rows: list[dict]) -> dict[str, Any]:
    """``task.compute_metrics(predictions, rows)`` as plain numbers; it must include the task's quality metric."""
    metrics = to_builtin(task.compute_metrics(predictions, rows))
    if task.quality_metric not in metrics:
        raise KeyError(
            f"task {task.name!r}: compute_metrics returned {sorted(metrics)}, "
            f"without its quality_metric {task.quality_metric!r}"
        )
    return metrics


def loop_record(
    task: TaskAdapter,
    loops: int,
    metrics: dict[str, Any],
    *,
    lipschitz: float | None,
    lipschitz_mean: float | None,
    rel_residual_mean: float | None,
    rel_residual_max: float | None,
    steps_mean: float,
    seconds: float,
    flops: float,
    **extra: Any,
) -> dict[str, Any]:
    """The record of one loop count: ``loops``, ``metrics``, ``quality`` (``metrics[task.quality_metric]``), the
    Lipschitz, residual, steps, time and cost columns (``None`` where the sweep does not measure one), then
    ``extra`` (a kind of sweep's own columns)."""
    return {
        "loops": loops,
        "metrics": metrics,
        "quality": metrics[task.quality_metric],
        "lipschitz": lipschitz,
        "lipschitz_mean": lipschitz_mean,
        "rel_residual_mean": rel_residual_mean,
        "rel_residual_max": rel_residual_max,
        "steps_mean": steps_mean,
        "seconds": seconds,
        "flops": flops,
        **extra,
    }


def sweep_summary(
    model: Any,
    task: TaskAdapter,
    loops: list[int],
    records: list[dict[str, Any]],
    *,
    num_samples: int,
    perturb_eps: float | None,
    seed: int,
    batch_size: int,
    keep_tol: bool,
    seconds_total: float,
    seconds_perturbed_total: float | None,
    seq_len_mean: float | None,
    diverged_fraction: float | None,
    **extra: Any,
) -> dict[str, Any]:
    """What a sweep returns: its settings (``loops``, ``max_loops``, the task's quality metric, the model's
    ``tol`` when kept and ``solver``, ...), its measured totals, ``extra`` (a kind of sweep's own entries) and the
    ``records`` (`loop_record`, one per loop count)."""
    return {
        "loops": loops,
        "max_loops": loops[-1],
        "num_samples": num_samples,
        "quality_metric": task.quality_metric,
        "higher_is_better": bool(task.higher_is_better),
        "tol": getattr(model.config, "tol", None) if keep_tol else None,
        "solver": getattr(model.config, "solver", None),
        "perturb_eps": perturb_eps,
        "seed": seed,
        "batch_size": batch_size,
        "seconds_total": seconds_total,
        "seconds_perturbed_total": seconds_perturbed_total,
        "seq_len_mean": seq_len_mean,
        "diverged_fraction": diverged_fraction,
        **extra,
        "records": records,
    }
