"""``implicit-hf lm-eval``: the task list, model, include path, output folder and device are checked, then
`implicit_hf.eval.lm_eval_bridge.run_from_args` runs lm-evaluation-harness at every loop count."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from typing import Any

from ..arguments import UsageError

# lm_eval_bridge imports lm-evaluation-harness, an optional extra: without it this command is refused on one line
# (`implicit_hf.cli.main` reports the UsageError raised while the command module loads)
if importlib.util.find_spec("lm_eval") is None:
    raise UsageError("lm-eval needs lm-evaluation-harness: pip install 'implicit-hf[lm-eval]'")

from ..eval import lm_eval_bridge  # noqa: E402
from ..eval.harness import resolve_device
from ..tasks.models import HEADS
from . import edge


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Check the options before anything is loaded; then run the sweep."""
    if not any(task.strip() for task in args.tasks.split(",")):
        raise UsageError(
            f"--tasks {args.tasks!r} names no task: give comma-separated lm-evaluation-harness task names "
            "(arc_easy,hellaswag)"
        )
    model = edge.check_model_path(args.model, "--model")
    if args.include_path is not None and not Path(args.include_path).is_dir():
        raise UsageError(f"--include-path {args.include_path!r} is not a folder")
    edge.check_output_folder(args.out, "--out")
    resolve_device(args.device, "--device")
    saved = edge.saved_config(model, "--model")
    if saved.get("model_type") != "implicit" or HEADS["causal_lm"].model_class not in (
        saved.get("architectures") or []
    ):
        raise UsageError(
            f"--model {model!r} is not an implicit causal LM (model_type {saved.get('model_type')!r}, "
            f"architectures {saved.get('architectures')})"
        )
    return lm_eval_bridge.run_from_args(argparse.Namespace(**{**vars(args), "model": model}))
