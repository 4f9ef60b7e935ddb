"""Accuracy of predicted linear-program solutions: distance to the optimum, objective gap, feasibility.

A local `evaluate` module: load it by path, ``evaluate.load(".../lp_metrics.py")``; nothing is downloaded.
Imports stay one per line because `evaluate` scans this file's import lines when it loads it.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Scores predicted solutions ``ŷ`` of ``min cᵀy s.t. A_ub y <= b_ub, A_eq y = b_eq, l <= y <= u`` against the optimal
solutions ``y*``. Every number is the mean over the samples except ``relative_error_max``:

* ``relative_error`` = ||ŷ - y*||₂ / (||y*||₂ + 1)            (arXiv 2510.03638)
* ``relative_error_max``: the largest per-sample relative error
* ``objective_gap`` = |cᵀŷ - cᵀy*| / (|cᵀy*| + 1)              (needs ``c``)
* ``constraint_violation`` = ||max(0, A_ub ŷ - b_ub)||₂ + ||A_eq ŷ - b_eq||₂ + ||max(0, l - ŷ, ŷ - u)||₂
  (needs ``A``, ``b``, ``is_equality``, ``lower``, ``upper``)
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: one predicted solution (a list of floats, length n) per sample.
    references: the optimal solution of each sample (same lengths).
    c: optional, the cost vector of each sample.
    A: optional, the dense constraint matrix (m x n, list of lists) of each sample.
    b: optional, the right-hand side (length m) of each sample.
    is_equality: optional, per constraint row: True for ``=``, False for ``<=``.
    lower / upper: optional, the variable bounds of each sample.
Returns:
    relative_error, relative_error_max, and objective_gap / constraint_violation when their data is given.
Example:
    >>> metric = evaluate.load("implicit_hf/tasks/metrics/lp_metrics.py")
    >>> metric.compute(predictions=[[1.0, 2.0]], references=[[1.0, 2.0]])
    {'relative_error': 0.0, 'relative_error_max': 0.0}
"""

_CITATION = """
@article{implicit2025,
  title={Implicit Models: Expressive Power Scales with Test-Time Compute},
  journal={arXiv preprint arXiv:2510.03638},
  year={2025}
}
"""

_CONSTRAINT_FIELDS = ("A", "b", "is_equality", "lower", "upper")


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class LpMetrics(evaluate.Metric):
    """Relative error, objective gap and constraint violation of predicted LP solutions."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float64")),
                    "references": datasets.Sequence(datasets.Value("float64")),
                }
            ),
        )

    def _compute(self, predictions, references, c=None, A=None, b=None, is_equality=None, lower=None, upper=None):
        count = len(predictions)
        if count == 0:
            raise ValueError("lp_metrics needs at least one prediction")
        given = {"c": c, "A": A, "b": b, "is_equality": is_equality, "lower": lower, "upper": upper}
        for name, value in given.items():
            if value is not None and len(value) != count:
                raise ValueError(f"{name} has {len(value)} entries for {count} predictions")
        constraints = [given[name] is not None for name in _CONSTRAINT_FIELDS]
        if any(constraints) and not all(constraints):
            missing = [name for name, present in zip(_CONSTRAINT_FIELDS, constraints, strict=True) if not present]
            raise ValueError(f"constraint_violation needs A, b, is_equality, lower and upper; missing {missing}")

        relative, gaps, violations = [], [], []
        for k in range(count):
            y_hat = np.asarray(predictions[k], dtype=np.float64)
            y_star = np.asarray(references[k], dtype=np.float64)
            if y_hat.shape != y_star.shape:
                raise ValueError(f"sample {k}: prediction has shape {y_hat.shape}, reference {y_star.shape}")
            relative.append(np.linalg.norm(y_hat - y_star) / (np.linalg.norm(y_star) + 1.0))
            if c is not None:
                cost = np.asarray(c[k], dtype=np.float64)
                best = float(cost @ y_star)
                gaps.append(abs(float(cost @ y_hat) - best) / (abs(best) + 1.0))
            if all(constraints):
                violations.append(_violation(y_hat, A[k], b[k], is_equality[k], lower[k], upper[k]))

        result = {"relative_error": float(np.mean(relative)), "relative_error_max": float(np.max(relative))}
        if gaps:
            result["objective_gap"] = float(np.mean(gaps))
        if violations:
            result["constraint_violation"] = float(np.mean(violations))
        return result


def _violation(y, A, b, is_equality, lower, upper):
    """||max(0, A_ub y - b_ub)||₂ + ||A_eq y - b_eq||₂ + ||max(0, l - y, y - u)||₂ of one sample."""
    A = np.asarray(A, dtype=np.float64).reshape(-1, y.shape[0])
    residual = A @ y - np.asarray(b, dtype=np.float64)
    equality = np.asarray(is_equality, dtype=bool)
    lower = np.asarray(lower, dtype=np.float64)
    upper = np.asarray(upper, dtype=np.float64)
    bounds = np.maximum(0.0, np.maximum(lower - y, y - upper))
    return float(
        np.linalg.norm(np.maximum(0.0, residual[~equality]))
        + np.linalg.norm(residual[equality])
        + np.linalg.norm(bounds)
    )
