"""Tables of results/trajectories/ from the sweeps run.sh writes: summary.json (the README's table: per task setting,
the best selection rule's accuracy per K at 4x the trained loop count, and at the trained count) and summary.md
(every table: accuracy per (loops, K), the ablation of the selection rules, calibration by agreement, cost).

    python results/trajectories/summarise.py
"""

import json
import math
from pathlib import Path

HERE = Path(__file__).parent
BENCHMARK = HERE.parents[1] / "benchmarks" / "results" / "trajectories.json"
# name: (label, trained loop count, baseline accuracy to beat: K = 1 at 4x loops, target gain or level)
SETTINGS = {
    "sudoku_hard": ("sudoku, hard (25+ givens, needs search)", 16, ("level", 0.85)),
    "maze_13": ("maze 13x13 (trained on 9x9)", 24, ("gain", 0.15)),
    "maze_17": ("maze 17x17, the largest size in results/maze (trained on 9x9)", 24, ("gain", 0.15)),
    "state_tracking_s5_steps16": ("state tracking, 5 objects, 16 steps = 2N (trained at 1..8)", 16, None),
    "state_tracking_s5_steps32": ("state tracking, 5 objects, 32 steps = 4N (trained at 1..8)", 16, None),
}
RULES = ("residual", "vote", "random")


def load(name: str) -> dict | None:
    path = HERE / name / "results.json"
    return json.loads(path.read_text()) if path.exists() else None


def accuracy(report: dict) -> dict[tuple[int, int], float]:
    """(K, loops) -> quality of a sweep over trajectory counts."""
    return {(r["trajectories"], r["loops"]): r["quality"] for r in report["width"]["records"]}


def rules_of(name: str) -> dict[str, dict[tuple[int, int], float]]:
    found = {"residual": load(name)}
    found.update({rule: load(f"{name}_{rule}") for rule in RULES[1:]})
    return {rule: accuracy(report) for rule, report in found.items() if report is not None}


def best_rule(rules: dict, loops: int) -> str:
    """The rule with the highest accuracy at the largest K every rule ran, at ``loops`` (ties: the listed order)."""
    common = set.intersection(*({k for k, _ in table} for table in rules.values()))
    k = max(common)
    return max(rules, key=lambda rule: (rules[rule][(k, loops)], -RULES.index(rule)))


def summary() -> tuple[dict, list[str]]:
    entries, lines = {}, ["# Trajectories in width: results (written by summarise.py)", ""]
    for name, (label, trained, target) in SETTINGS.items():
        rules = rules_of(name)
        if "residual" not in rules:
            continue
        report = load(name)
        loops = sorted({t for _, t in rules["residual"]})
        counts = sorted({k for k, _ in rules["residual"]})
        deep = 4 * trained if 4 * trained in loops else loops[-1]
        rule = best_rule(rules, deep)
        ks = sorted({k for k, _ in rules[rule]} | {1})
        best = {**rules["residual"], **rules[rule]}  # K = 1 needs no rule: one trajectory
        entry = {
            "select": rule,
            "loops": deep,
            "accuracy": {str(k): best[(k, deep)] for k in ks},
            "trained_loops": trained,
            "accuracy_at_trained_loops": {str(k): best[(k, trained)] for k in ks if (k, trained) in best},
            "trajectory_noise": report["width"]["trajectory_noise"],
            "n": report["run"]["n"],
        }
        top = max(entry["accuracy"][str(k)] for k in ks if k <= 64)
        if target is not None:
            kind, value = target
            goal = value if kind == "level" else best[(1, deep)] + value
            entry["target"] = f">= {goal:.3f} at some K <= 64 ({'level' if kind == 'level' else f'K=1 + {value}'})"
            entry["target_met"] = top >= goal
        entries[name] = entry
        lines += [f"## {label}", "", f"{report['task']['quality_metric']} on {entry['n']} test inputs, trajectory "
                  f"noise {entry['trajectory_noise']:g}; trained at {trained} loops.", ""]  # fmt: skip
        lines += [f"### lowest final residual ({'the best rule' if rule == 'residual' else f'best: {rule}'})", ""]
        lines += ["| K | " + " | ".join(f"{t} loops" for t in loops) + " | seconds (all inputs, max loops) |",
                  "|---|" + "---|" * (len(loops) + 1)]  # fmt: skip
        seconds = report["width"]["seconds_total"]
        for k in counts:
            cells = " | ".join(f"{rules['residual'][(k, t)]:.3f}" for t in loops)
            lines.append(f"| {k} | {cells} | {seconds[str(k)]:.1f} |")
        lines += ["", "### selection rules at equal K (same trajectories: same seed and noise)", "",
                  "| rule | " + " | ".join(f"K={k}, {t} loops" for k in (4, 16) for t in (trained, deep)) + " |",
                  "|---|" + "---|" * 4]  # fmt: skip
        for name_rule, table in rules.items():
            cells = [table.get((k, t)) for k in (4, 16) for t in (trained, deep)]
            lines.append(f"| {name_rule} | " + " | ".join("-" if c is None else f"{c:.3f}" for c in cells) + " |")
        calibrated = next(
            r for r in report["width"]["records"] if r["trajectories"] == counts[-1] and r["loops"] == deep
        )
        if calibrated.get("calibration"):
            lines += ["", f"### calibration: K={counts[-1]}, {deep} loops, inputs by agreement between trajectories",
                      "", "| agreement | inputs | accuracy |", "|---|---|---|"]  # fmt: skip
            for bucket in calibrated["calibration"]:
                quality = "-" if math.isnan(bucket["quality"]) else f"{bucket['quality']:.3f}"
                lines.append(f"| {bucket['agreement']} | {bucket['n']} | {quality} |")
        if target is not None:
            lines += ["", f"* target {entry['target']}: {'met' if entry['target_met'] else 'MISSED'} (best {top:.3f})"]
        lines.append("")
    if BENCHMARK.exists():
        bench = json.loads(BENCHMARK.read_text())
        lines += ["## cost (benchmarks/bench_trajectories.py, one run, alternating)", "",
                  f"Time per input at K over K x the time at K = 1 (commit {bench['commit'][:7]}):", "",
                  "| K | K separate runs | one batched solve | batched, in chunks |", "|---|---|---|---|"]  # fmt: skip
        for row in bench["results"]:
            ratio = row["ratio_to_k_times_one"]
            lines.append(f"| {row['trajectories']} | {ratio['separate']:.2f} | {ratio['batched']:.2f} | "
                         f"{ratio['chunked']:.2f} |")  # fmt: skip
    return entries, lines


if __name__ == "__main__":
    entries, lines = summary()
    (HERE / "summary.json").write_text(json.dumps(entries, indent=2) + "\n")
    (HERE / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
