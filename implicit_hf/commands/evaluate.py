"""``implicit-hf eval``: the model, baselines, output folder, device and task are checked, then
`implicit_hf.eval.harness.run_from_args` sweeps the loop counts."""

from __future__ import annotations

import argparse
from typing import Any

from ..arguments import UsageError
from ..eval.harness import resolve_device, run_from_args
from ..modeling.trajectories import check_select
from .edge import check_model_path, check_output_folder, check_task_fits, task_of


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Check every option that names a path, a device or a task before a model is loaded; then sweep."""
    model = check_model_path(args.model, "--model")
    baselines = [check_model_path(path, "--baseline") for path in args.baseline]
    check_output_folder(args.out, "--out")
    resolve_device(args.device, "--device")
    task, task_kwargs = task_of(model, args.task, args.task_kwargs)
    check_task_fits(model, task, "--model")
    try:  # the rule must suit the task's head (a vote needs classes, a mean continuous outputs)
        check_select(args.select, task.head)
    except ValueError as err:
        raise UsageError(f"--select: {err}") from None
    for baseline in baselines:
        check_task_fits(baseline, task, "--baseline", explicit=True)
    resolved = {"model": model, "baseline": baselines, "task": task, "task_kwargs": task_kwargs}
    return run_from_args(argparse.Namespace(**{**vars(args), **resolved}))
