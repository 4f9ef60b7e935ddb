"""Quality of restored images: PSNR, SSIM and mean squared error against the clean images.

A local `evaluate` module: load it by path, ``evaluate.load(".../imaging_metrics.py")``; nothing is downloaded.
Imports stay one per line because `evaluate` scans this file's import lines when it loads it.
"""

import datasets
import evaluate
import numpy as np
from skimage.metrics import structural_similarity

_DESCRIPTION = """
Scores restored grey images ``x̂`` against the clean images ``x`` (pixel values in ``[0, data_range]``). Every
number is the mean over the samples; predictions are scored as given (not clipped to the pixel range):

* ``psnr`` = 10 log10(data_range² / mean((x̂ - x)²)) in dB (infinite for an exact prediction)
* ``ssim``: structural similarity (`skimage.metrics.structural_similarity`, 7x7 uniform window)
* ``mse`` = mean((x̂ - x)²)
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: one restored image (an H x W list of lists of floats) per sample.
    references: the clean image of each sample (same sizes, at least 7 x 7 for SSIM).
    data_range: the pixel range (1.0 for images in [0, 1]).
Returns:
    psnr, ssim, mse.
Example:
    >>> metric = evaluate.load("implicit_hf/tasks/metrics/imaging_metrics.py")
    >>> metric.compute(predictions=[[[0.5] * 8] * 8], references=[[[0.6] * 8] * 8])["psnr"]
    20.0
"""

_CITATION = """
@article{implicit2025,
  title={Implicit Models: Expressive Power Scales with Test-Time Compute},
  journal={arXiv preprint arXiv:2510.03638},
  year={2025}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ImagingMetrics(evaluate.Metric):
    """PSNR, SSIM and MSE of restored images."""

    def _info(self):
        image = datasets.Sequence(datasets.Sequence(datasets.Value("float64")))
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": image, "references": image}),
        )

    def _compute(self, predictions, references, data_range=1.0):
        if len(predictions) == 0:
            raise ValueError("imaging_metrics needs at least one prediction")
        if not data_range > 0:
            raise ValueError(f"data_range must be > 0; got {data_range!r}")
        psnr, ssim, mse = [], [], []
        for k, (prediction, reference) in enumerate(zip(predictions, references, strict=True)):
            x_hat = np.asarray(prediction, dtype=np.float64)
            x = np.asarray(reference, dtype=np.float64)
            if x_hat.shape != x.shape or x.ndim != 2:
                raise ValueError(f"sample {k}: prediction has shape {x_hat.shape}, reference {x.shape} (2-D images)")
            error = float(np.mean((x_hat - x) ** 2))
            mse.append(error)
            psnr.append(10.0 * np.log10(data_range**2 / error) if error > 0 else np.inf)
            ssim.append(structural_similarity(x, x_hat, data_range=data_range))
        return {"psnr": float(np.mean(psnr)), "ssim": float(np.mean(ssim)), "mse": float(np.mean(mse))}
