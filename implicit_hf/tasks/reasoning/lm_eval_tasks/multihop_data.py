"""Data of the lm-evaluation-harness tasks ``multihop_hops{k}``: the files ``multihop.write_lm_eval_data`` writes
(read as `documents` says)."""

import datasets

from implicit_hf.tasks.reasoning.lm_eval_tasks.documents import load_documents


def load(hops: int, data_dir: str | None = None, **metadata) -> datasets.DatasetDict:
    """``{"test": Dataset}`` of ``multihop_hops{hops}.jsonl`` (rows: prompt, answer, hops)."""
    return load_documents("multihop", f"multihop_hops{hops}", data_dir)
