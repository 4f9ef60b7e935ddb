"""``implicit-hf`` command line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def demo(out: Path, seed: int) -> dict:
    """Build a tiny implicit LM, save and reload it with the Auto classes, and sweep loop counts.

    Prints, per solver and loop count, the relative residual of the state and how far the logits
    still move from one loop count to the next; writes the same table to ``out/demo.json``.
    """
    from transformers import AutoModelForCausalLM

    from . import ImplicitConfig

    torch.manual_seed(seed)
    config = ImplicitConfig(
        vocab_size=256,
        hidden_size=64,
        num_attention_heads=4,
        num_prelude_layers=1,
        num_core_layers=1,
        num_coda_layers=1,
    )
    model = AutoModelForCausalLM.from_config(config)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / "tiny-implicit-lm"
    model.save_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    input_ids = torch.randint(0, config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(seed))

    rows = []
    print(f"checkpoint: {checkpoint}")
    print(f"{'solver':>9} {'loops':>5} {'rel. residual':>14} {'max |dlogits|':>14}")
    for solver in ("picard", "anderson"):
        previous = None
        for loops in (1, 2, 4, 8, 16, 32, 64):
            with torch.no_grad():
                output = model(input_ids, num_loops=loops, solver=solver)
            residual = float(output.loop_stats.final_rel_residual.max())
            change = float("nan") if previous is None else float((output.logits - previous).abs().max())
            previous = output.logits
            rows.append({"solver": solver, "loops": loops, "rel_residual": residual, "max_logit_change": change})
            print(f"{solver:>9} {loops:>5} {residual:>14.3e} {change:>14.3e}")
    (out / "demo.json").write_text(json.dumps(rows, indent=2))
    print(f"wrote {out / 'demo.json'}")
    return {"rows": rows, "checkpoint": str(checkpoint)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="implicit-hf", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help="tiny end-to-end example: build, save, load, sweep loop counts")
    demo_parser.add_argument("--out", type=Path, default=Path("outputs/demo"), help="output folder")
    demo_parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo(args.out, args.seed)


if __name__ == "__main__":
    main()
