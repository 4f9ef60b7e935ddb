"""Tables of results/multihop/: exact match against loops per hop count, the baselines, and halting."""

import json
from pathlib import Path

ROOT = Path(__file__).parent


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def main() -> None:
    sweeps = sorted(ROOT.glob("hops*/results.json"), key=lambda p: int(p.parent.name[4:]))
    if not sweeps:
        raise SystemExit("no hops*/results.json yet: run results/multihop/run.sh")
    first = load(sweeps[0])
    loops = first["loops"]
    names = [b["name"] for b in first.get("baselines", [])]
    print("| hops | " + " | ".join(f"{k} loops" for k in loops) + " | " + " | ".join(names) + " |")
    print("|---" * (1 + len(loops) + len(names)) + "|")
    for path in sweeps:
        report = load(path)
        row = [f"{r['quality']:.3f}" for r in report["records"]]
        row += [f"{b['record']['quality']:.3f}" for b in report.get("baselines", [])]
        print(f"| {path.parent.name[4:]} | " + " | ".join(row) + " |")
    halting = sorted(ROOT.glob("halting/hops*/results.json"), key=lambda p: int(p.parent.name[4:]))
    if halting:
        print("\n| hops | tol | mean loops per answer | exact match (halting) |")
        print("|---|---|---|---|")
        for path in halting:
            report = load(path)
            record = report["records"][-1]
            tol, steps, quality = report["run"]["tol"], record["steps_mean"], record["quality"]
            print(f"| {path.parent.name[4:]} | {tol} | {steps:.2f} | {quality:.3f} |")


if __name__ == "__main__":
    main()
