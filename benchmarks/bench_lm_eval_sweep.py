"""Cost of an lm-eval loop sweep scored from one trajectory, against one lm-eval pass at its largest count.

A causal implicit LM (``--model``, or a fresh one of the multihop task's vocabulary with ``--hidden``) is
scored on the shipped lm-evaluation-harness task ``multihop_hops{--hops}`` (``--n`` documents, a 10-way
choice each: loglikelihood requests) three ways, timed interleaved over ``--repeats`` passes:

* ``one_pass``: ``lm_eval.simple_evaluate`` with ``HFLM`` at ``max(loops)`` loops (what one count costs);
* ``sweep``: `implicit_hf.eval.lm_eval_bridge.lm_eval_sweep` over every count of ``--loops`` from one
  trajectory per batch (`LoopSweepLM`);
* ``per_count``: the same sweep as one lm-eval pass per count (``share_trajectory=False``), the
  reference it equals.

All three use one lm-eval ``TaskManager``, built once before the timings (indexing lm-eval's task YAMLs
takes seconds; its time is recorded as ``task_manager_seconds``); the sweep's time includes loading the
model and writing its results and plots. Target: ``sweep / one_pass <= 1.3`` for 6 counts. The accuracies of
the sweep and the per-count passes are recorded side by side (they must be equal).

Usage: python benchmarks/bench_lm_eval_sweep.py [--loops 1,2,4,8,16,32] [--out benchmarks/results/lm_eval_sweep.json]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from _common import environment, median, seed_everything, write_report

from implicit_hf import ImplicitConfig, ImplicitForCausalLM
from implicit_hf.eval import parse_loops
from implicit_hf.eval.lm_eval_bridge import lm_eval_sweep
from implicit_hf.tasks.reasoning.multihop import LM_EVAL_DIR, MultiHopTask, write_lm_eval_data

TARGET = 1.3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a causal implicit checkpoint with the multihop tokenizer")
    parser.add_argument("--hidden", type=int, default=128, help="width of the fresh model (without --model)")
    parser.add_argument("--loops", default="1,2,4,8,16,32")
    parser.add_argument("--hops", type=int, default=8)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/lm_eval_sweep.json")
    return parser.parse_args(argv)


def one_pass(model_dir: Path, task: str, loops: int, args, manager) -> tuple[float, float]:
    """Seconds and accuracy of one plain lm-eval pass (HFLM) at ``loops``."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    model = ImplicitForCausalLM.from_pretrained(model_dir, num_loops=loops).eval()
    lm = HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(model_dir), batch_size=args.batch_size)
    began = time.perf_counter()
    output = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager)
    return time.perf_counter() - began, output["results"][task]["acc,none"]


def sweep(model_dir: Path, task: str, args, manager, out: Path, share: bool) -> tuple[float, list[float]]:
    began = time.perf_counter()
    report = lm_eval_sweep(
        model_dir, [task], args.loops, out, batch_size=args.batch_size, share_trajectory=share, task_manager=manager
    )
    return time.perf_counter() - began, [run["tasks"][task]["acc"] for run in report["runs"]]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    loops = parse_loops(args.loops)
    task = f"multihop_hops{args.hops}"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = Path(args.model) if args.model else tmp / "model"
        if args.model is None:
            seed_everything(0)
            multihop = MultiHopTask(cache_dir=tmp / "cache")
            config = ImplicitConfig(
                **multihop.model_config(), hidden_size=args.hidden, num_attention_heads=4, num_prelude_layers=1,
                num_core_layers=1, num_coda_layers=1, num_loops=max(loops),
            )  # fmt: skip
            ImplicitForCausalLM(config).save_pretrained(model_dir)
            multihop.save_artifacts(model_dir)
        write_lm_eval_data(tmp / "data", [args.hops], n=args.n)
        from lm_eval.tasks import TaskManager

        began = time.perf_counter()  # built once and shared: every timed run excludes it
        manager = TaskManager(include_path=str(LM_EVAL_DIR), metadata={"data_dir": str(tmp / "data")})
        task_manager_seconds = time.perf_counter() - began
        times: dict[str, list[float]] = {"one_pass": [], "sweep": [], "per_count": []}
        accuracy = {}
        for repeat in range(args.repeats):
            order = ["one_pass", "sweep", "per_count"]
            for name in order if repeat % 2 == 0 else order[::-1]:
                if name == "one_pass":
                    seconds, accuracy[name] = one_pass(model_dir, task, max(loops), args, manager)
                else:
                    seconds, accuracy[name] = sweep(model_dir, task, args, manager, tmp / name, name == "sweep")
                times[name].append(seconds)
                print(f"{name:>10}: {seconds:7.2f} s")
    medians = {name: median(values) for name, values in times.items()}
    report = {
        "benchmark": "lm_eval_sweep",
        "description": __doc__.splitlines()[0],
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "task": task,
        "loops": loops,
        "seconds": times,
        "median_seconds": medians,
        "task_manager_seconds": task_manager_seconds,
        "ratio_sweep_to_one_pass": medians["sweep"] / medians["one_pass"],
        "ratio_per_count_to_one_pass": medians["per_count"] / medians["one_pass"],
        "target": TARGET,
        "meets_target": medians["sweep"] / medians["one_pass"] <= TARGET,
        "accuracy": accuracy,
        "sweep_equals_per_count": accuracy["sweep"] == accuracy["per_count"],
        "environment": environment(torch.device("cpu")),
    }
    print(f"sweep / one pass = {report['ratio_sweep_to_one_pass']:.2f} (target <= {TARGET}); "
          f"per-count passes / one pass = {report['ratio_per_count_to_one_pass']:.2f}")  # fmt: skip
    print(f"wrote {write_report(report, args.out)}")
    return report


if __name__ == "__main__":
    main()
