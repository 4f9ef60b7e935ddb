"""The table of every probe (probes/*.json): per step count, the best exact match over loops 1..128, the fewest
loops that reach 0.95 (-: never), and the accuracy at 128 loops; the training time (minutes, and milliseconds per
step: the train-step cost of a gradient mode or schedule) and the held-out loss. Printed as Markdown."""

import json
from pathlib import Path

HERE = Path(__file__).parent


def row(result: dict) -> str:
    cells = []
    for by_loops in result["accuracy"].values():
        best = max(by_loops.values())
        first = next((int(k) for k, v in by_loops.items() if v >= 0.95), None)
        cells.append(f"{best:.2f} / {first if first else '-'} / {by_loops['128']:.2f}")
    overrides = " ".join(result["overrides"]) or "(recipe as is)"
    train = result["train"]
    minutes, per_step = train["runtime_s"] / 60, train["runtime_s"] / train["step"]
    return (
        f"| {result['name']} | {Path(result['recipe']).stem} {overrides} | {minutes:.1f} | {per_step * 1000:.0f} | "
        f"{train['eval/loss']:.2g} | " + " | ".join(cells) + " |"
    )


def main() -> None:
    results = [json.loads(path.read_text()) for path in sorted(HERE.glob("*.json"))]
    steps = list(results[0]["accuracy"]) if results else []
    print(
        "| probe | recipe and overrides | train min | ms/step | held-out loss | "
        + " | ".join(f"{s} steps: best / loops to 0.95 / at 128" for s in steps)
        + " |"
    )
    print("|---|---|---|---|---|" + "---|" * len(steps))
    for result in results:
        print(row(result))


if __name__ == "__main__":
    main()
