"""Run an evaluation and write its files: `run_eval` loads a checkpoint, sweeps it on the task's test split
(`implicit_hf.eval.run.sweep`) and writes ``results.json``, ``results.csv`` and PNG plots; `main` is the
``implicit-hf eval`` command line.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..arguments import UsageError, add_eval_arguments
from ..loop_counts import LoopCounts, normalise_loops
from ..modeling.model_card import write_model_card
from ..tasks.base import TaskAdapter
from ..tasks.models import load_model, task_for_model
from .plots import plot_all
from .records import environment, run_name, to_builtin
from .run import sweep
from .sweep import as_rows
from .width import Width, trajectory_counts, width_report

# --------------------------------------------------------------------------------------------------
# Files: results.csv and the summaries of the model and the environment in results.json


def _model_summary(model: torch.nn.Module, model_dir: str | Path) -> dict[str, Any]:
    config = model.config
    fields = (
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "num_prelude_layers",
        "num_core_layers",
        "num_coda_layers",
        "injection",
        "state_init",
        "core_norm",
        "injection_norm",
        "num_loops",
        "num_loops_train",
        "solver",
        "tol",
        "damping",
        "gradient",
        "is_causal",
        "input_features",
        "edge_features",
        "feedback_features",
        "num_labels",
    )
    summary = {name: getattr(config, name, None) for name in fields}
    summary.update(
        model_dir=str(model_dir),
        architecture=type(model).__name__,
        problem_type=getattr(config, "problem_type", None),
        train_loops=getattr(config, "train_loops", None),
        num_parameters=sum(p.numel() for p in model.parameters()),
    )
    return to_builtin(summary)


CSV_COLUMNS = (
    "loops",
    "quality",
    "lipschitz",
    "lipschitz_mean",
    "rel_residual_mean",
    "rel_residual_max",
    "steps_mean",
    "seconds",
    "flops",
)


def write_csv(records: list[dict[str, Any]], path: str | Path) -> Path:
    """One row per loop count: the `CSV_COLUMNS`, then every metric as ``metric_<name>``."""
    metric_names = sorted({name for record in records for name in record["metrics"]})
    path = Path(path)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*CSV_COLUMNS, *(f"metric_{name}" for name in metric_names)])
        for record in records:
            values = [record.get(column) for column in CSV_COLUMNS]
            values += [record["metrics"].get(name) for name in metric_names]
            writer.writerow(["" if v is None else v for v in values])
    return path


# --------------------------------------------------------------------------------------------------
# run_eval: checkpoint -> results.json, results.csv, plots


def resolve_device(device: str | None, option: str = "device") -> torch.device:
    """``device`` as a torch device; ``auto`` (or ``None``) is CUDA when available, else CPU. A name torch does not
    know or a device this machine lacks is a `UsageError` naming ``option`` (the commands check ``--device`` with it
    before anything is loaded)."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise UsageError(f"{option} {device!r} is not a torch device: {err}") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{option} {device!r}: torch.cuda.is_available() is False on this machine")
    return resolved


def run_eval(
    model_dir: str | Path,
    task_name: str | TaskAdapter | None,
    loops: LoopCounts | Sequence[int] | str,
    out_dir: str | Path,
    n: int = 200,
    seed: int = 0,
    batch_size: int = 64,
    perturb_eps: float | None = 1e-4,
    baseline_dirs: Sequence[str | Path] = (),
    task_kwargs: dict[str, Any] | None = None,
    keep_tol: bool = False,
    tol: float | None = None,
    device: str | None = "auto",
    plots: bool = True,
    trajectories: Sequence[int] = (1,),
    trajectory_noise: float = 0.0,
    select: str = "residual",
    trajectory_batch_size: int | None = None,
) -> dict[str, Any]:
    """Sweep the checkpoint in ``model_dir`` over ``loops`` on ``task.build_dataset("test", n, seed)``.

    Writes to ``out_dir``: ``results.json`` (run settings, model and task summary, ``loops``,
    ``records``, ``baselines`` and ``environment``), ``results.csv`` (one row per loop count) and,
    with ``plots``, the PNGs of `implicit_hf.eval.plots.plot_all`. Each of ``baseline_dirs`` is an
    explicit model (e.g. the same layers trained with ``num_loops=1``, or a non-tied stack) evaluated
    once at its own ``config.num_loops`` on the same rows; their records are stored under
    ``baselines`` (each with a ``name``: its run folder) and drawn as dashed lines on the quality plots.
    ``task_name=None`` (and ``task_kwargs=None``) use the task recorded with the model by the
    training loop (`task_for_model`). ``tol`` halts every sample at that relative-residual tolerance
    (the model's ``config.tol`` for this run; implies ``keep_tol``), so ``steps_mean`` is the loops used.
    ``trajectories``: the sweep runs once per K (trajectories per input, from starts with ``trajectory_noise``,
    reduced by ``select``; `implicit_hf.eval.width`); ``records`` are the first K's, and with more than one K
    (or K > 1) ``width`` holds every (loops, K) record, each K's seconds and its calibration tables.
    Returns the content of ``results.json`` plus ``files`` (the paths written).
    """
    loops = normalise_loops(loops)
    counts = trajectory_counts(trajectories)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch_device = resolve_device(device)
    task, task_kwargs = task_for_model(model_dir, task_name, task_kwargs)
    try:
        rows = as_rows(task.build_dataset("test", n, seed))
    except ValueError as err:  # a task refuses a size it cannot provide (e.g. a corpus with fewer windows)
        raise UsageError(f"n={n}: {err}") from err
    model = load_model(model_dir, task.head, torch_device)
    if tol is not None:
        model.config.tol, keep_tol = tol, True
        model.config.validate_loop_settings()
    settings = dict(batch_size=batch_size, perturb_eps=perturb_eps, seed=seed, keep_tol=keep_tol)
    widths = [Width(k, trajectory_noise, select, trajectory_batch_size) for k in counts]
    results = [sweep(model, task, rows, loops, **settings, width=width) for width in widths]
    result = results[0]
    records = result.pop("records")

    baselines = []
    for baseline_dir in baseline_dirs:
        baseline_model = load_model(baseline_dir, task.head, torch_device)
        baseline_loops = int(getattr(baseline_model.config, "num_loops", 1))  # a plain transformers model: once
        baseline_result = sweep(baseline_model, task, rows, [baseline_loops], **settings)
        baselines.append(
            {
                "name": run_name(baseline_dir),
                "model_dir": str(baseline_dir),
                "loops": baseline_loops,
                "record": baseline_result["records"][0],
                "model": _model_summary(baseline_model, baseline_dir),
            }
        )
        del baseline_model

    report = {
        "task": {
            "name": task.name,
            "head": task.head,
            "quality_metric": task.quality_metric,
            "higher_is_better": bool(task.higher_is_better),
            "task_kwargs": to_builtin(task_kwargs),
        },
        "run": {
            **{k: v for k, v in result.items() if k != "loops"},
            "n": n,
            "device": str(torch_device),
            "keep_tol": keep_tol,
            "seconds_note": (
                "seconds = measured generate() time for all samples at t loops (one generate per t)"
                if result.get("generative")
                else "seconds = trajectory-run seconds for all samples * t / max_loops (linear cost assumed)"
            ),
            "flops_note": "estimated forward FLOPs per sample at t loops (implicit_hf.eval.sweep.estimate_flops)",
        },
        "model": _model_summary(model, model_dir),
        "loops": loops,
        "records": records,
        "baselines": baselines,
        "environment": environment(torch_device),
    }
    if counts != [1]:
        report["width"] = width_report(widths[0], counts, [records] + [r["records"] for r in results[1:]], results)
    report = to_builtin(report)
    files = [out_dir / "results.json", out_dir / "results.csv"]
    (out_dir / "results.json").write_text(json.dumps(report, indent=2, allow_nan=True) + "\n")
    write_csv(records, out_dir / "results.csv")
    if plots:
        files += plot_all(report, out_dir)
    return {**report, "files": [str(f) for f in files]}


# --------------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``implicit-hf eval`` options to ``parser`` (defined in `implicit_hf.cli`, which parses them
    without importing torch)."""
    return add_eval_arguments(parser)


def run_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Run `run_eval` from parsed `add_arguments` options and print a table of the records."""
    result = run_eval(
        args.model,
        args.task,
        args.loops,
        args.out,
        n=args.n,
        seed=args.seed,
        batch_size=args.batch_size,
        perturb_eps=args.perturb_eps,
        baseline_dirs=args.baseline,
        task_kwargs=args.task_kwargs,
        keep_tol=args.keep_tol,
        tol=args.tol,
        device=args.device,
        plots=not args.no_plots,
        trajectories=args.trajectories,
        trajectory_noise=args.trajectory_noise,
        select=args.select,
        trajectory_batch_size=args.trajectory_batch_size,
    )
    metric = result["task"]["quality_metric"]
    print(f"{'loops':>5} {metric:>12} {'lipschitz':>11} {'rel.res.mean':>12} {'seconds':>9} {'GFLOPs/sample':>13}")
    for record in result["records"]:
        lipschitz, residual = record["lipschitz"], record["rel_residual_mean"]
        print(
            f"{record['loops']:>5} {record['quality']:>12.5g} "
            f"{(f'{lipschitz:.4g}' if lipschitz is not None else '-'):>11} "
            f"{(f'{residual:.3e}' if residual is not None else '-'):>12} {record['seconds']:>9.3f} "
            f"{record['flops'] / 1e9:>13.4g}"
        )
    if "width" in result:
        print(f"{'K':>4} {'loops':>5} {'compute':>8} {metric:>12} {'agreement':>9} {'seconds':>9}")
        for record in result["width"]["records"]:
            agreement = record.get("agreement_mean")
            print(
                f"{record['trajectories']:>4} {record['loops']:>5} {record['compute']:>8} {record['quality']:>12.5g} "
                f"{(f'{agreement:.3f}' if agreement is not None else '-'):>9} {record['seconds']:>9.3f}"
            )
    for base in result["baselines"]:
        print(f"explicit baseline {base['name']} ({base['loops']} loops): {metric} = {base['record']['quality']:.5g}")
    for path in result["files"]:
        print(f"wrote {path}")
    if args.model_card:
        card_sweep = {"task": result["task"]["name"], "quality_metric": metric, "records": result["records"]}
        write_model_card(args.model, sweep=card_sweep)
        print(f"wrote {Path(args.model) / 'README.md'} (loop sweep added)")
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``implicit-hf eval``: sweep a checkpoint over loop counts and write results and plots."""
    parser = argparse.ArgumentParser(
        prog="implicit-hf eval", description="Score an implicit model at many loop counts from one trajectory run."
    )
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    main()
