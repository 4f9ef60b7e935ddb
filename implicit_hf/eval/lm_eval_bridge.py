"""lm-evaluation-harness on an implicit LM, at several loop counts.

``lm_eval`` needs nothing special: the loop count is a config field, and transformers' loader applies
``from_pretrained`` keyword arguments that name config fields, so

    lm_eval --model hf --model_args pretrained=DIR,num_loops=16,trust_remote_code=True --tasks ...

runs the checkpoint at 16 loops (``trust_remote_code=True`` because the ``lm_eval`` process does not
import ``implicit_hf``; the checkpoint carries its code). `lm_eval_sweep` does this for a list of
loop counts in one process -- the model is loaded once and its ``config.num_loops`` set per run -- and
writes ``results.json``, ``results.csv`` and one quality-vs-loops plot per task metric with the
sweep harness's plotting (`implicit_hf.eval.plots`).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .harness import _normalise_loops, environment, load_model, train_loops
from .plots import plot_quality_vs_loops

# lm_eval metrics where lower is better (everything else it reports is higher-is-better)
LOWER_IS_BETTER = ("perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte", "ter")


def _metrics(task_results: dict[str, Any]) -> dict[str, float]:
    """``{"acc,none": 0.5, "acc_stderr,none": ..., "alias": ..., "sample_len": 20}`` -> ``{"acc": 0.5}``."""
    metrics = {}
    for key, value in task_results.items():
        name = key.split(",")[0]
        if "_stderr" in name or name == "sample_len" or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        metrics[name] = float(value)
    return metrics


def lm_eval_sweep(
    model_dir: str | Path,
    tasks: Sequence[str],
    loops: str | Sequence[int],
    out_dir: str | Path,
    include_path: str | Path | None = None,
    batch_size: int = 8,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    device: str = "cpu",
    log_samples: bool = False,
) -> dict[str, Any]:
    """Run lm-evaluation-harness ``tasks`` on the implicit LM in ``model_dir`` at every loop count."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    loop_counts = _normalise_loops(loops)
    model = load_model(model_dir, "causal_lm", device)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    task_manager = TaskManager(include_path=str(include_path) if include_path else None)
    runs = []
    for count in loop_counts:
        model.config.num_loops = count  # the default every forward and generate call uses
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
        output = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(tasks),
            task_manager=task_manager,
            limit=limit,
            num_fewshot=num_fewshot,
            log_samples=log_samples,
        )
        run = {"loops": count, "tasks": {task: _metrics(values) for task, values in output["results"].items()}}
        if log_samples:
            run["samples"] = output["samples"]
        runs.append(run)
    report = {
        "model": {"model_dir": str(model_dir), "train_loops": train_loops(model.config), "solver": model.config.solver},
        "tasks": list(tasks),
        "loops": loop_counts,
        "run": {"limit": limit, "num_fewshot": num_fewshot, "batch_size": batch_size},
        "environment": environment(),
        "runs": runs,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(
        json.dumps(report | {"runs": [_without_samples(r) for r in runs]}, indent=2) + "\n"
    )
    rows = [
        {"loops": run["loops"], "task": task, "metric": metric, "value": value}
        for run in runs
        for task, metrics in run["tasks"].items()
        for metric, value in metrics.items()
    ]
    with (out / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["loops", "task", "metric", "value"])
        writer.writeheader()
        writer.writerows(rows)
    report["plots"] = [str(path) for path in _plot(report, out)]
    return report


def _without_samples(run: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in run.items() if k != "samples"}


def _plot(report: dict[str, Any], out: Path) -> list[Path]:
    """One quality-vs-loops plot per (task, metric), in the format of the sweep harness's plots."""
    paths = []
    pairs = sorted({(task, metric) for run in report["runs"] for task, ms in run["tasks"].items() for metric in ms})
    for task, metric in pairs:
        values = [run["tasks"].get(task, {}).get(metric, math.nan) for run in report["runs"]]
        plot_report = {
            "task": {"name": task, "quality_metric": metric, "higher_is_better": metric not in LOWER_IS_BETTER},
            "model": report["model"],
            "run": {"n": report["run"]["limit"] or "all"},
            "records": [{"loops": t, "quality": v} for t, v in zip(report["loops"], values, strict=True)],
        }
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in f"{task}_{metric}")
        paths.append(plot_quality_vs_loops(plot_report, out / f"lm_eval_{safe}_vs_loops.png"))
    return paths


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", required=True, help="an implicit causal-LM checkpoint directory (with tokenizer)")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-evaluation-harness task names")
    parser.add_argument("--loops", default="1,2,4,8,16", help="loop counts, e.g. '1,2,4,8' or '1-8'")
    parser.add_argument("--include-path", default=None, help="folder of extra task YAML files (local tasks)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=float, default=None, help="documents per task (lm_eval's --limit)")
    parser.add_argument("--num-fewshot", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("outputs/lm_eval"))
    return parser


def run_from_args(args: argparse.Namespace) -> dict[str, Any]:
    limit = args.limit
    if limit is not None and limit.is_integer():
        limit = int(limit)
    report = lm_eval_sweep(
        args.model,
        [task.strip() for task in args.tasks.split(",") if task.strip()],
        args.loops,
        args.out,
        include_path=args.include_path,
        batch_size=args.batch_size,
        limit=limit,
        num_fewshot=args.num_fewshot,
        device=args.device,
    )
    for run in report["runs"]:
        summary = ", ".join(f"{task} {m}={v:.4g}" for task, ms in run["tasks"].items() for m, v in ms.items())
        print(f"loops {run['loops']:>4}: {summary}")
    print(f"[lm-eval] results: {args.out / 'results.json'}")
    return report
