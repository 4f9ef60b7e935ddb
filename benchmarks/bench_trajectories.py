"""What K trajectories per input cost: one batched solve against K separate runs, side by side in one run.

A token-classification implicit model of the sudoku checkpoint's shape (hidden 64, 4 heads, one core layer, 81
tokens, randomly initialised: the cost does not depend on the weights, and halting is off) solves a batch of
``--batch`` inputs at ``--loops`` loops three ways, for every K of ``--counts``:

* ``separate``: K forwards of one trajectory each (what a user without the feature runs: K seeds);
* ``batched``: one forward with ``num_trajectories=K`` (``B * K`` rows in one solve);
* ``chunked``: the same with ``trajectory_batch_size=--chunk`` rows at a time.

For each K the runs alternate (one trajectory, separate, batched, chunked) ``--repeats`` times after one warm-up
round; the JSON records the median seconds per input of each, each one's ratio to ``K x`` the K = 1 time of the
same rounds (below 1: cheaper than K runs), and batched and chunked over separate.

Usage: python benchmarks/bench_trajectories.py [--out benchmarks/results/trajectories.json]
"""

from __future__ import annotations

import argparse
import json

import torch
from _common import environment, median, resolve_device, seed_everything, timed, write_report

from implicit_hf import ImplicitConfig, ImplicitForTokenClassification


def build_model(device: torch.device) -> ImplicitForTokenClassification:
    config = ImplicitConfig(
        vocab_size=10,
        hidden_size=64,
        num_attention_heads=4,
        intermediate_size=256,
        num_labels=10,
        num_prelude_layers=0,
        num_core_layers=1,
        num_coda_layers=0,
        is_causal=False,
        tol=None,
    )
    return ImplicitForTokenClassification(config).to(device).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--counts", default="4,16,64", help="trajectory counts K")
    parser.add_argument("--batch", type=int, default=50, help="inputs per forward")
    parser.add_argument("--loops", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=200, help="trajectory_batch_size of the chunked runs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="benchmarks/results/trajectories.json")
    args = parser.parse_args()
    device = resolve_device(args.device)
    seed_everything(0)
    model = build_model(device)
    ids = torch.randint(0, 10, (args.batch, 81), device=device)
    settings = dict(num_loops=args.loops, trajectory_noise=1.0)

    def separate(count: int):
        return [model(ids, **settings, num_trajectories=1, trajectory_seed=seed) for seed in range(count)]

    def batched(count: int, chunk: int | None = None):
        return model(ids, **settings, num_trajectories=count, trajectory_batch_size=chunk)

    rows = []
    with torch.no_grad():
        for count in (int(k) for k in args.counts.split(",")):
            runs = {"one": [], "separate": [], "batched": [], "chunked": []}
            for repeat in range(args.repeats + 1):
                for name, run in (
                    ("one", lambda: batched(1)),
                    ("separate", lambda count=count: separate(count)),
                    ("batched", lambda count=count: batched(count)),
                    ("chunked", lambda count=count: batched(count, args.chunk)),
                ):
                    seconds = timed(run, device)[0]
                    if repeat:  # the first round warms up
                        runs[name].append(seconds)
            per_input = {name: median(values) / args.batch for name, values in runs.items()}
            one = per_input.pop("one")
            rows.append(
                {
                    "trajectories": count,
                    "one_trajectory_seconds_per_input": one,
                    "seconds_per_input": per_input,
                    "ratio_to_k_times_one": {name: s / (count * one) for name, s in per_input.items()},
                    "batched_over_separate": per_input["batched"] / per_input["separate"],
                    "chunked_over_separate": per_input["chunked"] / per_input["separate"],
                }
            )
            print(json.dumps(rows[-1]))
    report = {
        "benchmark": "trajectories",
        "settings": vars(args),
        "results": rows,
        "environment": environment(device),
    }
    write_report(report, args.out)


if __name__ == "__main__":
    main()
