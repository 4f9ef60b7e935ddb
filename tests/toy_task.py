"""A tiny synthetic `TaskAdapter` for the training-loop tests.

Per-token regression on fixed-length sequences: every token carries two features ``(a, b)``; its
target is the scaled running sum ``y_t = (a_1 + ... + a_t) / sqrt(t) + 0.5 * b_t``. All samples have
the same length and no padding, so a batch's mean loss is the mean of its samples' losses and a
2-process run with half the per-process batch sees exactly the same loss as a 1-process run.

Importing this module registers the task as ``"train_toy"`` (recipes name it with
``task_module: tests.toy_task``). ``delay`` (seconds per collated batch) slows a run down so a test
can kill it between checkpoints. Rows carry a ``level`` (1, 2, 3 in turn), their `difficulty`.
"""

from __future__ import annotations

import math
import time
import zlib
from pathlib import Path
from typing import Any

import torch

from implicit_hf.tasks.base import Example, TaskAdapter, list_feature


class TrainToyTask(TaskAdapter):
    name = "train_toy"
    head = "token_regression"
    quality_metric = "mse"
    higher_is_better = False

    def __init__(self, cache_dir: str | Path | None = None, seq_len: int = 8, delay: float = 0.0):
        super().__init__(cache_dir)
        self.seq_len = int(seq_len)
        self.delay = float(delay)

    def model_config(self) -> dict[str, Any]:
        return {"input_features": 2, "num_labels": 1, "is_causal": False, "vocab_size": 1}

    @staticmethod
    def target(x: list[list[float]]) -> list[float]:
        out, total = [], 0.0
        for t, (a, b) in enumerate(x, start=1):
            total += a
            out.append(total / math.sqrt(t) + 0.5 * b)
        return out

    def dataset_path(self, split: str, n: int, seed: int) -> Path:
        return self.cache_dir / f"{split}-n{n}-seed{seed}-len{self.seq_len}"

    def features(self):
        import datasets

        return datasets.Features(
            {
                "x": list_feature(list_feature(datasets.Value("float64"))),
                "y": list_feature(datasets.Value("float64")),
                "level": datasets.Value("int32"),
            }
        )

    def random_stream(self, split: str, seed: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(split.encode()))

    def generate(self, rng: torch.Generator, n: int, split: str) -> list[Example]:
        x = torch.randn(n, self.seq_len, 2, generator=rng).tolist()
        return [{"x": row, "y": self.target(row), "level": k % 3 + 1} for k, row in enumerate(x)]

    def difficulty(self, example: Example) -> int:
        return example["level"]

    def encode(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        if self.delay:
            time.sleep(self.delay)
        features = torch.tensor([row["x"] for row in examples], dtype=torch.float32)
        labels = torch.tensor([row["y"] for row in examples], dtype=torch.float32).unsqueeze(-1)
        mask = torch.ones(features.shape[:2], dtype=torch.long)
        return {"input_features": features, "attention_mask": mask, "labels": labels}

    def decode(self, logits: torch.Tensor, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return [row[:, 0].detach().float().cpu() for row in logits]

    def compute_metrics(self, predictions: list[torch.Tensor], examples: list[Example]) -> dict[str, float]:
        errors = [
            float((p - torch.tensor(row["y"])).pow(2).mean()) for p, row in zip(predictions, examples, strict=True)
        ]
        return {"mse": sum(errors) / len(errors)}

    def perturb_rows(self, examples: list[Example], eps: float, seed: int) -> tuple[list[Example], torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        perturbed, norms = [], []
        for row in examples:
            x = torch.tensor(row["x"], dtype=torch.float64)
            delta = torch.randn(x.shape, generator=generator, dtype=torch.float64)
            delta *= eps / delta.norm()
            new_x = (x + delta).tolist()
            perturbed.append({**row, "x": new_x, "y": self.target(new_x)})
            norms.append(float(delta.norm()))
        return perturbed, torch.tensor(norms)
