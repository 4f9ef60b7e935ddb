"""Accuracy of predicted maze paths: exact match of the whole path mask and accuracy over the open squares.

A local `evaluate` module: load it by path, ``evaluate.load(".../maze_metrics.py")``; nothing is downloaded.
Imports stay one per line because `evaluate` scans this file's import lines when it loads it.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Scores predicted path masks of mazes (1 = the square is on the start -> goal shortest path) against the reference
masks, each flattened over the grid; the reference holds -1 on wall squares, 0 on open squares off the path and 1 on
the path:

* ``exact_match``: the fraction of samples whose prediction is right on every square (a wall predicted on the path
  is wrong)
* ``cell_accuracy``: the fraction of open (non-wall) squares predicted right, averaged over the samples
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: one predicted mask per sample, flattened (ints 0 / 1).
    references: the reference of each sample, flattened the same way (-1 wall, 0 off the path, 1 on it).
Returns:
    exact_match, cell_accuracy.
Example:
    >>> metric = evaluate.load("implicit_hf/tasks/metrics/maze_metrics.py")
    >>> metric.compute(predictions=[[0, 1, 1]], references=[[-1, 1, 1]])
    {'exact_match': 1.0, 'cell_accuracy': 1.0}
"""

_CITATION = """
@article{implicit2025,
  title={Implicit Models: Expressive Power Scales with Test-Time Compute},
  journal={arXiv preprint arXiv:2510.03638},
  year={2025}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MazeMetrics(evaluate.Metric):
    """Exact match and open-square accuracy of predicted maze paths."""

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
            raise ValueError("maze_metrics needs at least one prediction")
        exact, accuracy = [], []
        for k, (prediction, reference) in enumerate(zip(predictions, references, strict=True)):
            predicted = np.asarray(prediction, dtype=np.int64)
            target = np.asarray(reference, dtype=np.int64)
            if predicted.shape != target.shape:
                raise ValueError(f"sample {k}: prediction has shape {predicted.shape}, reference {target.shape}")
            open_squares = target >= 0
            if not open_squares.any():
                raise ValueError(f"sample {k}: the reference has no open square")
            on_path = target == 1
            exact.append(bool(np.array_equal(predicted != 0, on_path)))
            accuracy.append(float(np.mean((predicted[open_squares] != 0) == on_path[open_squares])))
        return {"exact_match": float(np.mean(exact)), "cell_accuracy": float(np.mean(accuracy))}
