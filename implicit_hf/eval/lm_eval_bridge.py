"""lm-evaluation-harness on an implicit LM, at several loop counts.

``lm_eval`` needs nothing special: the loop count is a config field, and transformers' loader applies
``from_pretrained`` keyword arguments that name config fields, so

    lm_eval --model hf --model_args pretrained=DIR,num_loops=16,trust_remote_code=True --tasks ...

runs the checkpoint at 16 loops, also for generation (a ``num_loops`` in the checkpoint's generation_config.json
gives way to the keyword; ``trust_remote_code=True`` because the ``lm_eval`` process does not import
``implicit_hf``; the checkpoint carries its code). The trajectories per input are config fields too:
``--model_args pretrained=DIR,num_trajectories=4,trajectory_noise=0.1,select=residual`` scores every loglikelihood
request with 4 trajectories (lm-eval's generation asks for a KV cache, which several trajectories cannot use, and is
refused); `lm_eval_sweep` takes them as ``trajectories``. `lm_eval_sweep` runs a list of loop counts in
one process: the model is loaded once, and loglikelihood-type requests (multiple choice, perplexity)
are scored at EVERY count from one trajectory per batch (`LoopSweepLM`: the model decodes the head
after each requested iteration of one run at the largest count), so a sweep costs about one pass at
its largest count instead of one pass per count. Generation (``generate_until``) cannot share a
trajectory and runs once per count. It writes ``results.json``, ``results.csv``, one
quality-vs-loops plot per task metric and, for a metric several tasks share (e.g. ``acc`` of
``multihop_hops4``, ``multihop_hops8``, ...), one plot with a line per task.

This module imports ``lm_eval`` (the optional extra ``implicit-hf[lm-eval]``): nothing imports it with the package,
and ``implicit-hf lm-eval`` checks that lm_eval is installed before importing it.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import difflib
import json
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import lm_eval
import torch
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from ..arguments import UsageError, add_lm_eval_arguments
from ..loop_counts import LoopCounts, normalise_loops
from ..modeling.configuration_implicit import PER_CALL_TRAJECTORY_FIELDS, refuse_unknown_keywords
from ..modeling.trajectories import check_select
from ..tasks.generation import load_tokenizer
from ..tasks.models import load_model
from .plots import plot_quality_vs_loops, plot_tasks_vs_loops
from .records import environment

# lm_eval metrics where lower is better (everything else it reports is higher-is-better)
LOWER_IS_BETTER = ("perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte", "ter")


def _metrics(task_results: dict[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
    """``{"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": ..., "sample_len": 20}`` -> ``({"acc": 0.5},
    {"acc": 0.1})``: the metrics and their standard errors (where lm-eval gives a number)."""
    metrics, stderr = {}, {}
    for key, value in task_results.items():
        name = key.split(",")[0]
        if name == "sample_len" or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if name.endswith("_stderr"):
            stderr[name.removesuffix("_stderr")] = float(value)
        else:
            metrics[name] = float(value)
    return metrics, stderr


class LoopSweepLM(HFLM):
    """An `HFLM` that scores loglikelihood requests at every count of ``loops`` from one trajectory per batch.

    ``loop_count`` chooses which count's scores the loglikelihood methods return and the count that
    generation runs at. The first request for a batch of contexts runs the model once at
    ``max(loops)`` with ``trajectory_loops=loops`` and lm-eval's own scoring code once per count on
    those logits; the scores of every count are kept, so evaluating the same requests at the other
    counts costs no model call.
    """

    def __init__(self, loops: LoopCounts, **kwargs: Any):
        super().__init__(**kwargs)
        self.loops = loops
        self._scores: dict[tuple, dict[int, tuple[float, bool]]] = {}
        self._scoring: int | None = None  # the count whose logits _model_call returns while scoring
        self._trajectory: tuple[torch.Tensor, dict[int, torch.Tensor]] | None = None
        self.loop_count = self.loops[-1]

    @property
    def loop_count(self) -> int:
        return self.model.config.num_loops

    @loop_count.setter
    def loop_count(self, count: int) -> None:
        """Score and generate at ``count``, one of ``loops``."""
        _set_loop_count(self.model, count)  # what generate_until runs at

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        if self._scoring is None:
            return super()._model_call(inps, attn_mask, labels)
        if self._trajectory is None or not torch.equal(self._trajectory[0], inps):
            autocast = torch.autocast(
                device_type=self.device.type,
                dtype=self.mixed_precision_dtype,
                enabled=self.mixed_precision_dtype is not None,
            )
            with torch.no_grad(), autocast:
                out = self.model(
                    inps,
                    num_loops=max(self.loops),
                    return_trajectory=True,
                    trajectory_loops=self.loops,
                    use_cache=False,
                )
            self._trajectory = (inps, dict(zip(self.loops, out.trajectory, strict=True)))
        return self._trajectory[1][self._scoring]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """Requests already scored at every count (by their text) are answered without tokenizing them again."""
        texts = [tuple(request.args) for request in requests]
        if all(text in self._scores for text in texts):
            return [self._scores[text][self.loop_count] for text in texts]
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        key = _request_key
        todo = [request for request in requests if key(request) not in self._scores]
        batch = self.batch_size if isinstance(self.batch_size, int) else (override_bs or 1)
        for chunk in _context_chunks(todo, batch):
            for count in self.loops:
                self._scoring = count
                try:
                    scores = super()._loglikelihood_tokens(chunk, disable_tqdm=True, override_bs=batch)
                finally:
                    self._scoring = None
                for request, score in zip(chunk, scores, strict=True):
                    self._scores.setdefault(key(request), {})[count] = score
            self._trajectory = None
        return [self._scores[key(request)][self.loop_count] for request in requests]


@contextlib.contextmanager
def _without_environment_report(skip: bool) -> Iterator[None]:
    """Within, with ``skip``: lm-eval's ``simple_evaluate`` leaves out its environment report and git hash, which it
    has no setting for (their fields are absent from its output)."""
    if not skip:
        yield
        return
    with (
        mock.patch.object(lm_eval.evaluator, "add_env_info", lambda results: None),
        mock.patch.object(lm_eval.evaluator, "get_git_commit_hash", lambda: None),
    ):
        yield


def _set_loop_count(model: Any, count: int) -> None:
    """Run ``model`` at ``count`` loops in every later call that does not say: its forward passes
    (``config.num_loops``) and its generation, which prefers a ``num_loops`` of ``model.generation_config`` (a
    checkpoint's generation_config.json may set one) to the config's."""
    model.config.num_loops = count
    model.generation_config.num_loops = count


def _request_key(request) -> tuple:
    """A request ``(text, context_tokens, continuation_tokens)`` by its ``(context, continuation)`` text when it
    has one (what `loglikelihood` is asked again at the next count), else by its tokens (rolling windows)."""
    text = request[0]
    if isinstance(text, tuple) and all(isinstance(part, str) for part in text):
        return text
    return tuple(request[1]), tuple(request[2])


def _context_chunks(requests: list, batch_size: int) -> list[list]:
    """``requests`` cut into chunks of ``batch_size`` distinct model inputs (lm-eval scores the one-token
    continuations of one context from a single row), longest first as lm-eval orders them."""
    groups: dict[tuple, list] = {}
    for request in requests:
        groups.setdefault(tuple(request[1] + request[2][:-1]), []).append(request)
    ordered = sorted(groups.values(), key=lambda group: -len(group[0][1] + group[0][2]))
    return [
        [request for group in ordered[start : start + batch_size] for request in group]
        for start in range(0, len(ordered), batch_size)
    ]


def check_task_names(tasks: Sequence[str], task_manager: Any) -> None:
    """Refuse, before any model is loaded, a name in ``tasks`` that is neither a task, group or tag that
    ``task_manager`` (an lm-eval ``TaskManager``) knows nor a task YAML file (lm-eval finds out only after the
    model is loaded)."""
    known = task_manager.all_tasks
    for name in tasks:
        if name not in known and not Path(name).is_file():
            close = difflib.get_close_matches(name, known, n=3)
            hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
            raise UsageError(
                f"tasks: {name!r} is not an lm-eval task, group or tag, nor a task YAML file{hint}; "
                "--include-path adds a folder of task YAML files"
            )


def lm_eval_sweep(
    model_dir: str | Path,
    tasks: Sequence[str],
    loops: LoopCounts | Sequence[int] | str,
    out_dir: str | Path,
    include_path: str | Path | None = None,
    batch_size: int = 8,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    device: str = "cpu",
    log_samples: bool = False,
    metadata: dict[str, Any] | None = None,
    share_trajectory: bool = True,
    task_manager: Any = None,
    trajectories: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Run lm-evaluation-harness ``tasks`` on the implicit LM in ``model_dir`` at every loop count.

    ``metadata`` is lm-eval's ``--metadata`` (task arguments, e.g. ``{"data_dir": ...}``). With
    ``share_trajectory`` (default) loglikelihood requests are scored at every count from one trajectory
    (`LoopSweepLM`); without it every count is a separate lm-eval pass (the reference it equals).
    ``task_manager``: an lm-eval ``TaskManager`` to reuse (building one indexes every task YAML lm-eval
    ships, seconds); by default one is built from ``include_path`` and ``metadata``. Unknown task names
    (`check_task_names`) and a model folder without a tokenizer are refused before the model is loaded.
    ``trajectories``: trajectory settings (``{"num_trajectories": 4, "trajectory_noise": 0.1}``, the config fields of
    `PER_CALL_TRAJECTORY_FIELDS`) set on the model's config, as ``--model_args`` would: every loglikelihood request is
    scored with them (default: the checkpoint's own, one trajectory unless it says otherwise); a shared trajectory
    reduces the K trajectories at each count by the residuals at that count, as a run stopped there does.
    """
    loops = normalise_loops(loops)
    if task_manager is None:
        task_manager = TaskManager(include_path=str(include_path) if include_path else None, metadata=metadata)
    check_task_names(tasks, task_manager)  # before the model and tokenizer are loaded
    tokenizer = load_tokenizer(model_dir, "model")
    model = load_model(model_dir, "causal_lm", device)
    _set_trajectories(model, trajectories or {})
    settings = {"pretrained": model, "tokenizer": tokenizer, "batch_size": batch_size, "device": device}
    lm = LoopSweepLM(loops, **settings) if share_trajectory else None
    runs = []
    for count in loops:
        if share_trajectory:
            lm.loop_count = count
        else:
            _set_loop_count(model, count)
            lm = HFLM(**settings)
        # lm-eval describes the machine on every pass (pip and torch environment reports, git: about 0.4 s); this
        # report records its own environment, once, so the passes after the first skip lm-eval's
        with _without_environment_report(skip=bool(runs)):
            output = lm_eval.simple_evaluate(
                model=lm,
                tasks=list(tasks),
                task_manager=task_manager,
                limit=limit,
                num_fewshot=num_fewshot,
                log_samples=log_samples,
            )
        scored = {task: _metrics(values) for task, values in output["results"].items()}
        run = {
            "loops": count,
            "tasks": {task: metrics for task, (metrics, _) in scored.items()},
            "stderr": {task: errors for task, (_, errors) in scored.items()},
        }
        if log_samples:
            run["samples"] = output["samples"]
        runs.append(run)
        if len(runs) == 1:  # lm-eval repeats its set-up warnings on every pass: show them once
            _quiet_lm_eval_logs()
    report = {
        "model": {"model_dir": str(model_dir), "train_loops": model.config.train_loops, "solver": model.config.solver},
        "tasks": list(tasks),
        "loops": loops,
        "run": {
            "limit": limit,
            "num_fewshot": num_fewshot,
            "batch_size": batch_size,
            "share_trajectory": share_trajectory,
            "metadata": metadata,
            "trajectories": {name: getattr(model.config, name) for name in PER_CALL_TRAJECTORY_FIELDS},
        },
        "environment": environment(),
        "runs": runs,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(
        json.dumps(report | {"runs": [_without_samples(r) for r in runs]}, indent=2) + "\n"
    )
    if log_samples:  # lm-eval's per-document records, one file per loop count
        for run in runs:
            path = out / f"samples_loops{run['loops']}.json"
            path.write_text(json.dumps(run["samples"], indent=1, default=str) + "\n")
    rows = [
        {
            "loops": run["loops"],
            "task": task,
            "metric": metric,
            "value": value,
            "stderr": run["stderr"].get(task, {}).get(metric),
        }
        for run in runs
        for task, metrics in run["tasks"].items()
        for metric, value in metrics.items()
    ]
    with (out / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["loops", "task", "metric", "value", "stderr"])
        writer.writeheader()
        writer.writerows(rows)
    report["plots"] = [str(path) for path in _plot(report, out)]
    return report


def _set_trajectories(model: Any, settings: Mapping[str, Any]) -> None:
    """Set the trajectory ``settings`` on ``model``'s config (its forward's defaults at inference), each checked by
    the config's rule and ``select`` against the causal head's rules, so a bad one is refused before any request."""
    refuse_unknown_keywords(
        "lm_eval_sweep(trajectories=...)", set(settings) - set(PER_CALL_TRAJECTORY_FIELDS), PER_CALL_TRAJECTORY_FIELDS
    )
    try:
        for name, value in settings.items():
            setattr(model.config, name, value)
        check_select(model.config.select, "causal_lm")
    except ValueError as err:
        raise UsageError(str(err)) from None


def _quiet_lm_eval_logs() -> None:
    """Show only errors from lm-eval's loggers (its per-pass set-up messages were shown by the first pass)."""
    for name in list(logging.root.manager.loggerDict):
        if name == "lm_eval" or name.startswith("lm_eval.") or name == "lm-eval":
            logging.getLogger(name).setLevel(logging.ERROR)


def _without_samples(run: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in run.items() if k != "samples"}


def _plot(report: dict[str, Any], out: Path) -> list[Path]:
    """One quality-vs-loops plot per (task, metric), in the format of the sweep harness's plots."""
    paths = []
    pairs = sorted({(task, metric) for run in report["runs"] for task, ms in run["tasks"].items() for metric in ms})

    def stderr_of(task: str, metric: str) -> list[float | None]:
        return [run.get("stderr", {}).get(task, {}).get(metric) for run in report["runs"]]

    for task, metric in pairs:
        values = [run["tasks"].get(task, {}).get(metric, math.nan) for run in report["runs"]]
        records = [
            {"loops": t, "quality": v, "stderr": e}
            for t, v, e in zip(report["loops"], values, stderr_of(task, metric), strict=True)
        ]
        plot_report = {
            "task": {"name": task, "quality_metric": metric, "higher_is_better": metric not in LOWER_IS_BETTER},
            "model": report["model"],
            "run": {"n": report["run"]["limit"] or "all"},
            "records": records,
        }
        paths.append(plot_quality_vs_loops(plot_report, out / f"lm_eval_{_file_safe(f'{task}_{metric}')}_vs_loops.png"))
    for metric in sorted({metric for _, metric in pairs}):
        tasks = [task for task, m in pairs if m == metric]
        if len(tasks) > 1:  # e.g. acc of multihop_hops4 / 8 / 16: one line per task in one plot
            series = {
                task: [run["tasks"].get(task, {}).get(metric, math.nan) for run in report["runs"]] for task in tasks
            }
            path = out / f"lm_eval_{_file_safe(metric)}_vs_loops.png"
            paths.append(
                plot_tasks_vs_loops(
                    report["loops"],
                    series,
                    metric,
                    metric not in LOWER_IS_BETTER,
                    report["model"],
                    path,
                    stderr={task: stderr_of(task, metric) for task in tasks},
                )
            )
    return paths


def _file_safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``implicit-hf lm-eval`` options to ``parser`` (defined in `implicit_hf.arguments`)."""
    return add_lm_eval_arguments(parser)


def run_from_args(args: argparse.Namespace) -> dict[str, Any]:
    limit = args.limit
    if limit is not None and limit.is_integer():
        limit = int(limit)
    report = lm_eval_sweep(
        args.model,
        [task.strip() for task in args.tasks.split(",") if task.strip()],
        args.loops,
        args.out,
        include_path=args.include_path,
        batch_size=args.batch_size,
        limit=limit,
        num_fewshot=args.num_fewshot,
        device=args.device,
        metadata=args.metadata,
        share_trajectory=not args.per_count_passes,
        log_samples=args.log_samples,
        trajectories={
            name: getattr(args, name) for name in PER_CALL_TRAJECTORY_FIELDS if getattr(args, name) is not None
        },
    )
    for run in report["runs"]:
        summary = ", ".join(f"{task} {m}={v:.4g}" for task, ms in run["tasks"].items() for m, v in ms.items())
        print(f"loops {run['loops']:>4}: {summary}")
    print(f"[lm-eval] results: {args.out / 'results.json'}")
    return report
