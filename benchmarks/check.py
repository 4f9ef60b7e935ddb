"""A guard against silent speed regressions: re-run the fast ratio benchmarks and compare with the committed files.

Runs ``bench_overhead``, ``bench_decode``, ``bench_sweep`` and ``bench_train_step`` with fewer repeats (a few minutes
in all on one CPU thread), writing to a temporary folder, and prints every ratio next to its target and to the value
in ``benchmarks/results/``. A ratio is flagged when it misses its target or is more than ``--tolerance`` (10%) worse
than the committed one; the exit status is 1 when any is flagged. Not a timed test: run it before resolving an issue
that touches ``modeling/``, the solvers or the gradients (``make bench-check``), and re-run the full benchmark of any
flagged ratio before believing it (this machine is noisy).

Usage: python benchmarks/check.py [--only overhead,decode] [--tolerance 0.1]
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from _common import ROOT

RESULTS = ROOT / "benchmarks" / "results"


@dataclass(frozen=True)
class Check:
    """One benchmark: how to run it quickly, its ratios, and which way is better."""

    name: str  # benchmarks/bench_{name}.py, benchmarks/results/{name}.json
    quick: tuple[str, ...]  # arguments for a quick run
    ratios: Callable[[dict], dict[str, float]]
    higher_is_better: bool = False

    @property
    def target(self) -> float | None:
        """The script's own ``TARGET``, if it declares one."""
        return getattr(importlib.import_module(f"bench_{self.name}"), "TARGET", None)

    def worse_by(self, now: float, before: float) -> float:
        """How much worse ``now`` is than ``before``, as a fraction (negative: better)."""
        return (before - now) / before if self.higher_is_better else (now - before) / before

    def misses(self, value: float) -> bool:
        target = self.target
        return target is not None and (value < target if self.higher_is_better else value > target)


CHECKS = (
    Check(
        "overhead",
        ("--repeats", "7"),
        lambda report: {f"K={k}": entry["ratio_implicit_over_llama"] for k, entry in report["results"].items()},
    ),
    Check(
        "decode",
        ("--repeats", "3"),
        lambda report: {f"K={run['num_loops']}": run["ratio"] for run in report["runs"]},
        higher_is_better=True,
    ),
    Check("sweep", ("--repeats", "2"), lambda report: {"headline": report["headline"]["ratio"]}),
    Check("train_step", ("--repeats", "3"), lambda report: {row["setting"]: row["ratio"] for row in report["rows"]}),
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated names among " + ", ".join(c.name for c in CHECKS))
    parser.add_argument("--tolerance", type=float, default=0.1, help="flag a ratio this much worse than committed")
    args = parser.parse_args()
    names = [c.name for c in CHECKS]
    only = names if args.only is None else args.only.split(",")
    unknown = sorted(set(only) - set(names))
    if unknown:
        parser.error(f"--only: unknown benchmark(s) {unknown}; choose among {names}")
    flagged = []
    print(f"{'benchmark':<12}{'ratio':<34}{'now':>8}{'committed':>11}{'target':>9}  verdict")
    with tempfile.TemporaryDirectory() as tmp:
        for check in (c for c in CHECKS if c.name in only):
            out = Path(tmp) / f"{check.name}.json"
            script = ROOT / "benchmarks" / f"bench_{check.name}.py"
            run = subprocess.run([sys.executable, str(script), *check.quick, "--out", str(out)], cwd=ROOT, text=True)
            if run.returncode != 0:
                flagged.append(f"{check.name}: the benchmark failed (exit {run.returncode})")
                continue
            now = check.ratios(json.loads(out.read_text()))
            committed_file = RESULTS / f"{check.name}.json"
            before = check.ratios(json.loads(committed_file.read_text())) if committed_file.is_file() else {}
            for key, value in now.items():
                verdicts = []
                if check.misses(value):
                    verdicts.append("MISSES TARGET")
                if key in before and check.worse_by(value, before[key]) > args.tolerance:
                    verdicts.append(f"{check.worse_by(value, before[key]):.0%} WORSE")
                if verdicts:
                    flagged.append(f"{check.name} {key}: {value:.3f} ({', '.join(verdicts)})")
                committed = f"{before[key]:.3f}" if key in before else "-"
                target = "-" if check.target is None else f"{check.target:g}"
                verdict = ", ".join(verdicts) or "ok"
                print(f"{check.name:<12}{key:<34}{value:>8.3f}{committed:>11}{target:>9}  {verdict}")
    print("\n".join(["", "flagged:", *flagged]) if flagged else "\nno ratio moved past its target or the tolerance")
    return 1 if flagged else 0


if __name__ == "__main__":
    raise SystemExit(main())
