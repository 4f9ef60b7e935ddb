"""Accuracy of generated arithmetic: the final answer and the whole written completion.

A local `evaluate` module: load it by path, ``evaluate.load(".../arith_lm_metrics.py")``; nothing is downloaded.
Imports stay one per line because `evaluate` scans this file's import lines when it loads it.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Scores generated completions of arithmetic chains (the running totals, separated by spaces, the last one the answer)
against the reference completions:

* ``answer_accuracy``: the fraction of completions whose last word equals the reference's last word (the answer)
* ``exact_match``: the fraction of completions whose words all equal the reference's words (every running total)
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: the generated completion of each problem (text).
    references: the reference completion of each problem (text).
Returns:
    answer_accuracy, exact_match.
Example:
    >>> metric = evaluate.load("implicit_hf/tasks/metrics/arith_lm_metrics.py")
    >>> metric.compute(predictions=[" 19 16", " 18 16", ""], references=[" 19 16", " 19 16", " 5"])
    {'answer_accuracy': 0.6666666666666666, 'exact_match': 0.3333333333333333}
"""

_CITATION = """
@article{implicit2025,
  title={Implicit Models: Expressive Power Scales with Test-Time Compute},
  journal={arXiv preprint arXiv:2510.03638},
  year={2025}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ArithLMMetrics(evaluate.Metric):
    """Answer accuracy and exact match of generated arithmetic."""

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
            raise ValueError("arith_lm_metrics needs at least one prediction")
        answers, exact = [], []
        for k, (prediction, reference) in enumerate(zip(predictions, references, strict=True)):
            words, target = prediction.split(), reference.split()
            if not target:
                raise ValueError(f"sample {k}: the reference completion is empty")
            answers.append(bool(words) and words[-1] == target[-1])
            exact.append(words == target)
        return {"answer_accuracy": float(np.mean(answers)), "exact_match": float(np.mean(exact))}
