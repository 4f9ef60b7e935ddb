"""The options of the ``implicit-hf`` commands, and the error a command raises for bad user input.

Pure Python: defining and parsing them imports neither torch nor transformers, so ``implicit-hf --help``
stays fast. `implicit_hf.cli` builds its parser from these functions; the evaluation modules use the same
definitions for their own ``add_arguments`` (``python -m implicit_hf.eval.harness``, `lm_eval_bridge.add_arguments`).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .loop_counts import DEFAULT_MAX_LOOPS, LoopCounts, parse_loops
from .tasks import BUILTIN_TASK_MODULES  # the names of the built-in tasks: importing it imports no torch

DEFAULT_LOOPS = "1,2,4,8,16,32,64"
LM_EVAL_LOOPS = "1,2,4,8,16"


class UsageError(ValueError):
    """A user error found at the edge of a command (a path, an option value, a task that does not fit the
    model): `main` prints its message on one line and exits with status 2."""


# --------------------------------------------------------------------------------------------------
# Values of options (pure Python: parsing imports nothing heavy)


LOOP_BOUND = f"at most {DEFAULT_MAX_LOOPS} unless the environment variable IMPLICIT_HF_MAX_LOOPS says otherwise"


def loops_argument(value: str) -> LoopCounts:
    """argparse type of ``--loops``: `parse_loops`."""
    try:
        return parse_loops(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def json_object(value: str) -> dict[str, Any]:
    """argparse type of a JSON-object option (``--task-kwargs '{"size": 8}'``)."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"must be a JSON object; {error}") from None
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object like '{{\"size\": 8}}'; got {value!r}")
    return parsed


def _integer_at_least(minimum: int) -> Callable[[str], int]:
    def convert(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            number = None
        if number is None or number < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}; got {value!r}")
        return number

    return convert


def _number(minimum: float, inclusive: bool = True) -> Callable[[str], float]:
    """argparse type of a finite number ``>= minimum`` (``> minimum`` unless ``inclusive``): ``inf`` and ``nan``
    parse as floats but are refused (a tolerance of ``inf`` would stop every loop at once)."""

    def convert(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            number = None
        if number is None or not math.isfinite(number) or not (number >= minimum if inclusive else number > minimum):
            raise argparse.ArgumentTypeError(
                f"must be a number {'>=' if inclusive else '>'} {minimum:g}; got {value!r}"
            )
        return number

    return convert


def _distinct_counts(value: str) -> list[int]:
    counts = _counts(value)
    if len(set(counts)) != len(counts):
        raise argparse.ArgumentTypeError(f"must be distinct integers >= 1 ('1,4,16'); got {value!r}")
    return counts


def _counts(value: str) -> list[int]:
    try:
        counts = [int(k) for k in value.split(",") if k.strip()]
    except ValueError:
        counts = []
    if not counts or any(k < 1 for k in counts):
        raise argparse.ArgumentTypeError(f"must be comma-separated integers >= 1 ('1,2,4'); got {value!r}")
    return counts


# --------------------------------------------------------------------------------------------------
# The parser


class OptionParser(argparse.ArgumentParser):
    """An `argparse.ArgumentParser` that takes every ``--dashed-option`` spelt with underscores too (and the
    other way round): ``--max_steps 3`` is ``--max-steps 3``."""

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None):
        if args is not None:
            args = [self._canonical(arg) for arg in args]
        return super().parse_known_args(args, namespace)

    def _canonical(self, arg: str) -> str:
        if not arg.startswith("--") or arg == "--":
            return arg
        name, equals, value = arg.partition("=")
        if name in self._option_string_actions:
            return arg
        for spelling in ("--" + name[2:].replace("_", "-"), "--" + name[2:].replace("-", "_")):
            if spelling in self._option_string_actions:
                return spelling + equals + value
        return arg


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``implicit-hf eval`` options (also `implicit_hf.eval.harness.add_arguments`)."""
    tasks = ", ".join(sorted(BUILTIN_TASK_MODULES))
    parser.add_argument("--model", required=True, help="checkpoint folder (save_pretrained)")
    parser.add_argument(
        "--task",
        default=None,
        help=f"task to score on: {tasks} (default: the task recorded with the model by implicit-hf train)",
    )
    parser.add_argument(
        "--loops",
        type=loops_argument,
        default=parse_loops(DEFAULT_LOOPS),
        help=f"loop counts: '1,2,4,8', '1-8', '1-64:2' or '1,2,4-8' (default {DEFAULT_LOOPS}; {LOOP_BOUND})",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder for results.json/csv and plots")
    parser.add_argument("--n", type=_integer_at_least(1), default=200, help="test samples (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the test split and the perturbation (default 0)")
    parser.add_argument(
        "--batch-size", type=_integer_at_least(1), default=64, help="samples per forward pass (default 64)"
    )
    parser.add_argument(
        "--perturb-eps", type=_number(0), default=1e-4, help="perturbation size of the Lipschitz probe; 0 skips it"
    )
    parser.add_argument(
        "--baseline",
        action="append",
        default=[],
        help="explicit baseline checkpoint, evaluated at its own num_loops (repeat for several); for a causal-LM "
        "task also a plain transformers causal LM (e.g. a LlamaForCausalLM), run once",
    )
    parser.add_argument(
        "--task-kwargs",
        type=json_object,
        default=None,
        help="JSON object of task constructor args (default: those the model was trained with, for its own task)",
    )
    parser.add_argument(
        "--keep-tol", action="store_true", help="keep the model's halting tolerance (default: exactly K iterations)"
    )
    parser.add_argument(
        "--tol",
        type=_number(0, inclusive=False),
        default=None,
        help="halt each sample at this relative-residual tolerance (implies --keep-tol)",
    )
    parser.add_argument(
        "--trajectories",
        type=_distinct_counts,
        default=[1],
        help="trajectories per input, K: '1,4,16,64' scores every (loops, K) pair from one run per K (default 1)",
    )
    parser.add_argument(
        "--trajectory-noise",
        type=_number(0),
        default=0.0,
        help="noise of each trajectory's start, relative to the state's RMS (default 0)",
    )
    parser.add_argument(
        "--select",
        choices=("residual", "vote", "mean", "random"),
        default="residual",
        help="how K trajectories reduce to one answer (default residual: the lowest final residual)",
    )
    parser.add_argument(
        "--trajectory-batch-size",
        type=_integer_at_least(1),
        default=None,
        help="solve at most this many trajectory rows at once (default: a batch's K x batch-size rows together)",
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda when available)")
    parser.add_argument("--no-plots", action="store_true", help="write results.json/csv only")
    parser.add_argument(
        "--model-card",
        action="store_true",
        help="also store the sweep in the model folder and add its table to the model card (README.md)",
    )
    return parser


def add_lm_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``implicit-hf lm-eval`` options (also `implicit_hf.eval.lm_eval_bridge.add_arguments`)."""
    parser.add_argument("--model", required=True, help="an implicit causal-LM checkpoint directory (with tokenizer)")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-evaluation-harness task names")
    parser.add_argument(
        "--loops",
        type=loops_argument,
        default=parse_loops(LM_EVAL_LOOPS),
        help=f"loop counts, e.g. '1,2,4,8' or '1-8' (default {LM_EVAL_LOOPS}; {LOOP_BOUND})",
    )
    parser.add_argument("--include-path", default=None, help="folder of extra task YAML files (local tasks)")
    parser.add_argument("--batch-size", type=_integer_at_least(1), default=8, help="lm-eval batch size (default 8)")
    parser.add_argument(
        "--limit", type=_number(0, inclusive=False), default=None, help="documents per task (lm_eval's --limit)"
    )
    parser.add_argument("--num-fewshot", type=_integer_at_least(0), default=None, help="few-shot examples per prompt")
    parser.add_argument("--device", default="cpu", help="torch device to run on, e.g. cpu or cuda (default cpu)")
    parser.add_argument("--metadata", type=json_object, default=None, help="lm-eval's --metadata (a JSON object)")
    trajectories = "default: the checkpoint's config"
    parser.add_argument(
        "--num-trajectories",
        type=_integer_at_least(1),
        default=None,
        help=f"trajectories per input for loglikelihood requests ({trajectories}, 1; generation needs 1)",
    )
    parser.add_argument(
        "--trajectory-noise",
        type=_number(0),
        default=None,
        help=f"their starting noise, x the state's RMS ({trajectories})",
    )
    parser.add_argument("--select", default=None, help=f"their reduction: residual, vote or random ({trajectories})")
    parser.add_argument(
        "--trajectory-seed", type=_integer_at_least(0), default=None, help=f"noise seed ({trajectories})"
    )
    parser.add_argument(
        "--trajectory-batch-size",
        type=_integer_at_least(1),
        default=None,
        help=f"rows (inputs x trajectories) solved at once ({trajectories})",
    )
    parser.add_argument(
        "--per-count-passes",
        action="store_true",
        help="one full lm-eval pass per loop count instead of scoring every count from one trajectory",
    )
    parser.add_argument(
        "--log-samples",
        action="store_true",
        help="also write lm-eval's per-document records, samples_loops{K}.json per loop count",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("outputs/lm_eval"), help="output folder (default outputs/lm_eval)"
    )
    return parser


# the tasks whose lm-eval data `implicit-hf lm-eval-data` writes, and the option that lists their counts
LM_EVAL_DATA_TASKS = {"multihop": "hops", "state_tracking": "steps"}


def add_lm_eval_data_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("task", choices=LM_EVAL_DATA_TASKS, help="the task whose lm-eval data to write")
    parser.add_argument(
        "--hops", type=_counts, default=None, help="multihop: comma-separated hop counts (default: every shipped task)"
    )
    parser.add_argument(
        "--steps",
        type=_counts,
        default=None,
        help="state_tracking: comma-separated step counts (default: every shipped task)",
    )
    parser.add_argument("--n", type=_integer_at_least(1), default=500, help="documents per task")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated documents (default 0)")
    parser.add_argument(
        "--task-kwargs",
        type=json_object,
        default={},
        help="other arguments of the task's constructor (JSON), e.g. '{\"objects\": 5}' for state_tracking",
    )
    parser.add_argument("--out", type=Path, default=None, help="folder (default: where the tasks look by default)")
    return parser


def add_convert_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("source", help="a Llama / Qwen2 / Mistral checkpoint directory (or hub id, where reachable)")
    parser.add_argument("output", type=Path, help="where the implicit checkpoint is written")
    parser.add_argument(
        "--prelude",
        default=None,
        help="source layers run once before the loop, e.g. '0-3' (default: none; with --no-drop every layer before "
        "the core)",
    )
    parser.add_argument("--core", required=True, help="source layers of the weight-tied looped block, e.g. '4-25'")
    parser.add_argument(
        "--coda",
        default=None,
        help="source layers run once after the loop, e.g. '26-29' (default: none; with --no-drop every layer after "
        "the core)",
    )
    parser.add_argument(
        "--no-drop",
        action="store_true",
        help="keep every source layer: refuse a split that leaves a gap; one loop then computes the source exactly",
    )
    parser.add_argument("--gguf-file", default=None, help="GGUF file inside SOURCE (loaded by transformers)")
    parser.add_argument(
        "--injection",
        choices=("add", "linear"),
        default="add",
        help="how the prelude output enters every loop: add (z + e) or linear (a linear map of [z; e]; default add)",
    )
    parser.add_argument(
        "--num-loops", type=_integer_at_least(1), default=1, help="default loop count stored in the config"
    )
    parser.add_argument("--core-norm", action="store_true", help="RMSNorm after each core pass (changes outputs)")
    parser.add_argument(
        "--loop-shift",
        type=_integer_at_least(0),
        default=0,
        help="the loop's token shift of kernel K (0-4; its projection starts at zero, so one loop is still the "
        "source model; default 0)",
    )
    parser.add_argument(
        "--state-weight",
        type=float,
        default=None,
        help="inject A*z + (1-A)*e from the prelude state (linear injection): the first loop computes the source's "
        "layers, later loops contract towards a fixed point (A in [0, 1), e.g. 0.5; needs --injection linear)",
    )
    return parser


def add_demo_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"), help="output folder (default outputs/demo)")
    parser.add_argument(
        "--max-steps", type=_integer_at_least(1), default=None, help="override the recipe's training steps"
    )
    return parser
