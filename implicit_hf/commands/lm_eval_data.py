"""``implicit-hf lm-eval-data``: write the data files of the package's lm-eval tasks (``multihop_hops{k}``,
``state_tracking_steps{k}``) and print how to run them."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from ..arguments import LM_EVAL_DATA_TASKS, UsageError
from ..tasks.reasoning.lm_eval_tasks.documents import default_data_dir
from .edge import check_output_folder


def run(args: argparse.Namespace) -> list[Path]:
    """Write the files of ``args.task`` at the counts asked for (default: every shipped task)."""
    option = LM_EVAL_DATA_TASKS[args.task]
    other = [name for name in LM_EVAL_DATA_TASKS.values() if name != option and getattr(args, name) is not None]
    if other:
        raise UsageError(f"--{other[0]} does not apply to {args.task} (its counts are --{option})")
    module = importlib.import_module(f"implicit_hf.tasks.reasoning.{args.task}")
    shipped = getattr(module, f"lm_eval_{option}")()
    counts = shipped if getattr(args, option) is None else getattr(args, option)
    out = args.out or default_data_dir(args.task)
    check_output_folder(out, "--out")
    try:
        paths = module.write_lm_eval_data(out, counts, n=args.n, seed=args.seed, **args.task_kwargs)
    except (TypeError, ValueError) as err:
        raise UsageError(str(err)) from err
    print(f"[lm-eval-data] wrote {len(paths)} files to {out}")
    data = "" if args.out is None else f' --metadata \'{{"data_dir": "{out}"}}\''
    tasks = ",".join(path.stem for path in paths)
    print(
        "run them with: lm_eval --model hf --model_args pretrained=DIR,num_loops=K,trust_remote_code=True "
        f"--include_path {module.LM_EVAL_DIR} --tasks {tasks}{data}"
    )
    return paths
