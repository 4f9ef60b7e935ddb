"""Cost of scoring many loop counts from one trajectory: a sweep up to K against one plain K-loop forward.

Same model, same rows, eval mode, ``torch.no_grad``, Picard with no tolerance (exactly K iterations):

* sweep: `implicit_hf.eval.sweep` over a set of loop counts up to ``K``, i.e. one ``num_loops=K,
  trajectory_loops=counts`` forward per batch (only the scored counts go through coda and head), the
  task's ``decode`` and ``compute_metrics`` for each count (Lipschitz probe off: it is a second run of
  the same kind, timed once with ``--probe``). Two count sets: ``doubling`` = 1, 2, 4, ..., K (the
  harness's usual ``--loops 1,2,4,8,16,32,64``; the headline) and ``all`` = every count 1..K;
* plain: ``encode`` + one ``num_loops=K`` forward without trajectory + ``decode`` + ``compute_metrics``,
  i.e. the cost of scoring the single count ``K``.

The runs are timed interleaved (rotating which goes first) after a 2-loop warm-up each, and the medians
of ``--repeats`` runs are compared: ``ratio = sweep / plain``, target <= 1.2. Every scored count is one
more pass through the coda and the head, so the ``all`` ratio grows with ``coda / core`` layers
(``flops_ratio``: the estimated FLOPs of the trajectory run over the plain run, the floor the timing
can reach); the benchmark runs several layer splits (``--splits``), the first being the headline.

Data and model: the synthetic per-token regression task of ``tests/eval_toy_task.py`` (two input
features per token, fixed length ``--seq``) and an untrained implicit model of ``--hidden`` width.

Usage: python benchmarks/bench_sweep.py [--out benchmarks/results/sweep.json] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time

import torch
from _common import ROOT, environment, median, resolve_device, seed_everything, timed, write_report

sys.path.insert(0, str(ROOT / "tests"))  # the synthetic task lives with the tests

from eval_toy_task import EvalToyTask  # noqa: E402

from implicit_hf.eval import estimate_flops, sweep  # noqa: E402
from implicit_hf.tasks.models import build_model  # noqa: E402

TARGET = 1.2


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/sweep.json")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--loops", type=int, default=64, help="K: the sweep scores 1..K, the plain run uses K")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=60)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--n", type=int, default=64, help="rows (n / batch forward passes per run)")
    parser.add_argument(
        "--splits",
        default="2/4/2,2/4/0",
        help="prelude/core/coda layer splits to run, comma-separated; the first is the headline",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--probe", action="store_true", help="also time a sweep with the Lipschitz probe (first split)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: steadier on a small shared machine; 0 keeps torch's)",
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def plain_run(model, task, rows, loops: int, batch_size: int) -> dict:
    """Score one loop count the ordinary way: encode, one forward without trajectory, decode, metrics."""
    device = next(model.parameters()).device
    predictions = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            inputs = {k: v.to(device) for k, v in task.encode(rows[start : start + batch_size]).items()}
            out = model(**{k: v for k, v in inputs.items() if k != "labels"}, num_loops=loops, tol=0)
            predictions += task.decode(out.logits, inputs)
    return task.compute_metrics(predictions, rows)


COUNT_SETS = ("doubling", "all")


def loop_counts(kind: str, k: int) -> list[int]:
    """The scored loop counts: ``doubling`` = 1, 2, 4, ..., K (K included), ``all`` = 1..K."""
    if kind == "all":
        return list(range(1, k + 1))
    counts = [2**i for i in range(k.bit_length()) if 2**i < k]
    return counts + [k]


def bench_split(args, split: tuple[int, int, int], task, rows, device, probe: bool) -> dict:
    prelude, core, coda = split
    seed_everything(args.seed)
    model = build_model(
        task,
        hidden_size=args.hidden,
        num_attention_heads=args.heads,
        num_prelude_layers=prelude,
        num_core_layers=core,
        num_coda_layers=coda,
        solver="picard",
        tol=None,
        attn_implementation="sdpa",
    )
    model = model.to(device).eval()
    count_sets = {kind: loop_counts(kind, args.loops) for kind in COUNT_SETS}

    def sweeper(loops: list[int], perturb_eps: float | None = None):
        return lambda: sweep(model, task, rows, loops, batch_size=args.batch, perturb_eps=perturb_eps, warmup=False)

    def run_plain():
        return plain_run(model, task, rows, args.loops, args.batch)

    # warm-up (lazy initialisation) at two loops, so it costs little
    sweep(model, task, rows, [1, 2], batch_size=args.batch, perturb_eps=None, warmup=False)
    plain_run(model, task, rows, 2, args.batch)

    runs = {"plain": run_plain, **{f"sweep_{kind}": sweeper(loops) for kind, loops in count_sets.items()}}
    names = list(runs)
    times: dict[str, list[float]] = {name: [] for name in names}
    outputs = {}
    for repeat in range(args.repeats):
        for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
            seconds, outputs[name] = timed(runs[name], device)
            times[name].append(seconds)
    medians = {name: median(values) for name, values in times.items()}
    # each scored count is one more pass through coda + head than the plain run makes
    decode_only = copy.deepcopy(model.config)
    decode_only.num_prelude_layers, decode_only.input_features, decode_only.edge_features = 0, 0, 0
    plain_flops = estimate_flops(model.config, args.seq, args.loops)
    decode_flops = estimate_flops(decode_only, args.seq, 0)
    report = {
        "split": {"prelude": prelude, "core": core, "coda": coda},
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "seconds_median": medians,
        "seconds_min": {name: min(values) for name, values in times.items()},
        "seconds_all": times,
        "count_sets": {},
    }
    for kind, loops in count_sets.items():
        name = f"sweep_{kind}"
        ratio = medians[name] / medians["plain"]
        report["count_sets"][kind] = {
            "loops": loops,
            "ratio": ratio,
            "ratio_of_minimums": min(times[name]) / min(times["plain"]),
            "flops_ratio": (plain_flops + (len(loops) - 1) * decode_flops) / plain_flops,
            "per_count_ratio": medians[name] / (len(loops) * medians["plain"]),
            # both score loop count K: they must agree
            "quality_difference_at_K": abs(
                outputs[name]["records"][-1]["quality"] - outputs["plain"][task.quality_metric]
            ),
            "meets_target": ratio <= TARGET,
        }
        print(
            f"split {prelude}/{core}/{coda} counts {kind} ({len(loops)}): sweep {medians[name]:.3f}s  "
            f"plain K={args.loops} {medians['plain']:.3f}s  ratio {ratio:.3f} "
            f"(min-ratio {report['count_sets'][kind]['ratio_of_minimums']:.3f}; "
            f"FLOP ratio {report['count_sets'][kind]['flops_ratio']:.3f})"
        )
    if probe:  # the Lipschitz probe adds a second trajectory run: timed once, for information
        report["seconds_sweep_doubling_with_probe"], _ = timed(sweeper(count_sets["doubling"], 1e-4), device)
        report["ratio_doubling_with_probe"] = report["seconds_sweep_doubling_with_probe"] / medians["plain"]
    return report


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    splits = [tuple(int(x) for x in s.split("/")) for s in args.splits.split(",")]
    with tempfile.TemporaryDirectory() as cache:
        task = EvalToyTask(cache_dir=cache, seq_len=args.seq, variable_length=False)
        rows = task.build_dataset("test", args.n, args.seed).to_list()
        began = time.perf_counter()
        results = [
            bench_split(args, split, task, rows, device, probe=args.probe and i == 0) for i, split in enumerate(splits)
        ]
    headline = results[0]
    report = {
        "benchmark": f"sweep over loop counts 1..{args.loops} from one trajectory vs a plain {args.loops}-loop forward",
        "setup": {
            "sweep": "implicit_hf.eval.sweep(loops=counts, perturb_eps=None): one num_loops=K "
            "trajectory_loops=counts forward per batch, decode + compute_metrics for each count; "
            "counts doubling = 1,2,4..K (headline), all = 1..K",
            "sweep_with_probe": "the same plus the Lipschitz probe (task.perturb and a second trajectory run); "
            "timed once, first split only, with --probe",
            "plain": "encode + one num_loops=K forward without trajectory + decode + compute_metrics",
            "mode": "eval, torch.no_grad, float32, sdpa attention, picard, tol=0 (exactly K iterations)",
            "task": "tests/eval_toy_task.py EvalToyTask (per-token regression, 2 input features), fixed length",
            "K": args.loops,
            "hidden_size": args.hidden,
            "num_attention_heads": args.heads,
            "seq": args.seq,
            "batch": args.batch,
            "n": args.n,
            "repeats": args.repeats,
            "timing": "interleaved, alternating order per repeat, one 2-loop warm-up each; ratio of medians "
            "(ratio_of_minimums for reference, less sensitive to background load)",
            "seed": args.seed,
        },
        "environment": environment(device),
        "target_ratio": TARGET,
        "headline": {
            "split": headline["split"],
            "loops": headline["count_sets"]["doubling"]["loops"],
            "ratio": headline["count_sets"]["doubling"]["ratio"],
            "meets_target": headline["count_sets"]["doubling"]["meets_target"],
            "ratio_all_counts": headline["count_sets"]["all"]["ratio"],
        },
        "results": results,
        "wall_seconds": time.perf_counter() - began,
    }
    path = write_report(report, args.out)
    print(f"headline ratio {report['headline']['ratio']:.3f} (target <= {TARGET}); wrote {path}")
    return report


if __name__ == "__main__":
    main()
