"""A state-tracking probe: train a recipe with overrides (implicit-hf train), sweep loops at several step counts on
the selection split (implicit-hf eval, test rows of seed 1: the reported results use seed 0), and write
probes/NAME.json. Run from the repository root, one thread per probe (two probes at once on 2 cores):

    OMP_NUM_THREADS=1 python results/state_tracking/probes/probe.py NAME RECIPE.yaml [--key value ...]

`summarise.py` turns every probes/*.json into the table of probes/README.md.
"""

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
LOOPS = "1,2,4,6,8,12,16,24,32,48,64,96,128"
STEPS = (4, 8, 16, 32)
SELECTION_SEED = 1


def main(argv: list[str]) -> None:
    name, recipe, overrides = argv[0], argv[1], argv[2:]
    out = Path("outputs/state_tracking/probes") / name
    subprocess.run(
        ["implicit-hf", "train", recipe, "--output_dir", str(out), "--overwrite_output_dir", "true", *overrides],
        check=True,
    )
    record = json.loads((out / "model" / "implicit_task.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    config = json.loads((out / "train_config.json").read_text())
    result = {
        "name": name,
        "recipe": recipe,
        "overrides": overrides,
        "train_config": config,
        "shift_init": "identity",
        "train": metrics,
        "accuracy": {},
    }
    for steps in STEPS:
        kwargs = {**record["task_kwargs"], "steps": steps}
        folder = out / f"eval_steps{steps}"
        subprocess.run(
            ["implicit-hf", "eval", "--model", str(out / "model"), "--loops", LOOPS, "--n", "200", "--seed",
             str(SELECTION_SEED), "--perturb-eps", "0", "--no-plots", "--task-kwargs", json.dumps(kwargs),
             "--out", str(folder)],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        records = json.loads((folder / "results.json").read_text())["records"]
        result["accuracy"][steps] = {r["loops"]: r["quality"] for r in records}
    (HERE / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
