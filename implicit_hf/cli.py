"""``implicit-hf`` command line: ``train``, ``eval``, ``lm-eval``, ``lm-eval-data``, ``convert`` and the end-to-end
``demo``."""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path

DEMO_LOOPS = "1,2,4,8,16,32"


def demo_recipe() -> Path:
    """The small LP recipe the demo trains (shipped inside the package)."""
    return Path(str(resources.files("implicit_hf") / "recipes" / "lp_demo.yaml"))


def demo(out: Path, max_steps: int | None = None) -> dict:
    """Train a small implicit model on linear programs, sweep loop counts, write results and plots."""
    from .eval.harness import run_eval
    from .train import parse_args, train

    overrides = ["--output_dir", str(out / "train"), "--overwrite_output_dir", "true"]
    if max_steps is not None:
        overrides += ["--max_steps", str(max_steps)]
    config = parse_args([str(demo_recipe()), *overrides])
    print(f"[demo] training {config.task!r} for {config.max_steps} steps -> {out / 'train'}")
    train(config)
    model_dir = out / "train" / "model"
    print(f"[demo] sweeping loops {DEMO_LOOPS} on held-out LPs")
    results = run_eval(model_dir, config.task, DEMO_LOOPS, out / "eval", n=200, seed=1, batch_size=100)
    print(f"{'loops':>5} {'relative error':>15} {'Lipschitz':>10} {'rel. residual':>14}")
    for record in results["records"]:
        print(
            f"{record['loops']:>5} {record['quality']:>15.4f} {record['lipschitz']:>10.3g} "
            f"{record['rel_residual_mean']:>14.3e}"
        )
    plots = sorted((out / "eval").glob("*.png"))
    print("[demo] results: " + str(out / "eval" / "results.json"))
    print("[demo] plots:\n  " + "\n  ".join(str(p) for p in plots))
    return results


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="a Llama / Qwen2 / Mistral checkpoint directory (or hub id, where reachable)")
    parser.add_argument("output", type=Path, help="where the implicit checkpoint is written")
    parser.add_argument("--prelude", default="", help="source layers run once before the loop, e.g. '0-3'")
    parser.add_argument("--core", required=True, help="source layers of the weight-tied looped block, e.g. '4-25'")
    parser.add_argument("--coda", default="", help="source layers run once after the loop, e.g. '26-29'")
    parser.add_argument("--gguf-file", default=None, help="GGUF file inside SOURCE (loaded by transformers)")
    parser.add_argument("--injection", choices=("add", "linear"), default="add")
    parser.add_argument("--num-loops", type=int, default=1, help="default loop count stored in the config")
    parser.add_argument("--core-norm", action="store_true", help="RMSNorm after each core pass (changes outputs)")
    parser.add_argument(
        "--state-weight",
        type=float,
        default=None,
        help="inject A*z + (1-A)*e from the prelude state (linear injection): the first loop computes the source's "
        "layers, later loops contract towards a fixed point (A in [0, 1), e.g. 0.5; needs --injection linear)",
    )


def convert(args: argparse.Namespace) -> None:
    from .modeling.convert import convert_checkpoint, parse_layers

    model = convert_checkpoint(
        args.source,
        args.output,
        parse_layers(args.prelude),
        parse_layers(args.core),
        parse_layers(args.coda),
        gguf_file=args.gguf_file,
        injection=args.injection,
        num_loops=args.num_loops,
        core_norm=args.core_norm,
        state_weight=args.state_weight,
    )
    conversion = model.config.conversion
    print(
        f"[convert] {conversion['source']} ({conversion['source_model_type']}, {conversion['source_num_layers']} "
        f"layers) -> {args.output}: prelude {conversion['prelude_layers']}, core {conversion['core_layers']}, "
        f"coda {conversion['coda_layers']}, dropped {conversion['dropped_layers']}"
    )


def add_lm_eval_data_arguments(parser: argparse.ArgumentParser) -> None:
    from .eval.harness import _json_object

    parser.add_argument("task", choices=("multihop",), help="the task whose lm-eval data to write")
    parser.add_argument("--hops", default=None, help="comma-separated hop counts (default: every shipped task)")
    parser.add_argument("--n", type=int, default=500, help="documents per hop count")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--task-kwargs", type=_json_object, default={}, help="other MultiHopTask arguments (JSON)")
    parser.add_argument("--out", type=Path, default=None, help="folder (default: where the tasks look by default)")


def lm_eval_data(args: argparse.Namespace) -> list[Path]:
    """Write the data files of the package's lm-eval tasks ``multihop_hops{k}`` and print how to run them."""
    from .tasks.reasoning.lm_eval_tasks.multihop_data import default_data_dir
    from .tasks.reasoning.multihop import LM_EVAL_DIR, lm_eval_hops, write_lm_eval_data

    hops = lm_eval_hops() if args.hops is None else [int(k) for k in args.hops.split(",") if k.strip()]
    out = args.out or default_data_dir()
    try:
        paths = write_lm_eval_data(out, hops, n=args.n, seed=args.seed, **args.task_kwargs)
    except (TypeError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    print(f"[lm-eval-data] wrote {len(paths)} files to {out}")
    data = "" if args.out is None else f' --metadata \'{{"data_dir": "{out}"}}\''
    tasks = ",".join(f"multihop_hops{k}" for k in hops)
    print(
        "run them with: lm_eval --model hf --model_args pretrained=DIR,num_loops=K,trust_remote_code=True "
        f"--include_path {LM_EVAL_DIR} --tasks {tasks}{data}"
    )
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="implicit-hf", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "train",
        add_help=False,
        help="train on a task: implicit-hf train RECIPE.yaml [--key value ...] [--resume]",
    )
    from .eval.harness import add_arguments, run_from_args

    eval_parser = commands.add_parser("eval", help="score a trained model at many loop counts; write results and plots")
    add_arguments(eval_parser)
    from .eval import lm_eval_bridge

    lm_eval_bridge.add_arguments(
        commands.add_parser("lm-eval", help="run lm-evaluation-harness tasks at several loop counts; write plots")
    )
    add_lm_eval_data_arguments(
        commands.add_parser("lm-eval-data", help="write the data files of the lm-eval tasks this package ships")
    )
    add_convert_arguments(
        commands.add_parser("convert", help="turn a pretrained Llama-family checkpoint into an implicit one")
    )
    demo_parser = commands.add_parser("demo", help="end to end: train a small LP model, sweep loops, write plots")
    demo_parser.add_argument("--out", type=Path, default=Path("outputs/demo"), help="output folder")
    demo_parser.add_argument("--max-steps", type=int, default=None, help="override the recipe's training steps")
    args, rest = parser.parse_known_args(argv)
    if args.command == "train":
        from .train import main as train_main

        train_main(rest)
        return
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "eval":
        run_from_args(args)
    elif args.command == "lm-eval":
        lm_eval_bridge.run_from_args(args)
    elif args.command == "lm-eval-data":
        lm_eval_data(args)
    elif args.command == "convert":
        convert(args)
    elif args.command == "demo":
        demo(args.out, args.max_steps)


if __name__ == "__main__":
    main()
