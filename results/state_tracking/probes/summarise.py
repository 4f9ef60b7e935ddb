"""The table of every probe (probes/*.json): per step count, the best exact match over loops 1..128, the fewest
loops that reach 0.95 (-: never), and the accuracy at 128 loops; the training time (minutes, and milliseconds per
step: the train-step cost of a gradient mode or schedule) and the held-out loss. Printed as Markdown."""

import json
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parents[2]


def flat(config: dict, prefix: str = "") -> dict:
    """A recipe as ``{"model.hidden_size": 64, ...}``."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and key != "loop_schedule":
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def settings(result: dict) -> str:
    """What this probe's resolved recipe changes from the task's recipe as committed now (run-specific keys
    left out), and the shift's initialisation where it was not the identity."""
    import dataclasses

    from implicit_hf.training.recipe import parse_args

    objects = result["train_config"]["task_kwargs"].get("objects") or 3
    current = parse_args([str(ROOT / f"configs/recipes/state_tracking_s{objects}_implicit.yaml")])
    base = dataclasses.asdict(current)
    if current.loop_schedule is not None:  # as a recipe writes it: the distribution and the fields set otherwise
        defaults = {spec.name: spec.default for spec in dataclasses.fields(current.loop_schedule)}
        base["loop_schedule"] = {
            k: v for k, v in base["loop_schedule"].items() if k == "distribution" or v != defaults[k]
        }
    mine, base = flat(result["train_config"]), flat(base)
    ignored = ("output_dir", "overwrite_output_dir", "resume", "checkpoint_every", "eval_every")
    changed = [
        f"{key}={mine.get(key)}"
        for key in sorted(set(mine) | set(base))
        if key not in ignored
        and mine.get(key) != base.get(key)
        and not (mine.get(key) in ({}, None) and key not in base)
    ]
    if result["shift_init"] != "identity":
        changed.append(f"shift projection initialised {result['shift_init']}")
    return f"s{objects} " + (", ".join(changed) or "(the recipe)")


def row(result: dict) -> str:
    cells = []
    for by_loops in result["accuracy"].values():
        best = max(by_loops.values())
        first = next((int(k) for k, v in by_loops.items() if v >= 0.95), None)
        cells.append(f"{best:.2f} / {first if first else '-'} / {by_loops['128']:.2f}")
    train = result["train"]
    minutes, per_step = train["runtime_s"] / 60, train["runtime_s"] / train["step"]
    return (
        f"| {result['name']} | {settings(result)} | {minutes:.1f} | {per_step * 1000:.0f} | "
        f"{train['eval/loss']:.2g} | " + " | ".join(cells) + " |"
    )


def main() -> None:
    results = [json.loads(path.read_text()) for path in sorted(HERE.glob("*.json"))]
    steps = list(results[0]["accuracy"]) if results else []
    print(
        "| probe | settings (against the committed recipe) | train min | ms/step | held-out loss | "
        + " | ".join(f"{s} steps: best / loops to 0.95 / at 128" for s in steps)
        + " |"
    )
    print("|---|---|---|---|---|" + "---|" * len(steps))
    for result in results:
        print(row(result))


if __name__ == "__main__":
    main()
