"""Accuracy of predicted sums: exact match of every sum digit and per-digit accuracy.

A local `evaluate` module: load it by path, ``evaluate.load(".../addition_metrics.py")``; nothing is downloaded.
Imports stay one per line because `evaluate` scans this file's import lines when it loads it.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Scores predicted sum digits of multi-digit additions (least significant first, the final carry included) against
the reference digits:

* ``exact_match``: the fraction of problems whose predicted digits are all right
* ``digit_accuracy``: the fraction of sum digits predicted right, averaged over the problems
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: the predicted sum digits of each problem (ints 0..9).
    references: the reference sum digits of each problem, as long as its prediction.
Returns:
    exact_match, digit_accuracy.
Example:
    >>> metric = evaluate.load("implicit_hf/tasks/metrics/addition_metrics.py")
    >>> metric.compute(predictions=[[1, 2, 0], [5, 1]], references=[[1, 2, 0], [5, 0]])
    {'exact_match': 0.5, 'digit_accuracy': 0.75}
"""

_CITATION = """
@article{implicit2025,
  title={Implicit Models: Expressive Power Scales with Test-Time Compute},
  journal={arXiv preprint arXiv:2510.03638},
  year={2025}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class AdditionMetrics(evaluate.Metric):
    """Exact match and per-digit accuracy of predicted sums."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("int64")),
                    "references": datasets.Sequence(datasets.Value("int64")),
                }
            ),
        )

    def _compute(self, predictions, references):
        if len(predictions) == 0:
            raise ValueError("addition_metrics needs at least one prediction")
        exact, accuracy = [], []
        for k, (prediction, reference) in enumerate(zip(predictions, references, strict=True)):
            predicted = np.asarray(prediction, dtype=np.int64)
            target = np.asarray(reference, dtype=np.int64)
            if predicted.shape != target.shape or target.size == 0:
                raise ValueError(f"sample {k}: prediction has shape {predicted.shape}, reference {target.shape}")
            right = predicted == target
            exact.append(bool(right.all()))
            accuracy.append(float(right.mean()))
        return {"exact_match": float(np.mean(exact)), "digit_accuracy": float(np.mean(accuracy))}
