"""Exact match of the answers to multi-hop lookup questions.

A local `evaluate` module: load it by path, ``evaluate.load(".../multihop_metrics.py")``; nothing is downloaded.
Imports stay one per line because `evaluate` scans this file's import lines when it loads it.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Scores generated answers to multi-hop lookup questions against the reference answers:

* ``exact_match``: the fraction of answers equal to the reference once surrounding whitespace is stripped
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: the generated answer of each problem (text).
    references: the reference answer of each problem (text).
Returns:
    exact_match.
Example:
    >>> metric = evaluate.load("implicit_hf/tasks/metrics/multihop_metrics.py")
    >>> metric.compute(predictions=["4", " 7", ""], references=["4", "7", "1"])
    {'exact_match': 0.6666666666666666}
"""

_CITATION = """
@article{implicit2025,
  title={Implicit Models: Expressive Power Scales with Test-Time Compute},
  journal={arXiv preprint arXiv:2510.03638},
  year={2025}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MultiHopMetrics(evaluate.Metric):
    """Exact match of generated answers."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "references": datasets.Value("string"),
                }
            ),
        )

    def _compute(self, predictions, references):
        if len(predictions) == 0:
            raise ValueError("multihop_metrics needs at least one prediction")
        for k, reference in enumerate(references):
            if not reference.strip():
                raise ValueError(f"sample {k}: the reference answer is empty")
        matches = [p.strip() == r.strip() for p, r in zip(predictions, references, strict=True)]
        return {"exact_match": float(np.mean(matches))}
