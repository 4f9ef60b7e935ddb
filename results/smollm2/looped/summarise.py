"""Summarise the looped SmolLM2 against its references (README.md here): ``summary.json`` (the format the checks
read) and ``summary.md``, from the evaluations that run.sh writes.

    python results/smollm2/looped/summarise.py results/smollm2/looped
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

CORE = "12-19"
REPO = Path(__file__).resolve().parents[3]


def perplexity(path: Path) -> dict[str, float]:
    with path.open() as f:
        return {row["loops"]: float(row["quality"]) for row in csv.DictReader(f)}


def copy_loss(path: Path) -> dict[str, float]:
    (losses,) = json.loads(path.read_text())["losses"].values()
    return {loops: value["second_copy"] for loops, value in losses.items()}


def main(out: Path) -> None:
    original_copy = json.loads((REPO / "results/smollm2/multihop/induction.json").read_text())["losses"]
    summary = {
        "core": CORE,
        "perplexity": {
            "reference": perplexity(out / "reference/results.csv")["1"],
            "original": perplexity(REPO / "results/smollm2/original/results.csv")["1"],
            "looped": perplexity(out / "healed/results.csv"),
        },
        "copy_loss": {
            "original": original_copy["outputs/smollm2-full"]["1"]["second_copy"],
            "reference": copy_loss(out / "reference/copy.json")["1"],
            "looped": copy_loss(out / "healed/copy.json"),
        },
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    ppl, copy = summary["perplexity"], summary["copy_loss"]
    worst_ppl = max(ppl["looped"].values()) / ppl["reference"]
    worst_copy = max(copy["looped"].values()) / copy["original"]
    lines = [
        f"Core {CORE}; perplexity: original {ppl['original']:.2f}, reference {ppl['reference']:.2f}; "
        f"copy loss: original {copy['original']:.3f}, reference {copy['reference']:.3f}.",
        "",
        "| loops | perplexity | / reference | copy loss | / original |",
        "|---|---|---|---|---|",
    ]
    for loops, value in ppl["looped"].items():
        lines.append(
            f"| {loops} | {value:.2f} | {value / ppl['reference']:.3f} | {copy['looped'][loops]:.3f} | "
            f"{copy['looped'][loops] / copy['original']:.3f} |"
        )
    lines += [
        "",
        f"Worst over loops 1-{len(ppl['looped'])}: perplexity {worst_ppl:.3f}x the reference (target <= 1.05), "
        f"copy loss {worst_copy:.3f}x the original's (target <= 1.2).",
    ]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
