"""``implicit-hf`` command line: ``train``, ``eval``, ``lm-eval``, ``lm-eval-data``, ``convert`` and the end-to-end
``demo``.

The command line is parsed before anything heavy is imported: ``implicit-hf --help`` and every
``implicit-hf COMMAND --help`` import neither torch nor transformers. Options may be spelt with dashes or
underscores (``--max-steps`` or ``--max_steps``), in every command.

User errors are reported on one line, ``implicit-hf COMMAND: error: MESSAGE``, with exit status 2 and no
traceback (set ``IMPLICIT_HF_TRACEBACK=1`` to see one): a `UsageError` (a path, an option value, a task that
does not fit the model, found at the edge of a command), a `RecipeError` (an invalid recipe), a
`TaskSettingError` (a task setting the task refuses) and an ``OSError`` (a file or folder that cannot be read
or written: a missing corpus, a truncated checkpoint, a folder without a tokenizer). Anything else is a bug and
shows its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

from .arguments import (
    OptionParser,
    UsageError,
    add_convert_arguments,
    add_demo_arguments,
    add_eval_arguments,
    add_lm_eval_arguments,
    add_lm_eval_data_arguments,
)
from .checks import TaskSettingError
from .local_paths import check_writable_folder, looks_local

DEMO_LOOPS = "1,2,4,8,16,32"
TRACEBACK_ENV = "IMPLICIT_HF_TRACEBACK"


def build_parser() -> argparse.ArgumentParser:
    """The ``implicit-hf`` parser with every subcommand (imports nothing heavy)."""
    parser = OptionParser(
        prog="implicit-hf",
        description="Train, evaluate and convert implicit (looped, weight-tied) transformers.",
        epilog="Options may be spelt with dashes or underscores (--max-steps, --max_steps). "
        "Run implicit-hf COMMAND --help for a command's options.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=OptionParser)
    commands.add_parser(
        "train",
        add_help=False,
        help="train on a task: implicit-hf train RECIPE.yaml [--key value ...] [--resume] (--help: every recipe key)",
    )
    add_eval_arguments(
        commands.add_parser(
            "eval",
            help="score a trained model at many loop counts; write results and plots",
            description="Score an implicit model at many loop counts from one trajectory run.",
        )
    )
    add_lm_eval_arguments(
        commands.add_parser("lm-eval", help="run lm-evaluation-harness tasks at several loop counts; write plots")
    )
    add_lm_eval_data_arguments(
        commands.add_parser("lm-eval-data", help="write the data files of the lm-eval tasks this package ships")
    )
    add_convert_arguments(
        commands.add_parser("convert", help="turn a pretrained Llama-family checkpoint into an implicit one")
    )
    add_demo_arguments(commands.add_parser("demo", help="end to end: train a small LP model, sweep loops, write plots"))
    return parser


# --------------------------------------------------------------------------------------------------
# Checks at the edge: paths, devices, tasks against models


def check_model_path(value: str | Path, option: str, needs_config: bool = True) -> str:
    """``value`` as given if it is a checkpoint folder (with ``config.json`` when ``needs_config``) or could be a
    hub id; else a `UsageError` naming ``option`` and the path."""
    spec = str(value)
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"{option} {spec!r} is a file; expected a checkpoint folder")
        if needs_config and not (path / "config.json").is_file():
            raise UsageError(f"{option} {spec!r} is not a checkpoint folder: it has no config.json")
        return str(path)
    if looks_local(spec):
        raise UsageError(f"{option} {spec!r} does not exist")
    return spec  # a hub id: transformers looks it up (an OSError, reported on one line, if it cannot)


def check_output_folder(value: str | Path, option: str) -> None:
    """``value`` must be a folder this process can write, checked before any work is done (so that a run is not
    lost when it writes its results): a file there, a path under a file or a place that cannot be written is a
    `UsageError` naming ``option`` and the path. The folders it creates to find out are removed again."""
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {str(value)!r} is a file; expected a folder to write to")
    try:
        check_writable_folder(path, keep=False)
    except OSError as err:
        raise UsageError(f"{option} {str(value)!r} cannot be written: {err.strerror or err}") from None


def _saved_config(model: str, option: str) -> dict[str, Any]:
    """The ``config.json`` of the checkpoint folder (or hub id) ``model`` given as ``option``, as a dict; a
    `UsageError` naming the option and the file when it is not a JSON object."""
    path = Path(model) / "config.json"
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
        except ValueError as err:  # not JSON, not UTF-8
            raise UsageError(f"{option} {model!r}: {str(path)!r} is not valid JSON: {err}") from err
        if not isinstance(saved, dict):
            raise UsageError(
                f"{option} {model!r}: {str(path)!r} is not a model config (a JSON object of config fields); got "
                f"{json.dumps(saved)[:40]}"
            )
        return saved
    from transformers import PretrainedConfig

    return PretrainedConfig.get_config_dict(model)[0]


def check_task_fits(model: str, task: Any, option: str = "--model", explicit: bool = False) -> None:
    """The checkpoint ``model`` must be an implicit model with the head and input sizes ``task`` needs; with
    ``explicit`` (a baseline) a plain transformers causal LM (``...ForCausalLM``) also fits a causal-LM task
    whose vocabulary it covers: it is scored with one forward pass (`implicit_hf.tasks.models.check_fits` for an
    implicit one)."""
    from .tasks.models import check_fits

    saved = _saved_config(model, option)
    model_type = saved.get("model_type")
    architectures = saved.get("architectures") or []
    if model_type != "implicit" and explicit and task.head == "causal_lm":
        if not any(name.endswith("ForCausalLM") for name in architectures):
            raise UsageError(
                f"{option} {model!r} is neither an implicit checkpoint nor a causal LM (architectures {architectures})"
            )
        needs = task.model_config().get("vocab_size", 0)
        if saved.get("vocab_size", 0) < needs:
            raise UsageError(
                f"task {task.name!r} does not fit {option} {model!r}: vocab_size: task needs >= {needs}, "
                f"checkpoint has {saved.get('vocab_size')}"
            )
        return
    if model_type != "implicit":
        raise UsageError(
            f"{option} {model!r} is not an implicit checkpoint (config.json model_type {model_type!r}); "
            "turn a Llama-family model into one with implicit-hf convert"
        )
    problems = check_fits(task, saved)
    if problems:
        raise UsageError(f"task {task.name!r} does not fit {option} {model!r}: {'; '.join(problems)}")


def check_device(device: str | None, option: str = "--device") -> None:
    """``device`` must be ``auto`` or a torch device that this machine has."""
    if device in (None, "auto"):
        return
    import torch

    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise UsageError(f"{option} {device!r} is not a torch device: {err}") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{option} {device!r}: torch.cuda.is_available() is False on this machine")


def _task_of(model: str, task_name: str | None, task_kwargs: dict[str, Any] | None):
    from .tasks.models import task_for_model

    try:
        return task_for_model(model, task_name, task_kwargs)
    except (UsageError, TaskSettingError):  # a refused setting names the task and the setting itself
        raise
    except (TypeError, ValueError, ImportError) as err:  # an unknown task, refused arguments, a missing module
        where = f"--task {task_name!r}" if task_name else f"the task recorded with --model {model!r}"
        raise UsageError(f"{where}: {err}") from err


# --------------------------------------------------------------------------------------------------
# The commands


def demo_recipe() -> Path:
    """The small LP recipe the demo trains (shipped inside the package)."""
    return Path(str(resources.files("implicit_hf") / "recipes" / "lp_demo.yaml"))


def demo(out: Path, max_steps: int | None = None) -> dict:
    """Train a small implicit model on linear programs, sweep loop counts, write results and plots."""
    from .eval.harness import run_eval
    from .training.loop import train
    from .training.recipe import parse_args

    started = time.perf_counter()
    overrides = ["--output_dir", str(out / "train"), "--overwrite_output_dir", "true"]
    if max_steps is not None:
        overrides += ["--max_steps", str(max_steps)]
    config = parse_args([str(demo_recipe()), *overrides])
    print(f"[demo] training {config.task!r} for {config.max_steps} steps -> {out / 'train'}")
    train(config)
    model_dir = out / "train" / "model"
    print(f"[demo] sweeping loops {DEMO_LOOPS} on held-out LPs")
    results = run_eval(model_dir, config.task, DEMO_LOOPS, out / "eval", n=200, seed=1, batch_size=100)
    print(
        "[demo] 200 held-out LPs; relative error ||x - x*|| / (||x*|| + 1) of the predicted solution "
        "(lower is better); Lipschitz: ||output change|| / ||input change|| for a small input perturbation, "
        "max and mean over samples; rel. residual: ||f(z) - z|| / ||f(z)|| at the last iteration (0 at a fixed point)"
    )
    print(f"{'loops':>5} {'relative error':>15} {'Lipschitz max':>14} {'mean':>8} {'rel. residual':>14}")
    for record in results["records"]:
        print(
            f"{record['loops']:>5} {record['quality']:>15.4f} {record['lipschitz']:>14.3g} "
            f"{record['lipschitz_mean']:>8.3g} {record['rel_residual_mean']:>14.3e}"
        )
    print(f"[demo] reference: predicting x = 0 has relative error {_zero_prediction_error(config):.4f}")
    print(f"[demo] took {time.perf_counter() - started:.0f} s")
    plots = sorted((out / "eval").glob("*.png"))
    print("[demo] results: " + str(out / "eval" / "results.json"))
    print("[demo] plots:\n  " + "\n  ".join(str(p) for p in plots))
    return results


def _zero_prediction_error(config) -> float:
    """The demo's reference: the relative error of predicting all zeros on the same held-out LPs."""
    import numpy as np

    from .tasks.base import get_task

    task = get_task(config.task, **config.task_kwargs)
    rows = task.build_dataset("test", 200, 1).to_list()
    zeros = [np.zeros(len(row["solution"])) for row in rows]
    return task.compute_metrics(zeros, rows)[task.quality_metric]


def train_command(rest: list[str]) -> Any:
    """``implicit-hf train RECIPE.yaml [--key value ...] [--resume]`` (recipe errors: `RecipeError`)."""
    from .training.loop import train
    from .training.recipe import parse_args

    return train(parse_args(rest))


def eval_command(args: argparse.Namespace) -> dict[str, Any]:
    """``implicit-hf eval``: the model, baselines, task and device are checked before anything runs."""
    model = check_model_path(args.model, "--model")
    baselines = [check_model_path(path, "--baseline") for path in args.baseline]
    check_output_folder(args.out, "--out")
    check_device(args.device)
    if args.task is None and not Path(model).is_dir():
        raise UsageError(f"--model {model!r} is not a local folder: pass --task to evaluate a model from the hub")
    if args.task is None and not (Path(model) / "implicit_task.json").is_file():
        raise UsageError(
            f"--model {model!r} records no task (implicit_task.json, written by implicit-hf train): "
            "pass the task name with --task"
        )
    task, task_kwargs = _task_of(model, args.task, args.task_kwargs)
    check_task_fits(model, task, "--model")
    for baseline in baselines:
        check_task_fits(baseline, task, "--baseline", explicit=True)
    from .eval.harness import run_from_args

    resolved = {"model": model, "baseline": baselines, "task": task, "task_kwargs": task_kwargs}
    checked = argparse.Namespace(**{**vars(args), **resolved})
    return run_from_args(checked)


def lm_eval_command(args: argparse.Namespace) -> dict[str, Any]:
    """``implicit-hf lm-eval``: the task list, model, include path, output folder and device are checked before
    anything is loaded."""
    import importlib.util

    from .tasks.models import HEADS

    if not any(task.strip() for task in args.tasks.split(",")):
        raise UsageError(
            f"--tasks {args.tasks!r} names no task: give comma-separated lm-evaluation-harness task names "
            "(arc_easy,hellaswag)"
        )
    model = check_model_path(args.model, "--model")
    if args.include_path is not None and not Path(args.include_path).is_dir():
        raise UsageError(f"--include-path {args.include_path!r} is not a folder")
    check_output_folder(args.out, "--out")
    check_device(args.device)
    saved = _saved_config(model, "--model")
    if saved.get("model_type") != "implicit" or HEADS["causal_lm"].model_class not in (
        saved.get("architectures") or []
    ):
        raise UsageError(
            f"--model {model!r} is not an implicit causal LM (model_type {saved.get('model_type')!r}, "
            f"architectures {saved.get('architectures')})"
        )
    if importlib.util.find_spec("lm_eval") is None:
        raise UsageError("lm-eval needs lm-evaluation-harness: pip install 'implicit-hf[lm-eval]'")
    from .eval import lm_eval_bridge

    return lm_eval_bridge.run_from_args(argparse.Namespace(**{**vars(args), "model": model}))


def lm_eval_data(args: argparse.Namespace) -> list[Path]:
    """Write the data files of the package's lm-eval tasks (``multihop_hops{k}``, ``state_tracking_steps{k}``) and
    print how to run them."""
    import importlib

    from .arguments import LM_EVAL_DATA_TASKS
    from .tasks.reasoning.lm_eval_tasks.documents import default_data_dir

    option = LM_EVAL_DATA_TASKS[args.task]
    other = [name for name in LM_EVAL_DATA_TASKS.values() if name != option and getattr(args, name) is not None]
    if other:
        raise UsageError(f"--{other[0]} does not apply to {args.task} (its counts are --{option})")
    module = importlib.import_module(f".tasks.reasoning.{args.task}", __package__)
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


def convert(args: argparse.Namespace) -> None:
    """``implicit-hf convert``: the source path, its model type and the layer split are checked before any
    weight is read."""
    source = check_model_path(args.source, "source", needs_config=args.gguf_file is None)
    if args.gguf_file is not None and Path(source).is_dir() and not (Path(source) / args.gguf_file).is_file():
        raise UsageError(f"--gguf-file {args.gguf_file!r} is not a file in {source!r}")
    check_output_folder(args.output, "output")
    from .modeling.convert import SUPPORTED_MODEL_TYPES, convert_checkpoint, parse_layers

    if args.gguf_file is None and (Path(source) / "config.json").is_file():
        model_type = _saved_config(source, "source").get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UsageError(
                f"source {source!r} is a {model_type!r} model (config.json model_type); convert takes "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
    layers = {}
    for part in ("prelude", "core", "coda"):
        try:
            layers[part] = None if getattr(args, part) is None else parse_layers(getattr(args, part))
        except ValueError as err:
            raise UsageError(f"--{part}: {err}") from err
    try:
        model = convert_checkpoint(
            source,
            args.output,
            layers["prelude"],
            layers["core"],
            layers["coda"],
            gguf_file=args.gguf_file,
            keep_all_layers=args.no_drop,
            injection=args.injection,
            num_loops=args.num_loops,
            core_norm=args.core_norm,
            state_weight=args.state_weight,
            loop_shift=args.loop_shift,
        )
    except ValueError as err:  # the layer split does not fit the source, conflicting loop settings, ...
        raise UsageError(str(err)) from err
    conversion = model.config.conversion
    print(
        f"[convert] {conversion['source']} ({conversion['source_model_type']}, {conversion['source_num_layers']} "
        f"layers) -> {args.output}: prelude {conversion['prelude_layers']}, core {conversion['core_layers']}, "
        f"coda {conversion['coda_layers']}, dropped {conversion['dropped_layers']}"
    )


def _one_line(err: BaseException) -> str:
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__


def main(argv: list[str] | None = None) -> None:
    """Parse ``argv``, then import and run the command; user errors exit with status 2 and a one-line message."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    command = args.command
    if rest and command != "train":
        subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        subparsers.choices[command].error(f"unrecognized arguments: {' '.join(rest)}")
    if command == "train" and (not rest or rest[0] in ("-h", "--help")):
        from .training.recipe import usage

        print(usage("implicit-hf train"))
        raise SystemExit(0 if rest else 2)
    from .training.recipe import RecipeError

    try:
        if command == "train":
            train_command(rest)
        elif command == "eval":
            eval_command(args)
        elif command == "lm-eval":
            lm_eval_command(args)
        elif command == "lm-eval-data":
            lm_eval_data(args)
        elif command == "convert":
            convert(args)
        elif command == "demo":
            check_output_folder(args.out, "--out")
            demo(args.out, args.max_steps)
    except (UsageError, RecipeError, TaskSettingError, OSError) as err:
        if os.environ.get(TRACEBACK_ENV):
            raise
        print(f"implicit-hf {command}: error: {_one_line(err)}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
