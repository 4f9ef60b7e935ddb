"""Non-blind deblurring of natural-image crops as token regression (the imaging task of arXiv 2510.03638).

Data: random ``image_size`` x ``image_size`` grey crops (pixels in ``[0, 1]``, a random flip / quarter
turn each) of scikit-image's bundled sample photographs (`skimage.data`; no download). Training crops
come from `TRAIN_IMAGES`, every other split (validation, test) from the held-out `HELD_OUT_IMAGES`,
so a model is scored on images it never saw. The observation is ``y = A x + n``: ``A`` a circular
convolution with a fixed, known kernel (`BlurOperator`, through the FFT; a Gaussian of std
``blur_sigma`` or a straight motion streak of ``motion_length`` pixels at ``motion_angle`` degrees),
``n ~ N(0, noise_std²)`` with ``noise_std = 0.03``.

Sequence form: ``patch_size`` x ``patch_size`` patches in raster order are the tokens (64 tokens of 16
pixels at the defaults), attention is bidirectional, and the regression head predicts the patch's
pixels. Pixels enter and leave the model as ``(v - PIXEL_MEAN) / PIXEL_SCALE``. Token features
(``input_features``), by ``prior``:

* ``"none"``: the observed patch of ``y``;
* ``"adjoint"``: the patch of ``y`` and the patch of ``Aᵀ y`` (the matched filter);
* ``"gradient"``: as ``"adjoint"``, plus the data-consistency term inside the loop: at every
  iteration the head's current estimate ``x̂`` gives ``Aᵀ(A x̂ - y) / GRAD_SCALE`` per patch
  (``feedback_features``, see `loop_feedback`), injected into the next iteration like a
  proximal-gradient step. The paper's guidance is that such a domain prior inside the loop matters.

Targets: ``labels`` are the clean patches; `decode` returns ``(S, S)`` images in pixel units.
Metrics (`metrics/imaging_metrics.py`): ``psnr`` (headline, dB), ``ssim``, ``mse``. The Lipschitz
probe (`perturb`) moves ``x`` along the blur's top singular vectors (the Fourier modes with the
largest ``|kernel transfer function|``): ``y + A δx`` with ``||A δx|| = eps``, target ``x + δx``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import datasets
import numpy as np
import torch
from skimage import color, data, util

from ..checks import Positive, at_least, multiple_of, number
from .base import Example, TaskAdapter, check_one_per_row, row_generators, single_threaded

PIXEL_MEAN = 0.5  # model inputs and targets are (pixel - PIXEL_MEAN) / PIXEL_SCALE, O(1) on natural images
PIXEL_SCALE = 0.25
GRAD_SCALE = 0.05  # Aᵀ(A x̂ - y) / GRAD_SCALE: O(1) while the estimate is still off by a few noise levels

# skimage.data images that ship with scikit-image (no download); train and held-out sets do not overlap
TRAIN_IMAGES = ("astronaut", "brick", "camera", "chelsea", "grass", "gravel", "moon", "page")
HELD_OUT_IMAGES = ("coffee", "coins", "rocket")
Prior = Literal["none", "adjoint", "gradient"]
Blur = Literal["gaussian", "motion"]
PERTURB_MODES = 8  # Fourier modes of the blur with the largest |transfer| spanned by the probe's δx


class BlurOperator:
    """Circular 2-D convolution ``A`` of ``size`` x ``size`` images with ``kernel``, through the FFT.

    ``A x = F⁻¹(H · F x)`` and ``Aᵀ y = F⁻¹(conj(H) · F y)`` with ``H`` the kernel's transfer function
    (the kernel's centre pixel sits at the origin, so a symmetric kernel does not shift the image).
    ``A`` is diagonal in the Fourier basis: its singular values are ``|H|``. Works on tensors
    ``(..., size, size)`` on any device (float64 stays float64, anything else is computed in float32)
    and is differentiable.
    """

    def __init__(self, kernel: np.ndarray, size: int):
        kernel = np.asarray(kernel, dtype=np.float64)
        if kernel.ndim != 2 or max(kernel.shape) > size:
            raise ValueError(f"the kernel must be a 2-D array no larger than {size} x {size}; got shape {kernel.shape}")
        padded = np.zeros((size, size))
        rows = (np.arange(kernel.shape[0]) - kernel.shape[0] // 2) % size
        cols = (np.arange(kernel.shape[1]) - kernel.shape[1] // 2) % size
        padded[np.ix_(rows, cols)] = kernel
        self.kernel = kernel
        self.size = size
        self.transfer = np.fft.rfft2(padded)  # (size, size // 2 + 1): H on the half-spectrum of real images
        self._on_device: dict[tuple[torch.device, torch.dtype, bool], torch.Tensor] = {}

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``A x``: the blurred images."""
        return self._filter(x, conjugate=False)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``Aᵀ y`` (correlation with the kernel)."""
        return self._filter(y, conjugate=True)

    def gradient(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``Aᵀ(A x - y)``: the gradient of the data term ``½||A x - y||²`` at ``x``."""
        return self.adjoint(self.apply(x) - y)

    def _filter(self, x: torch.Tensor, conjugate: bool) -> torch.Tensor:
        if tuple(x.shape[-2:]) != (self.size, self.size):
            raise ValueError(f"BlurOperator works on {self.size} x {self.size} images; got shape {tuple(x.shape)}")
        real = torch.float64 if x.dtype == torch.float64 else torch.float32
        key = (x.device, real, conjugate)
        if key not in self._on_device:
            complex_dtype = torch.complex128 if real == torch.float64 else torch.complex64
            transfer = np.conj(self.transfer) if conjugate else self.transfer
            self._on_device[key] = torch.from_numpy(transfer).to(device=x.device, dtype=complex_dtype)
        spectrum = torch.fft.rfft2(x.to(real)) * self._on_device[key]
        return torch.fft.irfft2(spectrum, s=(self.size, self.size))


def gaussian_kernel(sigma: float) -> np.ndarray:
    """Normalised isotropic Gaussian, truncated at ``ceil(3 sigma)`` pixels from the centre."""
    radius = gaussian_kernel_size(sigma) // 2
    t = np.arange(-radius, radius + 1)
    g = np.exp(-(t**2) / (2 * sigma**2))
    kernel = np.outer(g, g)
    return kernel / kernel.sum()


def gaussian_kernel_size(sigma: float) -> int:
    """The side of `gaussian_kernel`'s square: ``2 ceil(3 sigma) + 1`` pixels (at least 3)."""
    return 2 * max(1, math.ceil(3 * sigma)) + 1


def motion_kernel_size(length: int) -> int:
    """The side of `motion_kernel`'s square: ``length`` rounded up to an odd number (the streak is centred)."""
    return length if length % 2 else length + 1


def _check_kernel_fits(blur: str, blur_sigma: float, motion_length: int, image_size: int) -> None:
    """The blur kernel must fit in an ``image_size`` x ``image_size`` image (the convolution is circular); checked
    before the kernel is built, so a huge setting is refused at once. The error names the setting and the largest
    value that fits."""
    if blur == "gaussian":
        name, value, side = "blur_sigma", blur_sigma, gaussian_kernel_size(blur_sigma)
        largest = (image_size - 1) // 2 / 3  # ceil(3 sigma), the kernel's radius, fits
    else:
        name, value, side = "motion_length", motion_length, motion_kernel_size(motion_length)
        largest = image_size if image_size % 2 else image_size - 1
    if side <= image_size:
        return
    problem = f"{name} ({value!r}) gives a {blur} kernel of {side:.6g} x {side:.6g} pixels, larger than the images"
    if not largest:
        raise ValueError(f"{problem} (image_size {image_size}): a {blur} kernel needs image_size >= 3")
    raise ValueError(
        f"{problem}: with image_size {image_size}, {name} must be at most {largest:.4g}; lower {name} or raise "
        "image_size"
    )


def motion_kernel(length: int, angle: float) -> np.ndarray:
    """Normalised straight streak of ``length`` pixels through the centre at ``angle`` degrees."""
    size = motion_kernel_size(length)
    kernel = np.zeros((size, size))
    theta = math.radians(angle)
    for t in np.linspace(-(length - 1) / 2, (length - 1) / 2, 8 * length):
        row = int(round(size // 2 - t * math.sin(theta)))
        col = int(round(size // 2 + t * math.cos(theta)))
        kernel[row, col] += 1.0
    return kernel / kernel.sum()


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """``(B, S, S)`` images -> ``(B, (S/patch)², patch²)`` tokens: patches and their pixels in raster order."""
    batch, size = images.shape[0], images.shape[-1]
    grid = size // patch
    return images.reshape(batch, grid, patch, grid, patch).transpose(2, 3).reshape(batch, grid * grid, patch * patch)


def unpatchify(tokens: torch.Tensor, patch: int) -> torch.Tensor:
    """The inverse of `patchify`: ``(B, T, patch²)`` tokens -> ``(B, S, S)`` images."""
    batch, length = tokens.shape[:2]
    grid = math.isqrt(length)
    return tokens.reshape(batch, grid, grid, patch, patch).transpose(2, 3).reshape(batch, grid * patch, grid * patch)


@functools.cache
def load_image(name: str) -> np.ndarray:
    """The bundled scikit-image sample ``name`` (a `skimage.data` function) as grey float64 in ``[0, 1]``."""
    image = getattr(data, name)()
    if image.ndim == 3:
        image = color.rgb2gray(image)
    return util.img_as_float64(image)


class DeblurTask(TaskAdapter):
    """Recover a clean image crop from its blurred, noisy observation; one token per image patch."""

    name = "deblur"
    head = "token_regression"
    quality_metric = "psnr"
    higher_is_better = True
    metric_name = "imaging_metrics"

    def __init__(
        self,
        cache_dir: str | Path | None = None,
        image_size: Annotated[int, at_least(1), multiple_of("patch_size")] = 32,
        patch_size: Annotated[int, at_least(1)] = 4,
        blur: Blur = "gaussian",
        blur_sigma: Positive = 1.5,
        motion_length: Annotated[int, at_least(1)] = 7,
        motion_angle: float = 30.0,
        noise_std: Annotated[float, number(">= 0", lambda value: value >= 0)] = 0.03,
        prior: Prior = "gradient",
    ):
        super().__init__(cache_dir)
        self.image_size = int(image_size)
        self.patch_size = int(patch_size)
        self.blur = blur
        self.blur_sigma = float(blur_sigma)
        self.motion_length = int(motion_length)
        self.motion_angle = float(motion_angle)
        self.noise_std = float(noise_std)
        self.prior = prior
        _check_kernel_fits(blur, blur_sigma, motion_length, image_size)
        kernel = gaussian_kernel(blur_sigma) if blur == "gaussian" else motion_kernel(motion_length, motion_angle)
        self.operator = BlurOperator(kernel, image_size)

    # ------------------------------------------------------------------ model

    def model_config(self) -> dict[str, Any]:
        pixels = self.patch_size**2
        return {
            "problem_type": "regression",
            "num_labels": pixels,
            "is_causal": False,
            "input_features": pixels if self.prior == "none" else 2 * pixels,
            "feedback_features": pixels if self.prior == "gradient" else 0,
        }

    # ------------------------------------------------------------------ data

    def dataset_path(self, split: str, n: int, seed: int) -> Path:
        """Where `build_dataset` caches ``(split, n, seed)``."""
        blur = (
            f"gauss{self.blur_sigma:g}"
            if self.blur == "gaussian"
            else f"motion{self.motion_length}-{self.motion_angle:g}"
        )
        return self.cache_dir / f"{split}-{self.image_size}px-{blur}-noise{self.noise_std:g}-{n}-seed{seed}"

    def features(self):
        """``image`` and ``observation`` (``S x S`` float32) and ``source`` (the skimage image)."""
        image = datasets.Array2D(shape=(self.image_size, self.image_size), dtype="float32")
        return datasets.Features({"image": image, "observation": image, "source": datasets.Value("string")})

    def generate(self, rng: np.random.Generator, n: int, split: str) -> list[Example]:
        """``n`` (clean crop, observation) rows; training crops from `TRAIN_IMAGES`, other splits' from
        `HELD_OUT_IMAGES`."""
        names = TRAIN_IMAGES if split == "train" else HELD_OUT_IMAGES
        size = self.image_size
        sources, crops, noise = [], np.zeros((n, size, size)), np.zeros((n, size, size))
        for k in range(n):
            name = names[rng.integers(len(names))]
            image = load_image(name)
            top = rng.integers(image.shape[0] - size + 1)
            left = rng.integers(image.shape[1] - size + 1)
            crop = np.rot90(image[top : top + size, left : left + size], k=rng.integers(4))
            crops[k] = crop[:, ::-1] if rng.integers(2) else crop
            noise[k] = rng.standard_normal((size, size)) * self.noise_std
            sources.append(name)
        with single_threaded():
            observations = self.operator.apply(torch.from_numpy(crops)).numpy() + noise
        rows = zip(crops.astype(np.float32), observations.astype(np.float32), sources, strict=True)
        return [{"image": image, "observation": observation, "source": source} for image, observation, source in rows]

    # ------------------------------------------------------------------ encode / decode

    def encode(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        """``input_features (B, T, F)``, ``attention_mask (B, T)`` and, when every row has an ``image``,
        ``labels (B, T, patch²)`` (see the module docstring for the layout)."""
        observations = torch.from_numpy(np.stack([self._pixels(e, "observation", k) for k, e in enumerate(examples)]))
        tokens = [patchify(_normalise(observations), self.patch_size)]
        if self.prior != "none":
            tokens.append(patchify(_normalise(self.operator.adjoint(observations)), self.patch_size))
        features = torch.cat(tokens, dim=-1).float()
        encoded = {
            "input_features": features,
            "attention_mask": torch.ones(features.shape[:2], dtype=torch.long),
        }
        if all(example.get("image") is not None for example in examples):
            images = torch.from_numpy(np.stack([self._pixels(e, "image", k) for k, e in enumerate(examples)]))
            encoded["labels"] = patchify(_normalise(images), self.patch_size).float()
        return encoded

    def decode(self, logits: torch.Tensor, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The restored ``(S, S)`` image (pixel units, float32, on the CPU) of every sample."""
        images = unpatchify(logits.detach().float().cpu(), self.patch_size) * PIXEL_SCALE + PIXEL_MEAN
        return list(images)

    def loop_feedback(self, inputs: dict[str, torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """With ``prior="gradient"``: head output ``x̂`` (normalised patches) -> ``Aᵀ(A x̂ - y) / GRAD_SCALE`` patches.

        ``y`` is read back from the observation columns of ``inputs["input_features"]``, so the
        function belongs to that batch (and its device). Other priors have no feedback.
        """
        if self.prior != "gradient":
            return None
        pixels = self.patch_size**2
        observation = unpatchify(inputs["input_features"][..., :pixels].float(), self.patch_size)
        observation = observation * PIXEL_SCALE + PIXEL_MEAN

        def feedback(outputs: torch.Tensor) -> torch.Tensor:
            estimate = unpatchify(outputs.float(), self.patch_size) * PIXEL_SCALE + PIXEL_MEAN
            gradient = self.operator.gradient(estimate, observation)
            return patchify(gradient / GRAD_SCALE, self.patch_size).to(outputs.dtype)

        return feedback

    def _pixels(self, example: Example, key: str, k: int) -> np.ndarray:
        pixels = np.asarray(example[key], dtype=np.float64)
        if pixels.shape != (self.image_size, self.image_size):
            raise ValueError(f"example {k}: {key} has shape {pixels.shape}, expected {(self.image_size,) * 2}")
        return pixels

    # ------------------------------------------------------------------ metrics

    def compute_metrics(self, predictions: list[torch.Tensor], examples: list[Example]) -> dict[str, float]:
        """``psnr`` (headline, dB), ``ssim`` and ``mse`` against the clean images, averaged over samples."""
        check_one_per_row(predictions, examples)
        return self.load_metric().compute(
            predictions=[torch.as_tensor(p).double().cpu().numpy().tolist() for p in predictions],
            references=[self._pixels(e, "image", k).tolist() for k, e in enumerate(examples)],
        )

    # ------------------------------------------------------------------ perturbations

    def perturb_rows(self, examples: list[Example], eps: float, seed: int) -> tuple[list[Example], torch.Tensor]:
        """Rows with observation ``y + A δx`` and target ``x + δx``, ``δx`` along the blur's top singular vectors.

        ``δx`` is a random combination of the `PERTURB_MODES` Fourier modes with the largest
        ``|H|``, scaled so that the input perturbation ``δ = A δx`` has norm exactly ``eps`` (in
        pixel units, as the decoded predictions). Deterministic in ``(examples, eps, seed)``.
        """
        transfer = self.operator.transfer
        modes = np.argsort(-np.abs(transfer), axis=None, kind="stable")[:PERTURB_MODES]
        generators = row_generators(seed, len(examples))
        perturbed = []
        for k, (example, rng) in enumerate(zip(examples, generators, strict=True)):
            spectrum = np.zeros(transfer.shape, dtype=np.complex128)
            spectrum.flat[modes] = rng.standard_normal(modes.size) + 1j * rng.standard_normal(modes.size)
            delta_x = torch.fft.irfft2(torch.from_numpy(spectrum), s=(self.image_size, self.image_size))
            delta_y = self.operator.apply(delta_x)
            scale = eps / float(delta_y.norm())
            row = {
                **example,
                "observation": (self._pixels(example, "observation", k) + scale * delta_y.numpy()).tolist(),
            }
            if example.get("image") is not None:
                row["image"] = (self._pixels(example, "image", k) + scale * delta_x.numpy()).tolist()
            perturbed.append(row)
        return perturbed, torch.full((len(examples),), float(eps), dtype=torch.float64)


def _normalise(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels - PIXEL_MEAN) / PIXEL_SCALE
