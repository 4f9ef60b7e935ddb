"""Accuracy of predicted PDE solution fields: relative L2 error against the reference solution.

A local `evaluate` module: load it by path, ``evaluate.load(".../pde_metrics.py")``; nothing is downloaded.
Imports stay one per line because `evaluate` scans this file's import lines when it loads it.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Scores predicted fields ``ŵ`` (e.g. the steady vorticity of a Navier–Stokes flow on a grid) against the reference
solutions ``w*``, each flattened to a vector of grid values:

* ``relative_l2`` = ||ŵ - w*||₂ / ||w*||₂, the mean over the samples
* ``relative_l2_max``: the largest per-sample relative L2 error
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: one predicted field per sample, flattened (a list of floats).
    references: the reference field of each sample, flattened the same way (same lengths; nonzero).
Returns:
    relative_l2, relative_l2_max.
Example:
    >>> metric = evaluate.load("implicit_hf/tasks/metrics/pde_metrics.py")
    >>> metric.compute(predictions=[[1.0, 2.0]], references=[[1.0, 2.0]])
    {'relative_l2': 0.0, 'relative_l2_max': 0.0}
"""

_CITATION = """
@article{implicit2025,
  title={Implicit Models: Expressive Power Scales with Test-Time Compute},
  journal={arXiv preprint arXiv:2510.03638},
  year={2025}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class PdeMetrics(evaluate.Metric):
    """Relative L2 error of predicted solution fields."""

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

    def _compute(self, predictions, references):
        if len(predictions) == 0:
            raise ValueError("pde_metrics needs at least one prediction")
        relative = []
        for k, (prediction, reference) in enumerate(zip(predictions, references, strict=True)):
            w_hat = np.asarray(prediction, dtype=np.float64)
            w_star = np.asarray(reference, dtype=np.float64)
            if w_hat.shape != w_star.shape:
                raise ValueError(f"sample {k}: prediction has shape {w_hat.shape}, reference {w_star.shape}")
            scale = np.linalg.norm(w_star)
            if scale == 0:
                raise ValueError(f"sample {k}: the reference field is zero; its relative error is undefined")
            relative.append(np.linalg.norm(w_hat - w_star) / scale)
        return {"relative_l2": float(np.mean(relative)), "relative_l2_max": float(np.max(relative))}
