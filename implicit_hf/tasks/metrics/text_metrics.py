"""Perplexity of a language model from the log-probabilities it gave the tokens of held-out text.

A local `evaluate` module: load it by path, ``evaluate.load(".../text_metrics.py")``; nothing is downloaded.
Imports stay one per line because `evaluate` scans this file's import lines when it loads it.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Scores a causal language model on held-out text from ``log p(token | preceding tokens)`` of every scored token:

* ``perplexity`` = exp(-mean log-probability over all tokens of all samples)
* ``nll``: that mean negative log-likelihood (nats per token)
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: per sample, the log-probabilities (natural log) the model gave each of its scored tokens.
Returns:
    perplexity, nll.
Example:
    >>> metric = evaluate.load("implicit_hf/tasks/metrics/text_metrics.py")
    >>> round(metric.compute(predictions=[[-1.0, -1.0]])["perplexity"], 4)
    2.7183
"""

_CITATION = """
@article{implicit2025,
  title={Implicit Models: Expressive Power Scales with Test-Time Compute},
  journal={arXiv preprint arXiv:2510.03638},
  year={2025}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TextMetrics(evaluate.Metric):
    """Token-level perplexity from per-token log-probabilities."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("float64"))}),
        )

    def _compute(self, predictions):
        values = np.concatenate([np.asarray(p, dtype=np.float64) for p in predictions]) if predictions else []
        if len(values) == 0:
            raise ValueError("text_metrics needs at least one scored token")
        if not np.all(np.isfinite(values)) or np.any(values > 0):
            raise ValueError("predictions must be finite log-probabilities (<= 0)")
        nll = float(-values.mean())
        return {"perplexity": float(np.exp(nll)), "nll": nll}
