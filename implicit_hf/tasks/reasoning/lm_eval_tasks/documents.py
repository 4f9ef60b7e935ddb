"""Where the data files of the lm-evaluation-harness tasks shipped here live, and reading one.

lm-eval calls a task's ``custom_dataset`` (``multihop_data.load``, ``state_tracking_data.load``) with the
task's ``dataset_kwargs`` and the run's ``--metadata`` (``data_dir``). The files are read from ``data_dir``,
else from ``$IMPLICIT_HF_LM_EVAL_DATA``, else from `default_data_dir` (``$IMPLICIT_HF_CACHE/lm_eval/<task>``),
where ``implicit-hf lm-eval-data <task>`` writes them by default.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets

from implicit_hf.checks import check_integer
from implicit_hf.tasks.base import default_cache_dir

LM_EVAL_DIR = Path(__file__).parent  # the shipped task YAMLs (``--include_path``)


def default_data_dir(task: str) -> Path:
    """Where ``implicit-hf lm-eval-data TASK`` writes, and the tasks read, by default."""
    if os.environ.get("IMPLICIT_HF_LM_EVAL_DATA"):
        return Path(os.environ["IMPLICIT_HF_LM_EVAL_DATA"])
    return default_cache_dir() / "lm_eval" / task


def load_documents(task: str, name: str, data_dir: str | None) -> datasets.DatasetDict:
    """``{"test": Dataset}`` of ``name.jsonl`` in ``data_dir`` (or `default_data_dir`); a missing file names the
    command that writes it."""
    path = (Path(data_dir) if data_dir else default_data_dir(task)) / f"{name}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: write the data of the {task} lm-eval tasks first with "
            f"`implicit-hf lm-eval-data {task} --out {path.parent}` (or pass --metadata '{{\"data_dir\": DIR}}')"
        )
    return datasets.DatasetDict({"test": datasets.Dataset.from_json(str(path))})


def shipped_counts(prefix: str) -> list[int]:
    """The counts ``k`` of the task YAMLs shipped here as ``{prefix}{k}.yaml`` (e.g. ``multihop_hops``)."""
    return sorted(int(path.stem.removeprefix(prefix)) for path in LM_EVAL_DIR.glob(f"{prefix}*.yaml"))


def write_documents(
    out_dir: str | Path,
    prefix: str,
    counts: list[int],
    n: int,
    seed: int,
    task_kwargs: dict[str, Any],
    documents: Callable[[int], list[dict[str, Any]]],
) -> list[Path]:
    """Write ``{prefix}{k}.jsonl`` (one JSON object per line: ``documents(k)``) for every ``k`` of ``counts`` and
    ``<task>_settings.json`` recording how (``<task>``: ``prefix`` up to its last ``_``); counts without a
    shipped task, a bad ``n`` or ``seed`` are refused before anything is written."""
    task, count_name = prefix.rsplit("_", 1)
    shipped = shipped_counts(prefix)
    unknown = [k for k in counts if k not in shipped]
    if unknown:
        raise ValueError(
            f"no lm-eval task for {count_name} {unknown}; the package ships {prefix}{{k}} for k in {shipped}"
        )
    check_integer("n", n, minimum=1)  # an lm-eval task needs at least one document
    check_integer("seed", seed, minimum=0)
    if count_name in task_kwargs:
        raise ValueError(f"{count_name} is given by the counts, not by task_kwargs")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in counts:
        path = out / f"{prefix}{k}.jsonl"
        path.write_text("".join(json.dumps(document) + "\n" for document in documents(k)))
        paths.append(path)
    settings = {count_name: list(counts), "n": n, "seed": seed, "task_kwargs": task_kwargs}
    (out / f"{task}_settings.json").write_text(json.dumps(settings, indent=2) + "\n")
    return paths
