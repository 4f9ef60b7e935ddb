"""``implicit-hf demo``: train a small implicit model on linear programs, sweep loop counts, write results and
plots."""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

import numpy as np

from ..eval.harness import run_eval
from ..tasks.base import get_task
from ..training.loop import train
from ..training.recipe import TrainConfig, parse_args
from .edge import check_output_folder

DEMO_LOOPS = "1,2,4,8,16,32"


def demo_recipe() -> Path:
    """The small LP recipe the demo trains (shipped inside the package)."""
    return Path(str(resources.files("implicit_hf") / "recipes" / "lp_demo.yaml"))


def demo(out: Path, max_steps: int | None = None) -> dict:
    """Train a small implicit model on linear programs, sweep loop counts, write results and plots."""
    check_output_folder(out, "--out")
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


def _zero_prediction_error(config: TrainConfig) -> float:
    """The demo's reference: the relative error of predicting all zeros on the same held-out LPs."""
    task = get_task(config.task, **config.task_kwargs)
    rows = task.build_dataset("test", 200, 1).to_list()
    zeros = [np.zeros(len(row["solution"])) for row in rows]
    return task.compute_metrics(zeros, rows)[task.quality_metric]
