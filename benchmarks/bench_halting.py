"""Convergence-based halting: loops used and wall time against a fixed maximum loop count, at equal accuracy.

A trained model is scored on its task's test split in batches of ``--batch`` rows, once with exactly
``--max-loops`` iterations for every sample (``tol=0``) and once per tolerance in ``--tols``
(per-sample halting: a sample stops when its relative residual ``||f(z)-z|| / ||f(z)||`` drops
under ``tol``, and the solver no longer evaluates it, so a batch gets cheaper as its samples finish).
Per setting: the task's quality metric, the mean loops used per sample, the mean over batches of
the slowest sample's loops (what bounds a batch's wall time), and wall seconds. Settings are timed
interleaved (alternating order) over ``--repeats`` passes; times are medians.

The headline is the tolerance that saves the most loops among those whose quality is within
``--equal-within`` (absolute) of the fixed-loop quality. Targets: >= 1.5x fewer loops and a faster
wall time than the fixed maximum. A fixed maximum far above what the model needs flatters halting,
so smaller fixed counts (``--fixed-loops``) are scored too, and the headline also compares halting
with the smallest fixed count that reaches the same quality (what a user who tuned the loop count
by hand would run).

Usage: python benchmarks/bench_halting.py --model outputs/maze_implicit/model [--max-loops 64]
       [--tols 1e-2,3e-3,1e-3] [--n 256] [--batch 16] [--out benchmarks/results/halting.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from _common import environment, median, resolve_device, write_report

from implicit_hf.tasks.base import feedback_kwargs
from implicit_hf.tasks.models import load_model, task_for_model

LOOP_TARGET = 1.5


def score(model, task, rows: list[dict], batch: int, loops: int, tol: float) -> dict:
    """One pass over ``rows``: quality, loops per sample and per batch, wall seconds of the forward passes."""
    predictions, steps, slowest, seconds = [], [], [], 0.0
    for start in range(0, len(rows), batch):
        batch_rows = rows[start : start + batch]
        inputs = task.encode(batch_rows)
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        with torch.no_grad():
            began = time.perf_counter()
            out = model(**model_inputs, num_loops=loops, tol=tol, **feedback_kwargs(task, inputs))
            seconds += time.perf_counter() - began
        predictions.extend(task.decode(out.logits, inputs))
        steps.append(out.loop_stats.steps.float())
        slowest.append(float(out.loop_stats.steps.max()))
    metrics = task.compute_metrics(predictions, rows)
    return {
        "quality": float(metrics[task.quality_metric]),
        "metrics": {k: float(v) for k, v in metrics.items()},
        "mean_loops": float(torch.cat(steps).mean()),
        "mean_slowest_loops_per_batch": sum(slowest) / len(slowest),
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a trained model directory (implicit-hf train's model/)")
    parser.add_argument("--task", default=None, help="task name (default: the one the model was trained on)")
    parser.add_argument("--task-kwargs", default=None, help="JSON object of task arguments (default: recorded)")
    parser.add_argument("--max-loops", type=int, default=None, help="fixed loop count (default: 4x training loops)")
    parser.add_argument("--tols", default="3e-2,1e-2,3e-3,1e-3,3e-4")
    parser.add_argument("--fixed-loops", default=None, help="smaller fixed counts to score (default: 1x, 2x train)")
    parser.add_argument("--n", type=int, default=256, help="test rows")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--equal-within", type=float, default=0.005, help="absolute quality difference counted equal")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="benchmarks/results/halting.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if device.type != "cpu":
        raise SystemExit("bench_halting runs on the CPU (task.encode builds CPU tensors)")

    task_kwargs = json.loads(args.task_kwargs) if args.task_kwargs else None
    task, task_kwargs = task_for_model(args.model, args.task, task_kwargs)
    model = load_model(args.model, task.head, device)
    loops = args.max_loops or 4 * model.config.train_loops
    rows = task.build_dataset("test", args.n, args.seed).to_list()
    trained = model.config.train_loops
    smaller = [int(k) for k in args.fixed_loops.split(",")] if args.fixed_loops else [trained, 2 * trained]
    # setting name -> (loop count, tolerance)
    settings = {"fixed": (loops, 0.0)} | {f"fixed={k}": (k, 0.0) for k in sorted(set(smaller)) if k < loops}
    settings |= {f"tol={t}": (loops, float(t)) for t in args.tols.split(",")}

    score(model, task, rows[: args.batch], args.batch, loops, 0.0)  # warm-up
    passes: dict[str, list[dict]] = {name: [] for name in settings}
    for repeat in range(args.repeats):
        order = list(settings) if repeat % 2 == 0 else list(reversed(settings))
        for name in order:
            count, tol = settings[name]
            passes[name].append(score(model, task, rows, args.batch, count, tol))

    results = {}
    for name, runs in passes.items():
        result = dict(runs[0])  # quality and loops are deterministic; only the time varies
        result["seconds"] = median([run["seconds"] for run in runs])
        result["all_seconds"] = [run["seconds"] for run in runs]
        results[name] = result
    fixed = results["fixed"]
    for name, result in results.items():
        result["loop_reduction"] = fixed["mean_loops"] / result["mean_loops"]
        result["speedup"] = fixed["seconds"] / result["seconds"]
        result["equal_quality"] = abs(result["quality"] - fixed["quality"]) <= args.equal_within
        print(
            f"{name:>12}: {task.quality_metric} {result['quality']:.4f}  loops {result['mean_loops']:6.2f} "
            f"(slowest/batch {result['mean_slowest_loops_per_batch']:6.2f})  {result['seconds']:7.2f} s  "
            f"x{result['loop_reduction']:.2f} loops, x{result['speedup']:.2f} time"
        )
    candidates = [name for name in results if name.startswith("tol=") and results[name]["equal_quality"]]
    best = max(candidates, key=lambda name: results[name]["loop_reduction"], default=None)
    smallest_fixed = min(
        (name for name in results if name.startswith("fixed") and results[name]["equal_quality"]),
        key=lambda name: results[name]["mean_loops"],
    )
    headline = None
    if best is not None:
        chosen, tuned = results[best], results[smallest_fixed]
        headline = {
            "setting": best,
            "loop_reduction": chosen["loop_reduction"],
            "speedup": chosen["speedup"],
            "loop_target_met": chosen["loop_reduction"] >= LOOP_TARGET,
            "faster": chosen["speedup"] > 1.0,
            "smallest_fixed_with_equal_quality": smallest_fixed,
            "loop_reduction_vs_smallest_fixed": tuned["mean_loops"] / chosen["mean_loops"],
            "speedup_vs_smallest_fixed": tuned["seconds"] / chosen["seconds"],
        }
    report = {
        "benchmark": "per-sample halting vs a fixed maximum loop count at equal quality",
        "target": f">= {LOOP_TARGET}x fewer loops and faster wall time, quality within {args.equal_within}",
        "model": args.model,
        "task": task.name,
        "task_kwargs": task_kwargs,
        "max_loops": loops,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "environment": environment(device),
        "results": results,
        "headline": headline,
    }
    print("headline:", headline)
    print("wrote", write_report(report, args.out))


if __name__ == "__main__":
    main()
