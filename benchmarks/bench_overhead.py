"""Forward-time overhead of looping: an L-layer core run K times against a K*L-layer LlamaModel.

Both models have the same width (hidden, heads, intermediate size), use transformers' sdpa
attention, run in eval mode under ``torch.no_grad`` and see the same token batch:

* implicit: ``ImplicitModel`` with no prelude and no coda, ``num_core_layers=L``, Picard with no
  tolerance (exactly K iterations), ``injection="add"``, ``state_init="zeros"``, no core norm and
  (where the config has it) no injection norm. Per loop it adds the injection ``z + e`` on top of the
  L layers, keeps the solver's per-sample residual bookkeeping, and ends with the final RMSNorm;
* llama: ``LlamaModel`` with ``K * L`` layers (its final RMSNorm included), ``use_cache=False``; the implicit model
  runs with ``use_cache=False`` too. For reference, both models' inference defaults, which fill a KV cache of K*L
  layers, are timed in the same rounds (``ratio_with_caches``).

The two models are timed interleaved (alternating which goes first) after one warm-up each, and
the medians of ``--repeats`` runs are compared: ``ratio = implicit / llama`` per K, target <= 1.05.

Usage: python benchmarks/bench_overhead.py [--out benchmarks/results/overhead.json] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import inspect
import time

import torch
from _common import (  # first: puts the checkout on sys.path when run as a plain script
    environment,
    median,
    resolve_device,
    seed_everything,
    timed,
    write_report,
)
from transformers import LlamaConfig, LlamaModel

from implicit_hf import ImplicitConfig, ImplicitModel

TARGET = 1.05


def build_implicit(args, device: torch.device) -> ImplicitModel:
    extra = {}
    if "injection_norm" in inspect.signature(ImplicitConfig.__init__).parameters:
        extra["injection_norm"] = False  # LlamaModel has no counterpart
    config = ImplicitConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_attention_heads=args.heads,
        num_prelude_layers=0,
        num_core_layers=args.layers,
        num_coda_layers=0,
        core_norm=False,
        tol=None,
        solver="picard",
        injection="add",
        state_init="zeros",
        max_position_embeddings=max(2048, args.seq),
        attn_implementation="sdpa",
        **extra,
    )
    return ImplicitModel(config).to(device).eval()


def build_llama(args, num_layers: int, device: torch.device) -> LlamaModel:
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_attention_heads=args.heads,
        num_hidden_layers=num_layers,
        max_position_embeddings=max(2048, args.seq),
        use_cache=False,
        attn_implementation="sdpa",
    )
    return LlamaModel(config).to(device).eval()


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/overhead.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--loops", type=int, nargs="+", default=[4, 8, 16], help="K")
    parser.add_argument("--layers", type=int, default=2, help="L, core layers of the implicit model")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=None, help="default: Llama's SwiGLU width of hidden")
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=15, help="timed runs per model and K (median reported)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch.set_num_threads; 0 keeps torch's default (recorded in the JSON)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    seed_everything(args.seed)
    implicit = build_implicit(args, device)
    args.intermediate = implicit.config.intermediate_size  # the resolved width, shared by both models
    generator = torch.Generator().manual_seed(args.seed + 1)
    input_ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator).to(device)

    started = time.perf_counter()
    results = {}
    for loops in args.loops:
        seed_everything(args.seed)
        llama = build_llama(args, loops * args.layers, device)

        def run_implicit(k=loops, use_cache=False):
            return implicit(input_ids, num_loops=k, use_cache=use_cache).last_hidden_state

        def run_llama(model=llama):
            return model(input_ids, use_cache=False).last_hidden_state

        def run_implicit_with_cache(k=loops):  # the default of an inference forward: it fills a KV cache
            return run_implicit(k, use_cache=None)

        def run_llama_with_cache(model=llama):  # the same for the Llama
            return model(input_ids, use_cache=True).last_hidden_state

        runs = {
            "implicit": run_implicit,
            "llama": run_llama,
            "implicit_with_cache": run_implicit_with_cache,
            "llama_with_cache": run_llama_with_cache,
        }
        times: dict[str, list[float]] = {name: [] for name in runs}
        with torch.no_grad():
            shapes = {name: tuple(fn().shape) for name, fn in runs.items()}  # warm-up
            if len(set(shapes.values())) > 1:
                raise RuntimeError(f"output shapes differ: {shapes}")
            stats = implicit(input_ids, num_loops=loops).loop_stats
            if stats.steps.tolist() != [loops] * args.batch:
                raise RuntimeError(f"implicit model did not run exactly {loops} loops: {stats.steps.tolist()}")
            for repeat in range(args.repeats):
                order = list(runs) if repeat % 2 == 0 else list(reversed(runs))
                for name in order:
                    times[name].append(timed(runs[name], device)[0])
        implicit_median, llama_median = median(times["implicit"]), median(times["llama"])
        ratio = implicit_median / llama_median
        results[str(loops)] = {
            "loops": loops,
            "llama_layers": loops * args.layers,
            "implicit_seconds_median": implicit_median,
            "llama_seconds_median": llama_median,
            "implicit_seconds_all": times["implicit"],
            "llama_seconds_all": times["llama"],
            "ratio_implicit_over_llama": ratio,
            "ratio_of_minimums": min(times["implicit"]) / min(times["llama"]),
            "implicit_with_cache_seconds_median": median(times["implicit_with_cache"]),
            "llama_with_cache_seconds_median": median(times["llama_with_cache"]),
            "ratio_with_caches": median(times["implicit_with_cache"]) / median(times["llama_with_cache"]),
            "target": f"<= {TARGET}",
            "meets_target": ratio <= TARGET,
            "implicit_parameters": sum(p.numel() for p in implicit.parameters()),
            "llama_parameters": sum(p.numel() for p in llama.parameters()),
        }
        with_cache = results[str(loops)]["ratio_with_caches"]
        print(
            f"  K={loops:<3} implicit {implicit_median:.4f}s  llama {llama_median:.4f}s  ratio {ratio:.3f}  "
            f"(both filling a KV cache {with_cache:.3f})"
        )
        del llama

    report = {
        "benchmark": "forward time: K loops of an L-layer implicit core vs a K*L-layer transformers LlamaModel",
        "setup": {
            "implicit": "ImplicitModel: prelude 0, core L, coda 0, picard, tol=None, injection add, state_init zeros, "
            "core_norm False, injection_norm False where available; final RMSNorm; use_cache=False as the llama "
            "(*_with_cache: each model's inference default, which fills a KV cache of K*L layers, for reference)",
            "llama": "transformers LlamaModel with K*L layers, final RMSNorm, use_cache=False",
            "mode": "eval, torch.no_grad, float32, sdpa attention",
            "L": args.layers,
            "K": args.loops,
            "hidden_size": args.hidden,
            "num_attention_heads": args.heads,
            "intermediate_size": args.intermediate,
            "vocab_size": args.vocab,
            "batch": args.batch,
            "seq": args.seq,
            "repeats": args.repeats,
            "warmup_runs": 1,
            "timing": "interleaved, alternating order per repeat; ratio of medians (ratio_of_minimums for "
            "reference, less sensitive to background load)",
            "seed": args.seed,
        },
        "environment": environment(device),
        "results": results,
        "all_meet_target": all(r["meets_target"] for r in results.values()),
        "total_benchmark_seconds": time.perf_counter() - started,
    }
    path = write_report(report, args.out)
    print_table(report)
    print(f"wrote {path}")
    return report


def print_table(report: dict) -> None:
    header = f"{'K':>4}{'llama layers':>14}{'implicit s':>12}{'llama s':>10}{'ratio':>8}  target"
    print(header)
    print("-" * len(header))
    for entry in report["results"].values():
        flag = "ok" if entry["meets_target"] else "MISSED"
        print(
            f"{entry['loops']:>4}{entry['llama_layers']:>14}{entry['implicit_seconds_median']:>12.4f}"
            f"{entry['llama_seconds_median']:>10.4f}{entry['ratio_implicit_over_llama']:>8.3f}"
            f"  {entry['target']} {flag}"
        )


if __name__ == "__main__":
    main()
