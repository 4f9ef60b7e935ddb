"""A tiny synthetic `TaskAdapter` for the evaluation-harness tests and the sweep benchmark.

Per-token regression: every token carries two features ``(a, b)``; its target is
``y = a + 0.5 * mean(b over the sample's tokens)``, so the model needs attention to solve it.
Samples have different lengths (``seq_len // 2`` to ``seq_len`` tokens) so padding, the attention
mask and per-sample decoding are exercised. Importing this module registers the task as
``"eval_toy"`` in `implicit_hf.tasks.base.TASKS`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from implicit_hf.tasks.base import Example, TaskAdapter, list_feature


class EvalToyTask(TaskAdapter):
    name = "eval_toy"
    head = "token_regression"
    quality_metric = "mse"
    higher_is_better = False

    def __init__(self, cache_dir: str | Path | None = None, seq_len: int = 8, variable_length: bool = True):
        super().__init__(cache_dir)
        self.seq_len = int(seq_len)
        self.variable_length = bool(variable_length)

    def model_config(self) -> dict[str, Any]:
        return {"input_features": 2, "num_labels": 1, "is_causal": False, "vocab_size": 4}

    @staticmethod
    def target(x: list[list[float]]) -> list[float]:
        mean_b = sum(b for _, b in x) / len(x)
        return [a + 0.5 * mean_b for a, _ in x]

    def dataset_path(self, split: str, n: int, seed: int) -> Path:
        return self.cache_dir / f"{split}-n{n}-seed{seed}-len{self.seq_len}-var{int(self.variable_length)}"

    def features(self):
        import datasets

        return datasets.Features(
            {"x": list_feature(list_feature(datasets.Value("float64"))), "y": list_feature(datasets.Value("float64"))}
        )

    def random_stream(self, split: str, seed: int) -> torch.Generator:
        offset = {"train": 0, "validation": 1, "test": 2}.get(split, 3)
        return torch.Generator().manual_seed(1000 * seed + offset)

    def generate(self, rng: torch.Generator, n: int, split: str) -> list[Example]:
        rows = []
        for _ in range(n):
            low = max(1, self.seq_len // 2) if self.variable_length else self.seq_len
            length = int(torch.randint(low, self.seq_len + 1, (1,), generator=rng))
            x = torch.randn(length, 2, generator=rng).tolist()
            rows.append({"x": x, "y": self.target(x)})
        return rows

    def encode(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        length = max(len(row["x"]) for row in examples)
        batch = len(examples)
        features = torch.zeros(batch, length, 2)
        mask = torch.zeros(batch, length, dtype=torch.long)
        labels = torch.full((batch, length, 1), float("nan"))
        for i, row in enumerate(examples):
            n = len(row["x"])
            features[i, :n] = torch.tensor(row["x"], dtype=torch.float32)
            mask[i, :n] = 1
            labels[i, :n, 0] = torch.tensor(row["y"], dtype=torch.float32)
        return {"input_features": features, "attention_mask": mask, "labels": labels}

    def decode(self, logits: torch.Tensor, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        lengths = inputs["attention_mask"].sum(dim=1).tolist()
        return [logits[i, : int(n), 0].detach().float().cpu() for i, n in enumerate(lengths)]

    def compute_metrics(self, predictions: list[torch.Tensor], examples: list[Example]) -> dict[str, float]:
        mse, mae = [], []
        for prediction, row in zip(predictions, examples, strict=True):
            error = prediction - torch.tensor(row["y"], dtype=torch.float32)
            mse.append(float(error.pow(2).mean()))
            mae.append(float(error.abs().mean()))
        return {"mse": sum(mse) / len(mse), "mae": sum(mae) / len(mae)}

    def perturb_rows(self, examples: list[Example], eps: float, seed: int) -> tuple[list[Example], torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        perturbed, norms = [], []
        for row in examples:
            x = torch.tensor(row["x"], dtype=torch.float64)
            delta = torch.randn(x.shape, generator=generator, dtype=torch.float64)
            delta = delta * (eps / delta.norm())
            new_x = (x + delta).tolist()
            perturbed.append({**row, "x": new_x, "y": self.target(new_x)})
            # the norm of the perturbation the model actually sees (float32 inputs)
            norms.append(float((torch.tensor(new_x, dtype=torch.float32) - torch.tensor(row["x"])).norm()))
        return perturbed, torch.tensor(norms)


def toy_model(task: EvalToyTask | None = None, seed: int = 0, **overrides):
    """The tiny implicit model the tests use (untrained, deterministic in ``seed``): `tiny_task_model` at the
    config's default of eight loops."""
    from tiny_models import tiny_task_model

    return tiny_task_model(task or EvalToyTask(), seed, **{"num_loops": 8, **overrides})
