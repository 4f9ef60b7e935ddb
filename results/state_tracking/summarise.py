"""Tables and the figure of results/state_tracking/ from the sweeps run.sh writes: summary.md and
accuracy_vs_loops.png (exact match against loops, one line per step count, the baselines dashed in the same colour).

    python results/state_tracking/summarise.py
"""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent
STEPS = (4, 8, 16, 32)
TRAINED = 8  # N: the longest training problems
SHOWN = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128)
BASELINES = {"once": "same layers once", "stack": "non-tied stack", "llama": "Llama"}


def sweep(objects: int, steps: int) -> dict:
    return json.loads((HERE / f"s{objects}_steps{steps}" / "results.json").read_text())


def baseline_name(result: dict) -> str:
    name = result["name"]  # the training run's folder, e.g. s3_once (the Llama's is s3_llama)
    return next(label for key, label in BASELINES.items() if name.endswith(key))


def table(objects: int) -> list[str]:
    chance = 1 / objects
    lines = [
        f"### {objects} objects (trained at 1..{TRAINED} steps; chance {chance:.2f})",
        "",
        "| steps | " + " | ".join(f"{t} loops" for t in SHOWN) + " | fewest loops >= 0.95 | "
        + " | ".join(BASELINES.values()) + " |",
        "|---|" + "---|" * (len(SHOWN) + 1 + len(BASELINES)),
    ]  # fmt: skip
    for steps in STEPS:
        result = sweep(objects, steps)
        quality = {r["loops"]: r["quality"] for r in result["records"]}
        first = next((t for t in sorted(quality) if quality[t] >= 0.95), None)
        bases = {baseline_name(b): b["record"]["quality"] for b in result["baselines"]}
        lines.append(
            f"| {steps} | " + " | ".join(f"{quality[t]:.3f}" for t in SHOWN) + f" | {first or '-'} | "
            + " | ".join(f"{bases[label]:.3f}" for label in BASELINES.values()) + " |"
        )  # fmt: skip
    return lines + [""] + targets(objects) + [""]


def targets(objects: int) -> list[str]:
    """The issue's targets, each measured: met or missed."""
    chance = 1 / objects
    by_steps = {s: sweep(objects, s) for s in STEPS}
    quality = {s: {r["loops"]: r["quality"] for r in by_steps[s]["records"]} for s in STEPS}
    bases = {s: {baseline_name(b): b["record"]["quality"] for b in by_steps[s]["baselines"]} for s in STEPS}
    at_n = max(v for t, v in quality[TRAINED].items() if t <= 2 * TRAINED)
    lines = []

    def check(label: str, ok: bool, detail: str) -> None:
        lines.append(f"* {label}: {'met' if ok else 'MISSED'} ({detail})")

    check(
        f"at {TRAINED} steps >= 0.99 at some loop count <= {2 * TRAINED}, above every baseline",
        at_n >= 0.99 and all(at_n > b for b in bases[TRAINED].values()),
        f"{at_n:.3f}; baselines " + ", ".join(f"{k} {v:.3f}" for k, v in bases[TRAINED].items()),
    )
    far = bases[2 * TRAINED]
    check(
        f"at {2 * TRAINED} steps every baseline within 0.15 of chance ({chance:.2f})",
        all(abs(v - chance) <= 0.15 for v in far.values()),
        ", ".join(f"{k} {v:.3f}" for k, v in far.items()),
    )
    drops = {s: max(quality[s].values()) - quality[s][128] for s in STEPS}
    check(
        "no overthinking: at every step count, 128 loops >= best - 0.01",
        all(d <= 0.01 for d in drops.values()),
        ", ".join(f"{s} steps: best {max(quality[s].values()):.3f}, 128 loops {quality[s][128]:.3f}" for s in STEPS),
    )
    firsts = [next((t for t in sorted(quality[s]) if quality[s][t] >= 0.95), None) for s in STEPS]
    check(
        "loops track difficulty: the fewest loops reaching 0.95 grows with the step count",
        all(f is not None for f in firsts) and firsts == sorted(firsts) and firsts[0] < firsts[-1],
        ", ".join(f"{s} steps: {f or 'never'}" for s, f in zip(STEPS, firsts, strict=True)),
    )
    need = 0.95 if objects == 3 else 0.9
    for factor in (2, 4):
        steps = factor * TRAINED
        best = max(v for t, v in quality[steps].items() if t <= 8 * TRAINED)
        check(
            f"extrapolation to {steps} steps: >= {need} at some loop count <= {8 * TRAINED}, baselines at chance",
            best >= need and all(abs(v - chance) <= 0.15 for v in bases[steps].values()),
            f"{best:.3f}; baselines " + ", ".join(f"{k} {v:.3f}" for k, v in bases[steps].items()),
        )
    return lines


def figure(objects_list: list[int]) -> Path:
    fig, axes = plt.subplots(1, len(objects_list), figsize=(6 * len(objects_list), 4.8), squeeze=False)
    styles = {"same layers once": ":", "non-tied stack": "--", "Llama": "-."}
    for ax, objects in zip(axes[0], objects_list, strict=True):
        for index, steps in enumerate(STEPS):
            result = sweep(objects, steps)
            colour = f"C{index}"
            loops = [r["loops"] for r in result["records"]]
            ax.plot(loops, [r["quality"] for r in result["records"]], "o-", color=colour, ms=3, label=f"{steps} steps")
            for base in result["baselines"]:
                label = baseline_name(base)
                ax.axhline(base["record"]["quality"], color=colour, ls=styles[label], lw=1, alpha=0.7)
        ax.axhline(1 / objects, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("loops")
        ax.set_ylabel("exact match")
        ax.set_ylim(0, 1.02)
        ax.set_title(
            f"{objects} objects, trained at 1-{TRAINED} steps; baselines in the step count's colour:\n"
            "once (dotted), non-tied stack (dashed), Llama (dash-dot); grey: chance",
            fontsize=9,
        )
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=4, fontsize=8)
    fig.tight_layout()
    path = HERE / "accuracy_vs_loops.png"
    fig.savefig(path, dpi=120)
    return path


def extra_tables() -> list[str]:
    lines = []
    for path in sorted(HERE.glob("halting_s*.json")):
        data = json.loads(path.read_text())
        lines += [
            f"### Halting ({path.stem}): generate(tol=...) at most {data['max_loops']} loops, one answer token",
            "",
            "| steps | fixed 128: exact match | " + " | ".join(
                f"tol {h['tol']:g}: exact match / loops per answer" for h in data["results"][0]["halting"]
            ) + " |",
            "|---|---|" + "---|" * len(data["results"][0]["halting"]),
        ]  # fmt: skip
        for item in data["results"]:
            cells = [f"{h['exact_match']:.3f} / {h['loops_per_answer']:.1f}" for h in item["halting"]]
            lines.append(f"| {item['steps']} | {item['fixed']['exact_match']:.3f} | " + " | ".join(cells) + " |")
        lines.append("")
    for path in sorted(HERE.glob("lm_eval_s*/results.json")):
        report = json.loads(path.read_text())
        tasks = sorted({t for run in report["runs"] for t in run["tasks"]}, key=lambda t: int(t.split("steps")[1]))
        lines += [
            f"### lm-eval ({path.parent.name}): acc of the shipped tasks, one trajectory per batch",
            "",
            "| loops | " + " | ".join(tasks) + " |",
            "|---|" + "---|" * len(tasks),
        ]
        for run in report["runs"]:
            lines.append(f"| {run['loops']} | " + " | ".join(f"{run['tasks'][t]['acc']:.3f}" for t in tasks) + " |")
        lines.append("")
    return lines


def main() -> None:
    objects_list = [o for o in (3, 5) if (HERE / f"s{o}_steps{STEPS[0]}").is_dir()]
    lines = ["# State tracking: results (written by summarise.py)", ""]
    for objects in objects_list:
        lines += table(objects)
    lines += extra_tables()
    (HERE / "summary.md").write_text("\n".join(lines) + "\n")
    figure(objects_list)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
