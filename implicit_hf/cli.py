"""``implicit-hf`` command line: ``train``, ``eval``, ``lm-eval``, ``lm-eval-data``, ``convert`` and the end-to-end
``demo``.

The command line is parsed before anything heavy is imported: ``implicit-hf --help`` and every
``implicit-hf COMMAND --help`` import neither torch nor transformers. Options may be spelt with dashes or
underscores (``--max-steps`` or ``--max_steps``), in every command.

User errors are reported on one line, ``implicit-hf COMMAND: error: MESSAGE``, with exit status 2 and no
traceback (set ``IMPLICIT_HF_TRACEBACK=1`` to see one): a `UsageError` (a path, an option value, a task that
does not fit the model, found at the edge of a command), a `RecipeError` (an invalid recipe), a
`TaskSettingError` (a task setting the task refuses) and an ``OSError`` (a file or folder that cannot be read
or written: a missing corpus, a truncated checkpoint, a folder without a tokenizer). Anything else is a bug and
shows its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .arguments import (
    OptionParser,
    UsageError,
    add_convert_arguments,
    add_demo_arguments,
    add_eval_arguments,
    add_lm_eval_arguments,
    add_lm_eval_data_arguments,
)
from .checks import TaskSettingError
from .training.recipe import RecipeError, usage

TRACEBACK_ENV = "IMPLICIT_HF_TRACEBACK"


def build_parser() -> argparse.ArgumentParser:
    """The ``implicit-hf`` parser with every subcommand (imports nothing heavy)."""
    parser = OptionParser(
        prog="implicit-hf",
        description="Train, evaluate and convert implicit (looped, weight-tied) transformers.",
        epilog="Options may be spelt with dashes or underscores (--max-steps, --max_steps). "
        "Run implicit-hf COMMAND --help for a command's options.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=OptionParser)
    commands.add_parser(
        "train",
        add_help=False,
        help="train on a task: implicit-hf train RECIPE.yaml [--key value ...] [--resume] (--help: every recipe key)",
    )
    add_eval_arguments(
        commands.add_parser(
            "eval",
            help="score a trained model at many loop counts; write results and plots",
            description="Score an implicit model at many loop counts from one trajectory run.",
        )
    )
    add_lm_eval_arguments(
        commands.add_parser("lm-eval", help="run lm-evaluation-harness tasks at several loop counts; write plots")
    )
    add_lm_eval_data_arguments(
        commands.add_parser("lm-eval-data", help="write the data files of the lm-eval tasks this package ships")
    )
    add_convert_arguments(
        commands.add_parser("convert", help="turn a pretrained Llama-family checkpoint into an implicit one")
    )
    add_demo_arguments(commands.add_parser("demo", help="end to end: train a small LP model, sweep loops, write plots"))
    return parser


# --------------------------------------------------------------------------------------------------
# The commands: each imports its module (`implicit_hf.commands`, `implicit_hf.training.loop`) once parsed


def train_command(rest: list[str]) -> Any:
    """``implicit-hf train RECIPE.yaml [--key value ...] [--resume]`` (recipe errors: `RecipeError`)."""
    from .training import loop

    return loop.train(loop.parse_args(rest))


def eval_command(args: argparse.Namespace) -> dict[str, Any]:
    """``implicit-hf eval`` (`implicit_hf.commands.evaluate`)."""
    from .commands import evaluate

    return evaluate.run(args)


def lm_eval_command(args: argparse.Namespace) -> dict[str, Any]:
    """``implicit-hf lm-eval`` (`implicit_hf.commands.lm_eval`)."""
    from .commands import lm_eval

    return lm_eval.run(args)


def lm_eval_data_command(args: argparse.Namespace) -> list[Path]:
    """``implicit-hf lm-eval-data`` (`implicit_hf.commands.lm_eval_data`)."""
    from .commands import lm_eval_data

    return lm_eval_data.run(args)


def convert_command(args: argparse.Namespace) -> None:
    """``implicit-hf convert`` (`implicit_hf.commands.convert`)."""
    from .commands import convert

    convert.run(args)


def demo_command(args: argparse.Namespace) -> dict[str, Any]:
    """``implicit-hf demo`` (`implicit_hf.commands.demo`)."""
    from .commands import demo

    return demo.demo(args.out, args.max_steps)


COMMANDS: dict[str, Callable[[argparse.Namespace], Any]] = {
    "eval": eval_command,
    "lm-eval": lm_eval_command,
    "lm-eval-data": lm_eval_data_command,
    "convert": convert_command,
    "demo": demo_command,
}


def _one_line(err: BaseException) -> str:
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__


def main(argv: list[str] | None = None) -> None:
    """Parse ``argv``, then import and run the command; user errors exit with status 2 and a one-line message."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    command = args.command
    if rest and command != "train":
        subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        subparsers.choices[command].error(f"unrecognized arguments: {' '.join(rest)}")
    if command == "train" and (not rest or rest[0] in ("-h", "--help")):
        print(usage("implicit-hf train"))
        raise SystemExit(0 if rest else 2)
    try:
        if command == "train":
            train_command(rest)
        else:
            COMMANDS[command](args)
    except (UsageError, RecipeError, TaskSettingError, OSError) as err:
        if os.environ.get(TRACEBACK_ENV):
            raise
        print(f"implicit-hf {command}: error: {_one_line(err)}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
