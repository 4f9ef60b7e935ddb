"""Markdown table of held-out perplexity against loops for the probe heals in this folder (and the
full heal): best perplexity, its loop count, and perplexity at 24 loops (4x the largest training count, 6)
relative to the best (the flatness target is <= 1.02). Usage: python summarise.py DIR [DIR ...]"""

import csv
import json
import sys
from pathlib import Path

ORIGINAL = 38.34  # results/smollm2/original: the 30-layer model on the same 100 windows


def row(folder: Path) -> str:
    records = list(csv.DictReader((folder / "results.csv").open()))
    ppl = {int(r["loops"]): float(r["quality"]) for r in records}
    best_loops = min(ppl, key=ppl.get)
    best, last = ppl[best_loops], max(ppl)
    config = json.loads((folder / "train_config.json").read_text()) if (folder / "train_config.json").is_file() else {}
    seconds = (
        json.loads((folder / "metrics.json").read_text()).get("runtime_s")
        if (folder / "metrics.json").is_file()
        else None
    )
    cells = " | ".join(f"{ppl[k]:,.1f}" for k in sorted(ppl))
    minutes = f"{seconds / 60:.1f}" if seconds else ""
    return (
        f"| {folder.name} | {cells} | {best:.1f} ({best / ORIGINAL:.2f}x) at {best_loops} | "
        f"{ppl[last] / best:.3f} | {config.get('max_steps', '')} | {minutes} |"
    )


folders = [Path(p) for p in sys.argv[1:]]
loops = sorted(int(r["loops"]) for r in csv.DictReader((folders[0] / "results.csv").open()))
print(
    "| run | " + " | ".join(str(k) for k in loops) + " | best (x original) at loops | last / best | steps | train min |"
)
print("|---" * (len(loops) + 5) + "|")
for folder in folders:
    print(row(folder))
