"""Where the data files of the lm-evaluation-harness tasks shipped here live, and reading one.

lm-eval calls a task's ``custom_dataset`` (``multihop_data.load``, ``state_tracking_data.load``) with the
task's ``dataset_kwargs`` and the run's ``--metadata`` (``data_dir``). The files are read from ``data_dir``,
else from ``$IMPLICIT_HF_LM_EVAL_DATA``, else from `default_data_dir` (``$IMPLICIT_HF_CACHE/lm_eval/<task>``),
where ``implicit-hf lm-eval-data <task>`` writes them by default.
"""

import os
from pathlib import Path

import datasets

from implicit_hf.tasks.base import default_cache_dir


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
