"""The deblurring task: images, blur operator, encoding, metrics, perturbations, in-loop feedback, training."""

import json
import math

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity
from transformers import AutoModelForTokenClassification

from implicit_hf.eval import sweep
from implicit_hf.modeling.configuration_implicit import GRADIENTS
from implicit_hf.tasks import get_task
from implicit_hf.tasks import imaging as imaging_module
from implicit_hf.tasks.imaging import (
    HELD_OUT_IMAGES,
    TRAIN_IMAGES,
    BlurOperator,
    DeblurTask,
    gaussian_kernel,
    motion_kernel,
    patchify,
    unpatchify,
)
from implicit_hf.tasks.models import build_model
from implicit_hf.training import loop as train_mod
from implicit_hf.training.recipe import config_from_dict

SIZE = 16  # 16 x 16 crops: 16 tokens of 4 x 4 pixels
TINY_MODEL = dict(hidden_size=32, num_attention_heads=4, num_prelude_layers=0, num_core_layers=1, num_coda_layers=0)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("deblur-cache")


@pytest.fixture(scope="module")
def task(cache):
    return DeblurTask(cache_dir=cache, image_size=SIZE)


@pytest.fixture(scope="module")
def rows(task):
    return task.build_dataset("train", 12, seed=0).to_list()


def test_registered_and_model_config(task):
    assert isinstance(get_task("deblur", cache_dir=task.cache_dir), DeblurTask)
    assert task.model_config() == {
        "problem_type": "regression",
        "num_labels": 16,
        "is_causal": False,
        "input_features": 32,
        "feedback_features": 16,
    }
    plain = DeblurTask(cache_dir=task.cache_dir, image_size=SIZE, prior="adjoint")
    assert plain.model_config()["input_features"] == 32 and plain.model_config()["feedback_features"] == 0
    assert plain.loop_feedback(task.encode(task.build_dataset("train", 1, seed=0).to_list())) is None
    assert DeblurTask(cache_dir=task.cache_dir, prior="none").model_config()["input_features"] == 16
    for kwargs, message in (
        ({"prior": "wiener"}, "prior"),
        ({"blur": "box"}, "blur"),
        ({"image_size": 18}, "multiple"),
        ({"blur_sigma": 0.0}, "blur_sigma"),
        ({"image_size": 8, "blur_sigma": 2.0}, "kernel"),
    ):
        with pytest.raises(ValueError, match=message):
            DeblurTask(cache_dir=task.cache_dir, **kwargs)


def test_images_are_bundled_and_splits_use_different_ones():
    assert not set(TRAIN_IMAGES) & set(HELD_OUT_IMAGES)
    for name in TRAIN_IMAGES + HELD_OUT_IMAGES:
        image = imaging_module.load_image(name)
        assert image.ndim == 2 and image.dtype == np.float64 and 0 <= image.min() and image.max() <= 1
        assert min(image.shape) >= 64


def test_generator_deterministic_and_split_dependent(task, rows, tmp_path):
    other = DeblurTask(cache_dir=tmp_path, image_size=SIZE)
    assert other.build_dataset("train", 12, seed=0).to_list() == rows  # regenerated, not the cached copy
    assert other.build_dataset("train", 4, seed=0).to_list() == rows[:4]  # a prefix of the same stream
    different_seed = other.build_dataset("train", 4, seed=1).to_list()
    test_rows = other.build_dataset("test", 4, seed=0).to_list()
    for changed in (different_seed, test_rows):
        assert all(a["image"] != b["image"] for a, b in zip(rows[:4], changed, strict=True))
    assert {row["source"] for row in rows} <= set(TRAIN_IMAGES)
    assert {row["source"] for row in test_rows + other.build_dataset("validation", 4, 0).to_list()} <= set(
        HELD_OUT_IMAGES
    )
    assert len(other.build_dataset("test", 0, seed=0)) == 0


def test_rows_are_blurred_crops_with_the_stated_noise(task, rows):
    images = np.array([row["image"] for row in rows])
    observations = np.array([row["observation"] for row in rows])
    assert images.shape == observations.shape == (12, SIZE, SIZE)
    assert images.min() >= 0 and images.max() <= 1 and images.std() > 0.02
    noise = observations - task.operator.apply(torch.from_numpy(images)).numpy()
    assert abs(noise.mean()) < 0.005
    assert noise.std() == pytest.approx(0.03, rel=0.1)


def test_cache_is_reused(task, rows, monkeypatch):
    assert task.dataset_path("train", 12, 0).is_dir()
    monkeypatch.setattr(imaging_module, "load_image", lambda name: pytest.fail("regenerated a cached data set"))
    assert task.build_dataset("train", 12, seed=0).to_list() == rows


def test_blur_operator_matches_circular_convolution_and_its_adjoint():
    rng = np.random.default_rng(0)
    kernel = rng.random((5, 3))  # asymmetric: A is not symmetric, so the adjoint is a real check
    operator = BlurOperator(kernel, SIZE)
    x = rng.standard_normal((2, SIZE, SIZE))
    y = rng.standard_normal((2, SIZE, SIZE))
    direct = sum(
        kernel[a, b] * np.roll(x, (a - 2, b - 1), axis=(1, 2)) for a in range(5) for b in range(3)
    )  # (A x)[i, j] = sum_ab k[a, b] x[i - (a - 2), j - (b - 1)], indices mod SIZE
    Ax = operator.apply(torch.from_numpy(x))
    assert Ax.dtype == torch.float64
    np.testing.assert_allclose(Ax.numpy(), direct, rtol=0, atol=1e-12)
    ATy = operator.adjoint(torch.from_numpy(y)).numpy()
    assert np.sum(Ax.numpy() * y) == pytest.approx(np.sum(x * ATy), rel=1e-12)
    grad = operator.gradient(torch.from_numpy(x), torch.from_numpy(y)).numpy()
    np.testing.assert_allclose(grad, operator.adjoint(Ax - torch.from_numpy(y)).numpy(), atol=1e-12)
    # the blur kernels are normalised: constants pass unchanged, and |H| <= 1 with |H(0)| = 1
    for kernel in (gaussian_kernel(1.5), motion_kernel(7, 30.0)):
        blur = BlurOperator(kernel, SIZE)
        assert torch.allclose(
            blur.apply(torch.full((SIZE, SIZE), 0.3, dtype=torch.float64)), torch.tensor(0.3).double()
        )
        assert np.abs(blur.transfer).max() == pytest.approx(1.0) and abs(blur.transfer[0, 0]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="images"):
        operator.apply(torch.zeros(SIZE, SIZE + 1))


def test_encode_layout_and_decode_round_trip(task, rows):
    enc = task.encode(rows[:3])
    assert enc["input_features"].shape == (3, 16, 32) and enc["input_features"].dtype == torch.float32
    assert enc["labels"].shape == (3, 16, 16) and enc["labels"].dtype == torch.float32
    assert torch.equal(enc["attention_mask"], torch.ones(3, 16, dtype=torch.long))
    image = torch.tensor(rows[0]["image"])
    # token 1 is the patch right of the top-left one, its pixels in raster order, normalised
    assert torch.allclose(enc["labels"][0, 1], (image[0:4, 4:8].flatten() - 0.5) / 0.25, atol=1e-6)
    observation = torch.tensor(rows[0]["observation"], dtype=torch.float64)
    assert torch.allclose(enc["input_features"][0, 4, :16], ((observation[4:8, 0:4].flatten() - 0.5) / 0.25).float())
    adjoint = task.operator.adjoint(observation)
    assert torch.allclose(enc["input_features"][0, :, 16:], patchify((adjoint[None] - 0.5) / 0.25, 4)[0].float())
    decoded = task.decode(enc["labels"], enc)
    for prediction, row in zip(decoded, rows[:3], strict=True):
        assert prediction.shape == (SIZE, SIZE)
        assert torch.allclose(prediction, torch.tensor(row["image"]), atol=1e-6)
    images = torch.randn(2, 8, 8)
    assert torch.equal(unpatchify(patchify(images, 2), 2), images)
    assert "labels" not in task.encode([{"observation": rows[0]["observation"]}])
    with pytest.raises(ValueError, match="shape"):
        task.encode([{"observation": [[0.0] * 4] * 4}])


def test_loop_feedback_is_the_data_consistency_gradient(task, rows):
    enc = task.encode(rows[:2])
    feedback = task.loop_feedback(enc)
    estimate = torch.randn(2, 16, 16)
    observation = torch.tensor(np.array([row["observation"] for row in rows[:2]]))
    pixels = unpatchify(estimate.double(), 4) * 0.25 + 0.5
    expected = task.operator.gradient(pixels, observation) / imaging_module.GRAD_SCALE
    assert feedback(estimate).shape == (2, 16, 16)
    assert torch.allclose(feedback(estimate).double(), patchify(expected, 4), atol=1e-4)


def test_metrics_hand_computed_and_offline(task, rows, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    clean = [torch.tensor(row["image"], dtype=torch.float64) for row in rows[:2]]
    off = [image + 0.1 for image in clean]  # mse 0.01: PSNR 20 dB
    scores = task.compute_metrics(off, rows[:2])
    assert set(scores) == {"psnr", "ssim", "mse"}
    assert scores["psnr"] == pytest.approx(20.0) and scores["mse"] == pytest.approx(0.01)
    ssim = [structural_similarity(c.numpy(), o.numpy(), data_range=1.0) for c, o in zip(clean, off, strict=True)]
    assert scores["ssim"] == pytest.approx(np.mean(ssim))
    assert task.compute_metrics(clean, rows[:2])["ssim"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="predictions"):
        task.compute_metrics(clean, rows[:3])


def test_perturb_along_top_singular_vectors(task, rows):
    eps = 0.05
    perturbed, norms = task.perturb(rows[:3], eps, seed=0)
    assert torch.equal(norms, torch.full((3,), eps, dtype=torch.float64))
    top = np.sort(np.abs(task.operator.transfer).ravel())[::-1][imaging_module.PERTURB_MODES - 1]
    for before, after in zip(rows[:3], perturbed, strict=True):
        delta_x = np.subtract(after["image"], before["image"])
        delta_y = np.subtract(after["observation"], before["observation"])
        assert np.linalg.norm(delta_y) == pytest.approx(eps, rel=1e-9)
        np.testing.assert_allclose(delta_y, task.operator.apply(torch.from_numpy(delta_x)).numpy(), atol=1e-12)
        spectrum = np.abs(np.fft.rfft2(delta_x))
        assert np.all(np.abs(task.operator.transfer)[spectrum > 1e-9 * spectrum.max()] >= top - 1e-12)
        assert after["source"] == before["source"]
    again, _ = task.perturb(rows[:3], eps, seed=0)
    other, _ = task.perturb(rows[:3], eps, seed=1)
    assert again == perturbed and other != perturbed
    unchanged, zero = task.perturb(rows[:1], 0.0, seed=0)
    assert torch.equal(zero, torch.zeros(1, dtype=torch.float64))
    np.testing.assert_array_equal(unchanged[0]["image"], rows[0]["image"])


# ---------------------------------------------------------------------- the model's in-loop feedback


def feedback_model(task, **overrides):
    torch.manual_seed(0)
    return build_model(task, **{**TINY_MODEL, "num_loops": 4, **overrides})


@pytest.mark.parametrize("gradient", GRADIENTS)
def test_feedback_trains_with_every_gradient_mode(task, rows, gradient):
    model = feedback_model(task, gradient=gradient, gradient_steps=2).train()
    batch = task.encode(rows[:4])
    out = model(**batch, loop_feedback=task.loop_feedback(batch))
    assert out.logits.shape == (4, 16, 16) and math.isfinite(out.loss.item())
    out.loss.backward()
    for parameter in (model.model.feedback_embed.weight, model.model.core[0].mlp.up_proj.weight, model.score.weight):
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0


def test_feedback_is_required_exactly_when_configured(task, rows):
    batch = task.encode(rows[:2])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    model = feedback_model(task)
    with pytest.raises(ValueError, match="feedback_features=16 and needs loop_feedback"):
        model(**inputs)
    with pytest.raises(ValueError, match="must return shape"):
        model(**inputs, loop_feedback=lambda out: out[..., :3])
    plain_task = DeblurTask(cache_dir=task.cache_dir, image_size=SIZE, prior="adjoint")
    with pytest.raises(ValueError, match="loop_feedback needs a model built with config.feedback_features > 0"):
        feedback_model(plain_task)(**inputs, loop_feedback=task.loop_feedback(batch))
    with pytest.raises(ValueError, match="feedback_features"):
        build_model(plain_task, feedback_features=-1)


def test_feedback_is_added_to_the_injection(task, rows):
    """Zero feedback (and a zero embedding bias) gives exactly the model without feedback."""
    batch = task.encode(rows[:2])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with_feedback = feedback_model(task).eval()
    with_feedback.model.feedback_embed.bias.data.zero_()
    without = build_model(
        DeblurTask(cache_dir=task.cache_dir, image_size=SIZE, prior="adjoint"), **TINY_MODEL, num_loops=4
    )
    missing, unexpected = without.load_state_dict(with_feedback.state_dict(), strict=False)
    assert missing == [] and sorted(unexpected) == ["model.feedback_embed.bias", "model.feedback_embed.weight"]
    with torch.no_grad():
        zero = with_feedback(**inputs, loop_feedback=torch.zeros_like)
        assert torch.equal(zero.logits, without.eval()(**inputs).logits)
        real = with_feedback(**inputs, loop_feedback=task.loop_feedback(batch))
    assert not torch.allclose(real.logits, zero.logits, atol=1e-3)


@pytest.mark.parametrize("solver", ["picard", "anderson", "broyden"])
def test_feedback_respects_per_sample_halting(task, rows, solver):
    """Samples that stop early leave the batch; the rest still get their own feedback rows."""
    model = feedback_model(task, solver=solver, tol=1e-2, initializer_range=0.2).eval()
    batch = task.encode(rows[:4])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        batched = model(**inputs, num_loops=30, loop_feedback=task.loop_feedback(batch))
        for row in range(4):
            single_inputs = {k: v[row : row + 1] for k, v in inputs.items()}
            single = model(**single_inputs, num_loops=30, loop_feedback=task.loop_feedback(single_inputs))
            assert single.loop_stats.steps.item() == batched.loop_stats.steps[row].item()
            assert torch.allclose(single.logits[0], batched.logits[row], atol=1e-4)
    assert len(set(batched.loop_stats.steps.tolist())) > 1  # the samples did stop at different iterations


def test_feedback_model_save_load_round_trip(task, rows, tmp_path):
    model = feedback_model(task).eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForTokenClassification.from_pretrained(tmp_path).eval()
    assert loaded.config.feedback_features == 16
    batch = task.encode(rows[:2])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        expected = model(**inputs, loop_feedback=task.loop_feedback(batch)).logits
        assert torch.equal(loaded(**inputs, loop_feedback=task.loop_feedback(batch)).logits, expected)
    with pytest.raises(ValueError, match="needs loop_feedback"):
        loaded(**inputs)


def test_tiny_training_run_lowers_the_loss_and_sweeps(tmp_path, monkeypatch):
    monkeypatch.setenv("IMPLICIT_HF_CACHE", str(tmp_path / "cache"))
    config = config_from_dict(
        {
            "task": "deblur",
            "task_kwargs": {"image_size": SIZE},
            "model": {**TINY_MODEL, "num_loops": 4, "gradient": "unroll"},
            "output_dir": str(tmp_path / "run"),
            "train_size": 64,
            "eval_size": 16,
            "per_device_batch_size": 16,
            "learning_rate": 3e-3,
            "warmup_steps": 2,
            "max_steps": 40,
            "log_every": 5,
            "checkpoint_every": 0,
            "eval_every": 0,
            "tracker": "none",
        }
    )
    result = train_mod.train(config)
    records = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    losses = [record["train/loss"] for record in records if "train/loss" in record]
    first, last = losses[0], losses[-1]
    assert last < 0.5 * first, (first, last)
    task = get_task("deblur", image_size=SIZE)
    swept = sweep(result.model, task, task.build_dataset("test", 8, 0), [1, 4], perturb_eps=0.01)
    assert [record["loops"] for record in swept["records"]] == [1, 4]
    assert all(math.isfinite(record["quality"]) and record["lipschitz"] > 0 for record in swept["records"])
