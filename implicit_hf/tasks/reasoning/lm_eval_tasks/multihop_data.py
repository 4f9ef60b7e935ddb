"""Data of the lm-evaluation-harness tasks ``multihop_hops{k}``: the files `write_lm_eval_data` writes.

lm-eval calls `load` (the tasks' ``custom_dataset``) with the task's ``dataset_kwargs`` (``hops``) and
the run's ``--metadata`` (``data_dir``). The files are read from ``data_dir``, else from
``$IMPLICIT_HF_LM_EVAL_DATA``, else from `default_data_dir` (``$IMPLICIT_HF_CACHE/lm_eval/multihop``),
where ``implicit-hf lm-eval-data multihop`` writes them by default.
"""

import os
from pathlib import Path

import datasets

from implicit_hf.tasks.base import default_cache_dir


def default_data_dir() -> Path:
    """Where ``implicit-hf lm-eval-data multihop`` writes, and `load` reads, by default."""
    if os.environ.get("IMPLICIT_HF_LM_EVAL_DATA"):
        return Path(os.environ["IMPLICIT_HF_LM_EVAL_DATA"])
    return default_cache_dir() / "lm_eval" / "multihop"


def load(hops: int, data_dir: str | None = None, **metadata) -> datasets.DatasetDict:
    """``{"test": Dataset}`` of ``multihop_hops{hops}.jsonl`` (rows: prompt, answer, hops)."""
    path = (Path(data_dir) if data_dir else default_data_dir()) / f"multihop_hops{hops}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: write the data of the multihop lm-eval tasks first with "
            f"`implicit-hf lm-eval-data multihop --out {path.parent}` (or pass --metadata '{{\"data_dir\": DIR}}')"
        )
    return datasets.DatasetDict({"test": datasets.Dataset.from_json(str(path))})
