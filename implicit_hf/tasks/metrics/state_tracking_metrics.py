"""Exact match of the final state, and accuracy at every labelled position, of state-tracking answers.

A local `evaluate` module: load it by path, ``evaluate.load(".../state_tracking_metrics.py")``; nothing is
downloaded. Imports stay one per line because `evaluate` scans this file's import lines when it loads it.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Scores predicted states of a state-tracking problem (the state after every update, the answer last) against
the reference states:

* ``exact_match``: the fraction of problems whose last prediction (the answer) equals the reference answer
* ``position_accuracy``: the fraction of all labelled positions, pooled over problems, predicted right
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: per problem, the predicted state index at every labelled position, the answer last
        (-1: the model predicted no state at all).
    references: per problem, the reference states at the same positions.
Returns:
    exact_match, position_accuracy.
Example:
    >>> metric = evaluate.load("implicit_hf/tasks/metrics/state_tracking_metrics.py")
    >>> metric.compute(predictions=[[0, 2, 2], [1]], references=[[0, 1, 2], [0]])
    {'exact_match': 0.5, 'position_accuracy': 0.5}
"""

_CITATION = """
@article{implicit2025,
  title={Implicit Models: Expressive Power Scales with Test-Time Compute},
  journal={arXiv preprint arXiv:2510.03638},
  year={2025}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class StateTrackingMetrics(evaluate.Metric):
    """Exact match of the final state and pooled accuracy at every labelled position."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("int32")),
                    "references": datasets.Sequence(datasets.Value("int32")),
                }
            ),
        )

    def _compute(self, predictions, references):
        if len(predictions) == 0:
            raise ValueError("state_tracking_metrics needs at least one prediction")
        for k, (prediction, reference) in enumerate(zip(predictions, references, strict=True)):
            if len(reference) == 0 or len(prediction) != len(reference):
                raise ValueError(
                    f"problem {k}: {len(prediction)} predicted states for {len(reference)} reference states "
                    "(at least one, the answer)"
                )
        exact = [p[-1] == r[-1] for p, r in zip(predictions, references, strict=True)]
        matches = [a == b for p, r in zip(predictions, references, strict=True) for a, b in zip(p, r, strict=True)]
        return {"exact_match": float(np.mean(exact)), "position_accuracy": float(np.mean(matches))}
