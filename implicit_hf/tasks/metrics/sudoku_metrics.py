"""Accuracy of predicted sudoku grids: whole-grid exact match and cell accuracy over the blank cells.

A local `evaluate` module: load it by path, ``evaluate.load(".../sudoku_metrics.py")``; nothing is downloaded.
Imports stay one per line because `evaluate` scans this file's import lines when it loads it.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Scores predicted 9x9 sudoku grids (81 digits, row-major) against the reference solutions:

* ``exact_match``: the share of samples whose 81 predicted digits all equal the solution's
* ``cell_accuracy``: the share of right digits over the cells that are blank (0) in the puzzles, pooled over all
  samples (over all cells when ``puzzles`` is not given)
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: one predicted grid per sample, 81 digits (row-major).
    references: the solution of each sample, 81 digits.
    puzzles (optional): the puzzle of each sample, 81 digits with 0 for a blank cell.
Returns:
    exact_match, cell_accuracy.
Example:
    >>> metric = evaluate.load("implicit_hf/tasks/metrics/sudoku_metrics.py")
    >>> metric.compute(predictions=[[1, 2]], references=[[1, 3]], puzzles=[[1, 0]])
    {'exact_match': 0.0, 'cell_accuracy': 0.0}
"""

_CITATION = """
@article{implicit2025,
  title={Implicit Models: Expressive Power Scales with Test-Time Compute},
  journal={arXiv preprint arXiv:2510.03638},
  year={2025}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class SudokuMetrics(evaluate.Metric):
    """Exact match and blank-cell accuracy of predicted sudoku grids."""

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

    def _compute(self, predictions, references, puzzles=None):
        if len(predictions) == 0:
            raise ValueError("sudoku_metrics needs at least one prediction")
        if puzzles is not None and len(puzzles) != len(predictions):
            raise ValueError(f"{len(puzzles)} puzzles for {len(predictions)} predictions")
        exact, right, blanks = [], 0, 0
        for k, (prediction, reference) in enumerate(zip(predictions, references, strict=True)):
            guess = np.asarray(prediction, dtype=np.int64)
            truth = np.asarray(reference, dtype=np.int64)
            if guess.shape != truth.shape:
                raise ValueError(f"sample {k}: prediction has shape {guess.shape}, reference {truth.shape}")
            blank = np.ones(truth.shape, dtype=bool)
            if puzzles is not None:
                puzzle = np.asarray(puzzles[k], dtype=np.int64)
                if puzzle.shape != truth.shape:
                    raise ValueError(f"sample {k}: puzzle has shape {puzzle.shape}, reference {truth.shape}")
                blank = puzzle == 0
            exact.append(bool(np.array_equal(guess, truth)))
            right += int((guess == truth)[blank].sum())
            blanks += int(blank.sum())
        return {
            "exact_match": float(np.mean(exact)),
            "cell_accuracy": float(right / blanks) if blanks else 1.0,
        }
