"""Markdown table of the core probes (run.sh): held-out perplexity and copy loss against loops, before and
after the short heal, for every core folder given. Usage: python summarise.py DIR [DIR ...]"""

import csv
import json
import sys
from pathlib import Path

ORIGINAL_PERPLEXITY = 38.34  # results/smollm2/original: the 30-layer model on the same 100 windows
ORIGINAL_COPY = 2.487  # results/smollm2/multihop/induction.json: second-copy loss of the 30-layer model


def perplexity(folder: Path) -> dict[int, float]:
    return {int(r["loops"]): float(r["quality"]) for r in csv.DictReader((folder / "results.csv").open())}


def copy_loss(path: Path) -> dict[int, float]:
    (losses,) = json.loads(path.read_text())["losses"].values()
    return {int(k): v["second_copy"] for k, v in losses.items()}


def cells(values: dict[int, float], loops: list[int]) -> str:
    return " | ".join(f"{values[k]:.2f}" if k in values else "" for k in loops)


def main(folders: list[Path]) -> None:
    loops = sorted(perplexity(folders[0]))
    copy_loops = sorted(copy_loss(folders[0] / "copy.json"))
    print(f"Perplexity (original {ORIGINAL_PERPLEXITY}) and copy loss (original {ORIGINAL_COPY}) against loops.\n")
    header = [f"ppl {k}" for k in loops] + [f"copy {k}" for k in copy_loops]
    print("| core | healed | " + " | ".join(header) + " | train min |")
    print("|---" * (len(loops) + len(copy_loops) + 3) + "|")
    for folder in folders:
        for healed, where in (("no", folder / "unhealed"), ("yes", folder)):
            config = json.loads((folder / "train_config.json").read_text())
            seconds = json.loads((folder / "metrics.json").read_text()).get("runtime_s") if healed == "yes" else None
            core = json.loads(Path(config["init_from"], "config.json").read_text())["conversion"]["core_layers"]
            print(
                f"| {folder.name} ({core[0]}-{core[-1]}) | {healed} | {cells(perplexity(where), loops)} | "
                f"{cells(copy_loss(where / 'copy.json'), copy_loops)} | {f'{seconds / 60:.1f}' if seconds else ''} |"
            )


if __name__ == "__main__":
    main([Path(p) for p in sys.argv[1:]])
