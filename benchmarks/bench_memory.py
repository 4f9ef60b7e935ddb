"""Peak training memory against loop count, per gradient mode, for one training step.

One training step is a forward and a backward pass (no optimiser) of a small ``ImplicitForCausalLM``
(default: hidden 128, 4 heads, prelude 1 / core 2 / coda 1, vocab 512, batch 8, sequence 64,
Picard, no tolerance, so the core runs exactly ``loops`` times) with the next-token loss.

Memory figures, each measured by this run:

* ``saved_activation_bytes`` (every device): bytes of the distinct storages autograd saves for
  backward during the forward pass, counted with ``torch.autograd.graph.saved_tensors_hooks``
  (deduplicated by storage pointer, parameters excluded). This is what the autograd graph holds on
  to, independent of allocator caching; it is the figure the 64/4 ratio is taken on for ``cpu``.
* ``peak_rss_delta_bytes`` (cpu, unless ``--no-rss``): a fresh subprocess per configuration builds
  the model, runs one warm-up step at one loop, resets the kernel's peak-RSS mark
  (``/proc/self/clear_refs``), then records peak RSS (``VmHWM``) during one step minus the RSS
  before it. Allocator caching makes this noisier; where the kernel refuses the reset it falls back
  to ``ru_maxrss`` (the method used is recorded).
* ``cuda_peak_step_bytes`` (``--device cuda``): ``torch.cuda.max_memory_allocated`` after
  ``reset_peak_memory_stats`` during one step, minus the memory allocated before it: the true peak,
  on which the ratio is taken there.

``step_seconds_median``: median wall time of ``--repeats`` steps after one warm-up step.

Usage: python benchmarks/bench_memory.py [--out benchmarks/results/memory.json] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from _common import (  # first: puts the checkout on sys.path when run as a plain script
    SavedTensorMeter,
    environment,
    median,
    parameter_storages,
    resolve_device,
    seed_everything,
    synchronize,
    timed,
    write_report,
)

from implicit_hf import ImplicitConfig, ImplicitForCausalLM

MODES = ("unroll", "truncated", "jfb", "phantom", "ift")
TARGET_MODES = ("jfb", "phantom", "ift")  # the modes the <= 1.1 target is about
TARGET = 1.1


def build(args, mode: str, device: torch.device) -> tuple[ImplicitForCausalLM, torch.Tensor]:
    """The same weights and batch for every mode (one seed), in training mode."""
    seed_everything(args.seed)
    config = ImplicitConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_attention_heads=args.heads,
        num_prelude_layers=args.prelude,
        num_core_layers=args.core,
        num_coda_layers=args.coda,
        max_position_embeddings=max(2048, args.seq),
        solver="picard",
        tol=None,
        gradient=mode,
        gradient_steps=args.gradient_steps,
        phantom_tau=args.phantom_tau,
        attn_implementation="sdpa",
    )
    model = ImplicitForCausalLM(config).to(device).train()
    generator = torch.Generator().manual_seed(args.seed + 1)
    input_ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator).to(device)
    return model, input_ids


def train_step(model: ImplicitForCausalLM, input_ids: torch.Tensor, loops: int) -> float:
    model.zero_grad(set_to_none=False)
    loss = model(input_ids, labels=input_ids, num_loops=loops).loss
    loss.backward()
    return float(loss.detach())


def time_step(model: ImplicitForCausalLM, input_ids: torch.Tensor, loops: int, device: torch.device) -> float:
    seconds, _ = timed(lambda: train_step(model, input_ids, loops), device)
    return seconds


def saved_activations(model: ImplicitForCausalLM, input_ids: torch.Tensor, loops: int) -> tuple[int, int]:
    model.zero_grad(set_to_none=False)
    with SavedTensorMeter(exclude=parameter_storages(model)) as meter:
        loss = model(input_ids, labels=input_ids, num_loops=loops).loss
    loss.backward()
    return meter.bytes, meter.count


def cuda_peak(model: ImplicitForCausalLM, input_ids: torch.Tensor, loops: int, device: torch.device) -> dict:
    model.zero_grad(set_to_none=False)
    gc.collect()
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    train_step(model, input_ids, loops)
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {"cuda_peak_step_bytes": peak - before, "cuda_peak_total_bytes": peak, "cuda_resting_bytes": before}


# --------------------------------------------------------------------------------------------------
# Peak RSS in a fresh process per configuration (cpu)
# --------------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def rss_worker(args) -> None:
    """Runs in the subprocess: prints one JSON line with the RSS figures of one step."""
    device = torch.device("cpu")
    model, input_ids = build(args, args.worker_mode, device)
    train_step(model, input_ids, 1)  # warm-up: lazy allocations, thread pools, grad buffers
    gc.collect()
    method = "VmHWM after /proc/self/clear_refs reset" if _reset_peak_rss() else "ru_maxrss (peak not reset)"
    before_kib = _status_kib("VmRSS")
    maxrss_before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    train_step(model, input_ids, args.worker_loops)
    if method.startswith("VmHWM"):
        peak_kib = _status_kib("VmHWM")
    else:
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        before_kib = maxrss_before_kib
    print(
        json.dumps(
            {
                "peak_rss_delta_bytes": 1024 * (peak_kib - before_kib),
                "peak_rss_bytes": 1024 * peak_kib,
                "rss_before_step_bytes": 1024 * before_kib,
                "rss_method": method,
            }
        )
    )


def rss_in_subprocess(argv: list[str], mode: str, loops: int) -> dict:
    script = str(Path(__file__).resolve())
    command = [sys.executable, script, *argv, "--worker-mode", mode, "--worker-loops", str(loops)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"peak_rss_error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/memory.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--loops", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--prelude", type=int, default=1)
    parser.add_argument("--core", type=int, default=2)
    parser.add_argument("--coda", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--gradient-steps", type=int, default=4, help="window of truncated / phantom")
    parser.add_argument("--phantom-tau", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per configuration (median reported)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch.set_num_threads; 0 keeps torch's default (recorded in the JSON)"
    )
    parser.add_argument("--no-rss", action="store_true", help="skip the per-configuration subprocess RSS figure")
    parser.add_argument("--worker-mode", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-loops", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict | None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker_mode is not None:
        rss_worker(args)
        return None
    device = resolve_device(args.device)
    use_rss = device.type == "cpu" and not args.no_rss
    worker_argv = [a for a in argv if a != "--no-rss"]

    started = time.perf_counter()
    results: dict[str, dict[str, dict]] = {}
    for mode in args.modes:
        results[mode] = {}
        for loops in args.loops:
            model, input_ids = build(args, mode, device)
            loss = train_step(model, input_ids, loops)  # warm-up
            seconds = [time_step(model, input_ids, loops, device) for _ in range(args.repeats)]
            saved_bytes, saved_count = saved_activations(model, input_ids, loops)
            entry = {
                "saved_activation_bytes": saved_bytes,
                "saved_tensor_count": saved_count,
                "step_seconds_median": median(seconds),
                "step_seconds_all": seconds,
                "loss": loss,
            }
            if device.type == "cuda":
                entry.update(cuda_peak(model, input_ids, loops, device))
            del model, input_ids
            gc.collect()
            if use_rss:
                entry.update(rss_in_subprocess(worker_argv, mode, loops))
            results[mode][str(loops)] = entry
            print(f"  {mode:<10} loops={loops:<4} saved={saved_bytes / 2**20:8.2f} MiB  step={median(seconds):.3f}s")

    low, high = str(min(args.loops)), str(max(args.loops))
    metric = "cuda_peak_step_bytes" if device.type == "cuda" else "saved_activation_bytes"
    ratios = {}
    for mode in args.modes:
        value = results[mode][high][metric] / results[mode][low][metric]
        entry = {
            "metric": metric,
            "value": value,
            "target": f"<= {TARGET}",
            "meets_target": value <= TARGET,
            "target_applies": mode in TARGET_MODES,
        }
        if use_rss and "peak_rss_delta_bytes" in results[mode][high] and "peak_rss_delta_bytes" in results[mode][low]:
            low_rss = results[mode][low]["peak_rss_delta_bytes"]
            entry["peak_rss_delta_ratio"] = results[mode][high]["peak_rss_delta_bytes"] / low_rss if low_rss else None
        ratios[mode] = entry

    report = {
        "benchmark": "peak training memory (forward + backward) against loop count, per gradient mode",
        "setup": {
            "model": "ImplicitForCausalLM, picard, tol=None (exactly `loops` core iterations), next-token loss",
            "hidden_size": args.hidden,
            "num_attention_heads": args.heads,
            "num_prelude_layers": args.prelude,
            "num_core_layers": args.core,
            "num_coda_layers": args.coda,
            "vocab_size": args.vocab,
            "batch": args.batch,
            "seq": args.seq,
            "loops": args.loops,
            "gradient_steps": args.gradient_steps,
            "phantom_tau": args.phantom_tau,
            "ift": "library defaults: adjoint solve with the forward solver, up to `loops` iterations, tol 1e-5",
            "attn_implementation": "sdpa",
            "dtype": "float32",
            "repeats": args.repeats,
            "seed": args.seed,
            "metrics": {
                "saved_activation_bytes": "distinct storages saved for backward during the forward pass "
                "(saved_tensors_hooks, dedup by storage pointer, parameters excluded)",
                "peak_rss_delta_bytes": "fresh subprocess per configuration: peak RSS during one step minus RSS "
                "before it, after a 1-loop warm-up step (noisy: allocator caching)",
                "cuda_peak_step_bytes": "torch.cuda.max_memory_allocated during one step minus allocated before",
                "step_seconds_median": "median wall time of one forward + backward after a warm-up step",
            },
        },
        "environment": environment(device),
        "results": results,
        f"ratio_{high}_over_{low}_loops": ratios,
        "total_benchmark_seconds": time.perf_counter() - started,
    }
    path = write_report(report, args.out)
    print_table(report, low, high)
    print(f"wrote {path}")
    return report


def print_table(report: dict, low: str, high: str) -> None:
    results = report["results"]
    loops = [str(k) for k in report["setup"]["loops"]]
    has_rss = any("peak_rss_delta_bytes" in e for r in results.values() for e in r.values())
    has_cuda = any("cuda_peak_step_bytes" in e for r in results.values() for e in r.values())
    header = f"{'mode':<10}{'loops':>6}{'saved MiB':>11}"
    header += f"{'RSS d MiB':>11}" if has_rss else ""
    header += f"{'CUDA pk MiB':>12}" if has_cuda else ""
    header += f"{'step s':>9}"
    print(header)
    print("-" * len(header))
    for mode, per_loops in results.items():
        for k in loops:
            e = per_loops[k]
            row = f"{mode:<10}{k:>6}{e['saved_activation_bytes'] / 2**20:>11.2f}"
            if has_rss:
                rss = e.get("peak_rss_delta_bytes")
                row += f"{rss / 2**20:>11.1f}" if rss is not None else f"{'n/a':>11}"
            if has_cuda:
                row += f"{e['cuda_peak_step_bytes'] / 2**20:>12.2f}"
            row += f"{e['step_seconds_median']:>9.3f}"
            print(row)
    print()
    for mode, r in report[f"ratio_{high}_over_{low}_loops"].items():
        flag = "ok" if r["meets_target"] else "MISSED"
        note = "" if r["target_applies"] else "  (no target: reference)"
        rss = r.get("peak_rss_delta_ratio")
        rss_text = f", RSS-delta ratio {rss:.2f}" if rss is not None else ""
        ratio = f"{high}/{low} loops {r['metric']}: {r['value']:.3f}"
        print(f"{mode:<10} {ratio} (target {r['target']}: {flag}){note}{rss_text}")


if __name__ == "__main__":
    main()
