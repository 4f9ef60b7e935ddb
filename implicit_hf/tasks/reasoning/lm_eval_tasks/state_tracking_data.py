"""Data of the lm-evaluation-harness tasks ``state_tracking_steps{k}``: the files
``state_tracking.write_lm_eval_data`` writes (read as `documents` says)."""

import datasets

from implicit_hf.tasks.reasoning.lm_eval_tasks.documents import load_documents


def load(steps: int, data_dir: str | None = None, **metadata) -> datasets.DatasetDict:
    """``{"test": Dataset}`` of ``state_tracking_steps{steps}.jsonl`` (rows: prompt, answer, choices, steps)."""
    return load_documents("state_tracking", f"state_tracking_steps{steps}", data_dir)
