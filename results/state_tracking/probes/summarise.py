"""The table of every probe (probes/*.json): per step count, the best exact match over loops 1..128, the fewest
loops that reach 0.95 (-: never), and the accuracy at 128 loops; the training time. Printed as Markdown."""

import json
from pathlib import Path

HERE = Path(__file__).parent


def row(result: dict) -> str:
    cells = []
    for steps, by_loops in result["accuracy"].items():
        best = max(by_loops.values())
        first = next((int(k) for k, v in by_loops.items() if v >= 0.95), None)
        cells.append(f"{best:.2f} / {first if first else '-'} / {by_loops['128']:.2f}")
        del steps
    overrides = " ".join(result["overrides"]) or "(recipe as is)"
    minutes = result["train"]["runtime_s"] / 60
    return (
        f"| {result['name']} | {Path(result['recipe']).stem} {overrides} | {minutes:.1f} | " + " | ".join(cells) + " |"
    )


def main() -> None:
    results = [json.loads(path.read_text()) for path in sorted(HERE.glob("*.json"))]
    steps = list(results[0]["accuracy"]) if results else []
    print("| probe | recipe and overrides | train min | " + " | ".join(f"steps {s}" for s in steps) + " |")
    print("|---|---|---|" + "---|" * len(steps))
    for result in results:
        print(row(result))


if __name__ == "__main__":
    main()
